"""The default ``generate`` cache of CMT: the backbone's KV cache, primed with the aggregated memory prefix."""

from __future__ import annotations

import torch
from transformers import DynamicCache


class CMTCache(DynamicCache):
    """A ``DynamicCache`` whose first ``prefix_length`` positions hold the retrieved memories' keys/values.

    The first forward call of a :class:`CMTForCausalLM` on a fresh cache is the question: the model retrieves the
    top-k memories for it and primes the cache with them (:meth:`prime`); every later call (chunked prefill, decoding)
    continues after them, exactly as a backbone continues after a cached prompt.

    ``get_seq_length()`` counts the prefix too (it is what RoPE positions and masks are built from);
    :attr:`prefix_length` says how much of it is memory.

    Args:
        config: the backbone's config (selects full / sliding-window layers as ``DynamicCache`` does).
        top_k: override the model's ``config.memory_top_k`` for this cache (``0``: read no memory).
    """

    def __init__(self, config=None, top_k: int | None = None, **kwargs):
        super().__init__(config=config, **kwargs)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 or None, got {top_k!r}")
        self.top_k = top_k
        self.primed = False
        self.prefix_length = 0
        self.retrieved_indices: torch.Tensor | None = None  # [batch, k] bank rows, in prefix order
        self.retrieved_doc_ids: list[list[str]] | None = None
        self.retrieval_scores: torch.Tensor | None = None  # [batch, k] cosine similarities, in prefix order

    def prime(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        """Write the memory prefix (once, into an empty cache).

        Args:
            keys, values: ``[layers, batch, kv_heads, P, head_dim]`` (``None``: no memory, ``P = 0``).
        """
        if self.primed:
            raise ValueError("cache is already primed with a memory prefix; use a fresh CMTCache per question")
        if self.get_seq_length() != 0:
            raise ValueError("cache already holds tokens: a CMTCache must be primed before its first tokens")
        if keys is not None:
            for layer_idx in range(keys.shape[0]):
                self.update(keys[layer_idx], values[layer_idx], layer_idx)
            self.prefix_length = keys.shape[-2]
        self.primed = True

    def memory_bytes(self) -> int:
        """Bytes of the keys/values held (memory prefix included)."""
        total = 0
        for layer in self.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
