"""LongGen's cache: full layers keep every token (``DynamicLayer``); sparse layers keep only what their pattern can
still read (sinks + the last ``window - 1`` tokens, or the local blocks + the vertical-stride blocks)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from hf_longmem.kernels.sparse_attention import SparsePattern
from hf_longmem.memory.accounting import RESIDENT, CacheMemoryReport, MemoryParts, MemoryReport, tensor_bytes


class LongGenSparseLayer(MemoryReport, CacheLayerMixin):
    """KV of one sparse layer with each slot's position (index among its row's real tokens; ``-1``: empty slot).

    A step attends to the stored slots plus its new tokens (:meth:`append`); afterwards only the slots that a query at
    a later position can read are kept (:meth:`SparsePattern.readable_later`). Rows of a batch may keep different
    numbers of slots (left padding): the shorter ones are filled with empty slots.
    """

    is_sliding = False  # the model's mask is the full one; this layer masks by its own positions

    def __init__(self, pattern: SparsePattern):
        super().__init__()
        self.pattern = pattern
        self.positions: torch.Tensor | None = None  # [batch, n] int64
        self.seen = 0  # input positions consumed (pads included), as generate counts them

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(batch, heads, 0, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, 0, value_states.shape[-1])
        self.positions = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise ValueError(
            "a LongGen sparse layer needs the new tokens' positions: it is updated by LongGenAttention (append)"
        )

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the new tokens and return what this step attends to, then drop what no later query can read.

        Args:
            key_states: ``[batch, kv_heads, q, head_dim]``; value_states likewise.
            positions: ``[batch, q]`` the new tokens' positions (``-1``: pad).

        Returns:
            ``(keys [b, Hkv, n, d], values [b, Hkv, n, dv], positions [b, n])``: the stored slots then the new ones.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        slots = torch.cat([self.positions, positions.to(torch.long)], dim=-1)
        self.seen += key_states.shape[-2]
        self._keep(keys, values, slots)
        return keys, values, slots

    def _keep(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        next_position = slots.amax(-1, keepdim=True).clamp_min(-1) + 1  # [b, 1]
        keep = self.pattern.readable_later(slots, next_position)  # [b, n]
        if bool(keep.all()):
            self.keys, self.values, self.positions = keys, values, slots
            return
        counts = keep.sum(-1)
        width = int(counts.max())
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # kept slots first, in order
        filled = torch.arange(width, device=slots.device)[None, :] < counts[:, None]
        self.positions = slots.gather(-1, order).masked_fill(~filled, -1)
        index = order[:, None, :, None]
        self.keys = keys.gather(-2, index.expand(-1, keys.shape[1], -1, keys.shape[-1]))
        self.values = values.gather(-2, index.expand(-1, values.shape[1], -1, values.shape[-1]))

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def memory_parts(self) -> MemoryParts:
        """``{"sparse_kv": keys and values, "positions": the slots' int64 positions}`` (resident)."""
        return {
            "sparse_kv": (RESIDENT, tensor_bytes(self.keys, self.values)),
            "positions": (RESIDENT, tensor_bytes(self.positions)),
        }

    def stored_length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def _map(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values, self.positions = fn(self.keys), fn(self.values), fn(self.positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a LongGen sparse layer cannot be cropped: tokens it evicted cannot come back")

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.is_initialized = False
        self.seen = 0

    def offload(self):
        super().offload()
        if self.is_initialized:
            self.positions = self.positions.to("cpu", non_blocking=True)

    def prefetch(self):
        super().prefetch()
        if self.is_initialized and self.positions.device != self.device:
            self.positions = self.positions.to(self.device, non_blocking=True)


class LongGenCache(CacheMemoryReport, Cache):
    """The cache ``generate`` builds for a :class:`~hf_longmem.modeling.longgen.LongGenForCausalLM`.

    Args:
        config: a :class:`~hf_longmem.modeling.longgen.LongGenConfig` (layer plan and sparse pattern).

    Example::

        cache = LongGenCache(model.config)
        model.generate(input_ids, cache=cache, max_new_tokens=32)
        cache.kv_bytes()  # the sparse layers hold sinks + window only
    """

    def __init__(self, config):
        if not hasattr(config, "full_layers") or not hasattr(config, "sparse_pattern"):
            raise ValueError(f"LongGenCache needs a LongGenConfig, got {type(config).__name__}")
        pattern = config.sparse_pattern()
        layers = [
            DynamicLayer() if config.is_full_layer(i) else LongGenSparseLayer(pattern)
            for i in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen (pads included); the same for every layer."""
        return self.layers[0].get_seq_length() if self.layers else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """The full layers' mask sizes (sparse layers mask by their own positions)."""
        return self.get_seq_length() + query_length, 0

    def sparse_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`LongGenSparseLayer.append` of layer ``layer_idx``."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, LongGenSparseLayer):
            raise ValueError(f"layer {layer_idx} of this LongGenCache has full attention, not a sparse pattern")
        return layer.append(key_states, value_states, positions)

    def kv_bytes(self) -> int:
        """Bytes of the keys and values held (every layer); ``memory_bytes()`` adds the sparse layers' positions."""
        parts = self.memory_parts()
        return sum(size for name, (_, size) in parts.items() if name != "positions")

    def crop(self, max_length: int) -> None:
        raise ValueError("LongGenCache cannot be cropped: its sparse layers evicted tokens that cannot come back")
