"""Generation state of Titans: per layer, the neural memory and the bounded attention KV.

Per layer (all tensors have the batch first, so beam search and ``num_return_sequences`` can reorder them):

- attention: the last ``sliding_window`` (MAG/MAL) or ``segment_size`` (MAC) keys/values with their positions and
  validity (``attn_k``/``attn_v`` ``[batch, heads, n, head_dim]``, ``attn_pos``/``attn_valid`` ``[batch, n]``); MAC
  also keeps the keys/values of the memory read-out tokens of the current segment (``ret_k``/``ret_v``);
- memory: weights ``W`` and momentum ``S`` (``mem_w``/``mem_s``, tuples of ``[batch, memory_heads, ...]``), the
  unfinished chunk (``buf_k``/``buf_v`` ``[batch, memory_heads, chunk, d]``, ``buf_lr``/``buf_eta``/``buf_keep``
  ``[batch, memory_heads, chunk]``, ``buf_n`` ``[batch]``), the causal-convolution inputs (``conv``) and, for MAC, the
  weights at the start of the current segment (``seg_w``) and the read-out query convolution (``ret_conv``).

Nothing grows with the context: decode cost per token is constant.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from hf_longmem.memory.accounting import RESIDENT, CacheMemoryReport, MemoryParts, MemoryReport, tensor_bytes


class TitansLayerState(MemoryReport):
    """State of one layer: a dict of tensors (or tuples of tensors) with the batch as first dimension."""

    is_sliding = False
    is_compileable = False

    def __init__(self):
        self.values: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"TitansLayerState({sorted(self.values)})"

    def map(self, fn) -> None:
        """Replace every tensor ``t`` by ``fn(t)`` (used for batch reordering)."""
        for key, value in self.values.items():
            if isinstance(value, tuple):
                self.values[key] = tuple(fn(v) for v in value)
            elif isinstance(value, torch.Tensor):
                self.values[key] = fn(value)

    def get_seq_length(self) -> int:
        return 0

    def reset(self) -> None:
        self.values.clear()

    def memory_parts(self) -> MemoryParts:
        """``{"state": ("resident", bytes)}``: memory weights, momentum, chunk buffer, window keys/values."""
        held = (t for value in self.values.values() for t in (value if isinstance(value, tuple) else (value,)))
        return {"state": (RESIDENT, tensor_bytes(*held))}


class TitansCache(CacheMemoryReport, Cache):
    """The model's own cache: built by ``generate`` (and by ``forward(use_cache=True)``) when none is given.

    Args:
        config: a :class:`~hf_longmem.modeling.titans.configuration_titans.TitansConfig` (for the layer count).
    """

    def __init__(self, config: Any = None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("TitansCache needs a config or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[TitansLayerState() for _ in range(num_layers)])
        self.seen_tokens = 0  # input positions consumed (pads included), as generate counts them
        self.row_positions: torch.Tensor | None = None  # [batch] real tokens seen per row

    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def _map(self, fn) -> None:
        for layer in self.layers:
            layer.map(fn)
        if self.row_positions is not None:
            self.row_positions = fn(self.row_positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0
        self.row_positions = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("TitansCache cannot be cropped: the memory state is not invertible")
