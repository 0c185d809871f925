"""The cache HCAM keeps during ``generate``: one chunk store per memory layer plus the backbone's current segment.

``HCAMCache`` holds

* ``stores``: per memory layer a :class:`hf_longmem.memory.memory_bank.ChunkMemoryBank` with one "head" of width
  ``D`` whose keys are the layer's normalised inputs (HCAM's chunk *contents* ``[b, 1, M, C, D]``), whose chunk keys
  are their means (HCAM's chunk *summaries*) and whose pending chunk is HCAM's accumulator of the unfinished chunk.
  The bank's values are unused (one channel of zeros, 1/D of the contents' bytes);
* ``backbone_cache``: the backbone's ``DynamicCache`` of the current segment (reset at every segment boundary);
* ``segment_mask`` ``[b, fill]``: real tokens of the current segment (the backbone's attention mask);
* ``real_tokens`` ``[b]``: real tokens seen per row (the position of a query in its row's token stream, which decides
  which chunks it sees).

With ``offload=True`` the stores live in CPU memory and ``summaries`` keeps a copy of
each store's chunk summaries ``[b, max_chunks, D]`` on the compute device, updated slot by slot as chunks are written:
scoring reads only those, and a step copies to the device only the chunks it attends to in detail.

``get_seq_length()`` counts every token processed (padding included). Segment boundaries and chunk visibility depend
only on token counts, so one call, pieces and token-by-token decoding compute the same thing.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from hf_longmem.memory.accounting import OFFLOADED, RESIDENT, MemoryParts, MemoryReport, tensor_bytes
from hf_longmem.memory.memory_bank import ChunkMemoryBank
from hf_longmem.modeling.padding import RowGroupsMixin


class HCAMCache(MemoryReport, RowGroupsMixin, Cache):
    """HCAM's generation state (see the module docstring).

    Args:
        config: the model's :class:`~hf_longmem.modeling.hcam.configuration_hcam.HCAMConfig`.
        offload: keep the chunk contents in CPU memory (default ``config.memory_offload``).
    """

    def __init__(self, config, offload: bool | None = None):
        super().__init__(layers=[])
        self.offload = bool(config.memory_offload if offload is None else offload)
        self.summaries: list[torch.Tensor | None] = [None] * len(config.memory_layers)
        backbone_config = config.require_backbone_config()
        self.backbone_config = backbone_config
        self.memory_layers = list(config.memory_layers)
        self.segment_length = config.segment_length
        self.chunk_size = config.chunk_size
        self.max_chunks = config.max_chunks
        self.stores = [
            ChunkMemoryBank(1, backbone_config.hidden_size, config.chunk_size, config.memory_size, value_dim=1)
            for _ in self.memory_layers
        ]
        self.seen_tokens = 0
        self.real_tokens: torch.Tensor | None = None
        self.row_groups = None
        self.missing_segment_kv = False  # set by a gradient-checkpointed forward that ended inside a segment
        self._new_segment()

    # ------------------------------------------------------------------------------------------------ chunk stores
    def write(self, index: int, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Append memory layer ``index``'s normalised inputs ``x [b, T, D]`` (real tokens: ``mask [b, T]``) to its
        store (in CPU memory when offloading) and bring the device copy of its summaries up to date."""
        store = self.stores[index]
        home = torch.device("cpu") if self.offload else x.device
        before = None if store.written is None else store.written.clone()
        keys = x[:, None].to(home)
        store.write(keys, keys.new_zeros(*keys.shape[:3], 1), mask.to(home))
        if self.offload:
            self._mirror(index, before, x.device)

    def _mirror(self, index: int, before: torch.Tensor | None, device: torch.device) -> None:
        """Copy the summaries of the chunks written since ``before`` (``[b]`` chunk counts) to ``device``."""
        store = self.stores[index]
        if store.chunk_keys is None:
            return
        if self.summaries[index] is None:
            self.summaries[index] = store.chunk_keys[:, 0].to(device, copy=True)
            return
        new = store.written - (0 if before is None else before)
        count = int(new.clamp(max=store.max_chunks).max())
        if count == 0:
            return
        step = torch.arange(count)[None, :]
        keep = step < new[:, None]
        slots = (store.written[:, None] - count + step) % store.max_chunks  # the last `count` chunks of each row
        keep = keep.flip(1)  # the newest `new[r]` of them are the ones written now
        rows = torch.arange(store.batch_size)[:, None].expand_as(slots)
        rows, slots = rows[keep], slots[keep]
        self.summaries[index][rows.to(device), slots.to(device)] = store.chunk_keys[rows, 0, slots].to(device)

    def _new_segment(self) -> None:
        self.backbone_cache = DynamicCache(config=self.backbone_config)
        self.segment_mask: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ segment state
    @property
    def segment_fill(self) -> int:
        """Tokens (real or padding) of the current segment seen so far."""
        return 0 if self.segment_mask is None else self.segment_mask.shape[1]

    def advance(self, mask: torch.Tensor) -> None:
        """Account for the new tokens ``mask [b, T]`` (True: real) once their forward is done."""
        count = mask.long().sum(dim=1)
        self.real_tokens = count if self.real_tokens is None else self.real_tokens + count
        self.segment_mask = mask if self.segment_mask is None else torch.cat((self.segment_mask, mask), dim=1)
        self.seen_tokens += mask.shape[1]
        if self.segment_fill == self.segment_length:
            self._new_segment()

    def query_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """``[b, T]`` index of each new token among its row's real tokens (pads repeat the previous index)."""
        before = 0 if self.real_tokens is None else self.real_tokens[:, None].to(mask.device)
        return before + mask.long().cumsum(dim=1) - 1

    # ------------------------------------------------------------------------------------------------ Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int | None:
        return None

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def batch_size(self) -> int:
        if self.row_groups is not None:
            return sum(int(rows.numel()) for rows, _, _ in self.row_groups)
        return -1 if self.real_tokens is None else self.real_tokens.shape[0]

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("HCAMCache cannot be cropped: finished chunks are already in the memory")

    def reset(self) -> None:
        """Forget the memory and the current segment."""
        for store in self.stores:
            store.reset()
        self.summaries = [None] * len(self.stores)
        self.seen_tokens = 0
        self.real_tokens = None
        self.row_groups = None
        self.missing_segment_kv = False
        self._new_segment()

    def memory_parts(self) -> MemoryParts:
        """Bytes held: ``chunk_store`` (every layer's chunk contents, summaries and accumulator; offloaded with
        ``offload``), ``summaries`` (their device copies when offloading), ``segment_kv`` (the
        backbone's keys/values of the current segment) and ``row_groups`` (the caches of a padded batch's groups)."""
        tensors = [self.segment_mask, self.real_tokens]
        for layer in self.backbone_cache.layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        where = OFFLOADED if self.offload else RESIDENT
        return {
            "chunk_store": (where, sum(store.memory_bytes() for store in self.stores)),
            "summaries": (RESIDENT, tensor_bytes(*self.summaries)),
            "segment_kv": (RESIDENT, tensor_bytes(*tensors)),
            "row_groups": (RESIDENT, sum(group.memory_bytes() for _, _, group in self.row_groups or ())),
        }

    def _select(self, rows: torch.Tensor) -> None:
        if self.row_groups is not None:
            return self.regroup_rows(rows)
        for store in self.stores:
            store.index_select(rows.to(store.written.device) if store.written is not None else rows)
        self.summaries = [None if s is None else s.index_select(0, rows.to(s.device)) for s in self.summaries]
        if self.real_tokens is not None:
            rows = rows.to(self.real_tokens.device)
            self.real_tokens = self.real_tokens.index_select(0, rows)
        if self.segment_mask is not None:
            self.segment_mask = self.segment_mask.index_select(0, rows.to(self.segment_mask.device))
        self.backbone_cache.batch_select_indices(rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search)."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.row_groups is not None:
            return self.repeat_row_groups(repeats)
        rows = torch.arange(max(self.batch_size, 1)).repeat_interleave(repeats)
        self._select(rows)


__all__ = ["HCAMCache"]
