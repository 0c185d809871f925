"""HMT's recurrent state as a transformers ``Cache``: what ``generate`` builds by default for an HMT model.

Shapes: ``B`` batch, ``N`` memories, ``d`` hidden size, ``k'`` sensory tokens (``<= sensory_length``), ``r`` tokens
of the current (unfinished) segment.
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache, PretrainedConfig

from hf_longmem.memory.accounting import RESIDENT, MemoryParts, MemoryReport, tensor_bytes
from hf_longmem.modeling.hmt.configuration_hmt import HMTConfig
from hf_longmem.modeling.padding import RowGroupsMixin


class HMTCache(MemoryReport, RowGroupsMixin, Cache):
    """Memory bank, sensory memory and the current segment's backbone key/values.

    State (all per batch row; ``None`` where empty):

    - ``bank`` ``[B, N, T, d]``: memory embeddings ``m_n`` (``T = num_memory_tokens`` each) of the last
      ``N <= capacity`` finished segments, oldest first; appending to a full bank evicts the oldest.
    - ``sensory_embeds`` ``[B, k', d]``: input embeddings of the last ``k' <= sensory_length`` tokens of the previous
      segment (embeddings, not ids, so that ``inputs_embeds`` work as ``input_ids`` do).
    - ``segment_embeds`` ``[B, r, d]``: input embeddings of the current segment's tokens seen so far
      (``0 <= r < segment_length``).
    - ``segment_memory`` ``[B, T, d]``: ``P_n`` of the current segment, recalled from a summary of its first
      ``summary_tokens`` tokens (0 for the initial memory of segment 0 or a ``use_recall=False`` model).
    - ``segment_cache``: a ``DynamicCache`` with the backbone key/values of ``[P_n ‖ sensory ‖ segment_embeds]``.

    ``get_seq_length()`` is the number of tokens seen (``generate`` slices its inputs with it); the backbone only
    ever holds the current segment's key/values, whose positions restart at 0 in every segment.

    Args:
        config: the model's :class:`HMTConfig` (its ``backbone_config`` sizes the per-segment key/value cache).
        num_memories: bank capacity (default ``config.num_memories``; at least 1).
    """

    def __init__(self, config: HMTConfig, num_memories: int | None = None):
        if not isinstance(config, HMTConfig):
            raise ValueError(f"config must be an HMTConfig, got {type(config).__name__}")
        capacity = config.num_memories if num_memories is None else num_memories
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"num_memories must be an integer >= 1, got {num_memories!r}")
        super().__init__(layers=[])
        self.hmt_config = config
        self.backbone_config: PretrainedConfig = config.require_backbone_config()
        self.capacity = capacity
        self.reset()

    # ---- state -----------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything (an empty bank, no segment)."""
        self.bank: torch.Tensor | None = None
        self.sensory_embeds: torch.Tensor | None = None  # [B, k, d] input embeddings of the previous segment's tail
        self.segment_embeds: torch.Tensor | None = None  # [B, r, d] input embeddings of the unfinished segment
        self.segment_memory: torch.Tensor | None = None
        self.summary_tokens = 0
        self.segment_cache: DynamicCache | None = None
        self.seen_tokens = 0
        self.num_segments = 0
        self.batch_size_: int | None = None
        # Left-padded batches (hf_longmem.modeling.padding): rows grouped by their padding, each group an unpadded
        # batch with its own HMTCache; ``None`` for an unpadded batch (the fields above hold the state).
        self.row_groups = None

    @property
    def is_compileable(self) -> bool:  # data-dependent control flow at segment boundaries
        return False

    @property
    def is_linear(self) -> list[bool]:  # generate slices already-seen prompt tokens only for non-linear caches
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def num_memories(self) -> int:
        """Memory embeddings currently in the bank."""
        return 0 if self.bank is None else self.bank.shape[1]

    @property
    def segment_position(self) -> int:
        """Tokens of the current segment seen so far."""
        return 0 if self.segment_embeds is None else self.segment_embeds.shape[1]

    def new_segment_cache(self) -> DynamicCache:
        """An empty key/value cache for one backbone pass over a segment."""
        return DynamicCache(config=self.backbone_config)

    def check_batch(self, batch_size: int) -> None:
        """``ValueError`` naming ``cache`` when ``batch_size`` differs from the rows this cache already holds."""
        if self.batch_size_ is None:
            self.batch_size_ = batch_size
        elif self.batch_size_ != batch_size:
            raise ValueError(f"cache holds {self.batch_size_} rows but the input has batch size {batch_size}")

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens seen so far (the logical length, across all segments)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def memory_parts(self) -> MemoryParts:
        """Bytes really held: ``memory`` (bank, sensory and segment embeddings, ``P_n``), ``segment_kv`` (the
        segment's keys/values) and ``row_groups`` (the caches of row groups, padded batches)."""
        segment_layers = self.segment_cache.layers if self.segment_cache is not None else ()
        return {
            "memory": (
                RESIDENT,
                tensor_bytes(self.bank, self.sensory_embeds, self.segment_embeds, self.segment_memory),
            ),
            "segment_kv": (
                RESIDENT,
                tensor_bytes(*(t for layer in segment_layers for t in (layer.keys, layer.values))),
            ),
            "row_groups": (RESIDENT, sum(group.memory_bytes() for _, _, group in self.row_groups or ())),
        }

    # ---- generate helpers ------------------------------------------------------------------------------------------

    def _select(self, fn) -> None:
        for name in ("bank", "sensory_embeds", "segment_embeds", "segment_memory"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder every per-row tensor (beam search)."""
        if self.row_groups is not None:
            self.regroup_rows(beam_idx)
            self.batch_size_ = int(beam_idx.numel())
            return
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))
        if self.segment_cache is not None:
            self.segment_cache.reorder_cache(beam_idx)
        if self.batch_size_ is not None:
            self.batch_size_ = int(beam_idx.shape[0])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.row_groups is not None:
            self.repeat_row_groups(repeats)
            self.batch_size_ = None if self.batch_size_ is None else self.batch_size_ * repeats
            return
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))
        if self.segment_cache is not None:
            self.segment_cache.batch_repeat_interleave(repeats)
        if self.batch_size_ is not None:
            self.batch_size_ *= repeats

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.row_groups is not None:
            self.regroup_rows(indices)
            self.batch_size_ = sum(int(rows.numel()) for rows, _, _ in self.row_groups)
            return
        self._select(lambda t: t[indices])
        if self.segment_cache is not None:
            self.segment_cache.batch_select_indices(indices)
        if self.batch_size_ is not None:
            self.batch_size_ = int(torch.as_tensor(indices).numel())

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("HMTCache cannot be cropped: finished segments are folded into the memory bank")

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        raise NotImplementedError("HMTCache is not an attention cache: the backbone uses segment_cache")

    def update(self, *args, **kwargs):
        raise NotImplementedError("HMTCache is not an attention cache: the backbone uses segment_cache")

    def __repr__(self) -> str:
        return (
            f"HMTCache(seen={self.seen_tokens}, segments={self.num_segments}, memories={self.num_memories}/"
            f"{self.capacity}, segment_position={self.segment_position})"
        )


__all__ = ["HMTCache"]
