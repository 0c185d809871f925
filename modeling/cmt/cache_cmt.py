"""The default ``generate`` cache of CMT: the backbone's KV cache, primed with the aggregated memory prefix."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from hf_longmem.memory.accounting import RESIDENT, MemoryParts, MemoryReport, tensor_bytes


class CMTCache(MemoryReport, DynamicCache):
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

    def memory_parts(self) -> MemoryParts:
        """``{"kv": ("resident", bytes of the keys/values held, memory prefix included)}``."""
        return {
            "kv": (
                RESIDENT,
                tensor_bytes(*(getattr(layer, n, None) for layer in self.layers for n in ("keys", "values"))),
            )
        }


class ReplayLayer(DynamicLayer):
    """A cache layer for one training pass under gradient checkpointing.

    ``keys`` / ``values`` hold a fixed prefix (``[batch, kv_heads, P, head_dim]``, possibly empty); :meth:`update`
    returns ``prefix ‖ new`` and keeps the new states in :attr:`written`, *replacing* (never appending) them. A
    checkpointed decoder layer that is recomputed in the backward therefore reads exactly what its forward read, which
    an appending ``DynamicLayer`` would not (the recompute would see its own keys twice).
    """

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.written: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.written = (key_states, value_states)
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class ReplayPrefixCache(Cache):
    """A one-call cache of :class:`ReplayLayer`: a fixed prefix per layer, the call's own states in ``written``.

    CMT's training passes (compression, question answering after the memory prefix) read keys/values through it, so
    that the backbone's layers can be checkpointed with a cache (``_can_checkpoint_with_cache``).

    Args:
        num_layers: the backbone's decoder layers.
        keys, values: the prefix, ``[layers, batch, kv_heads, P, head_dim]`` each (``None``: no prefix).
    """

    def __init__(self, num_layers: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        layers = [ReplayLayer() for _ in range(num_layers)]
        if keys is not None:
            for layer, layer_keys, layer_values in zip(layers, keys, values):
                layer.lazy_initialization(layer_keys, layer_values)
                layer.keys, layer.values = layer_keys, layer_values
        super().__init__(layers=layers)

    @classmethod
    def holding(cls, cache: Cache, num_layers: int) -> ReplayPrefixCache:
        """A replay cache whose prefix is everything ``cache`` holds now (``cache`` itself is left unchanged)."""
        if cache.get_seq_length() == 0:
            return cls(num_layers)
        return cls(
            num_layers,
            torch.stack([layer.keys for layer in cache.layers]),
            torch.stack([layer.values for layer in cache.layers]),
        )
