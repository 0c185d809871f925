"""The cache LongMem keeps during ``generate``: the memory bank plus the local state of the current segment.

``LongMemBankCache`` holds

* ``bank``: the :class:`hf_longmem.memory.memory_bank.ChunkMemoryBank` of earlier segments (and of documents given to
  ``model.memorize``);
* ``backbone_cache``: the backbone's ``DynamicCache`` for the current segment only (reset at every segment boundary:
  the backbone never attends across segments);
* ``sidenet_kv``: per SideNet layer the rotated keys and values ``[b, Hkv, fill, d]`` of the current segment;
* ``segment_keys`` / ``segment_values`` ``[b, Hkv, fill, d]``: the retrieval layer's un-rotated keys/values of the
  current segment, written to the bank when the segment is complete; ``segment_mask`` ``[b, fill]``: real tokens.

``get_seq_length()`` counts the tokens the model has processed in this sequence (memorized documents are not part of
the sequence). Segment boundaries fall at multiples of ``segment_length`` of that count, so processing an input in one
call, in pieces, or token by token gives the same result.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from hf_longmem.memory.accounting import RESIDENT, MemoryParts, MemoryReport, tensor_bytes
from hf_longmem.memory.memory_bank import ChunkMemoryBank
from hf_longmem.modeling.padding import RowGroupsMixin


class LongMemBankCache(MemoryReport, RowGroupsMixin, Cache):
    """LongMem's generation state (see the module docstring).

    Args:
        config: the model's :class:`LongMemConfig`.
        bank: an existing bank to continue from (e.g. filled by ``model.memorize``); default: an empty one.
    """

    def __init__(self, config, bank: ChunkMemoryBank | None = None):
        super().__init__(layers=[])
        backbone_config = config.require_backbone_config()
        heads = backbone_config.num_attention_heads
        self.num_kv_heads = getattr(backbone_config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(backbone_config, "head_dim", None) or backbone_config.hidden_size // heads
        if bank is None:
            bank = ChunkMemoryBank(self.num_kv_heads, self.head_dim, config.chunk_size, config.memory_size)
        elif (bank.num_heads, bank.head_dim, bank.chunk_size) != (self.num_kv_heads, self.head_dim, config.chunk_size):
            raise ValueError(
                f"bank has (heads, head_dim, chunk_size) = {(bank.num_heads, bank.head_dim, bank.chunk_size)}, the "
                f"model needs {(self.num_kv_heads, self.head_dim, config.chunk_size)}"
            )
        self.bank = bank
        self.segment_length = config.segment_length
        self.backbone_config = backbone_config
        self.num_sidenet_layers = config.num_sidenet_layers
        self.seen_tokens = 0
        # Left-padded batches (hf_longmem.modeling.padding): rows grouped by their padding, each group an unpadded
        # batch with its own LongMemBankCache; ``None`` for an unpadded batch (the fields above hold the state).
        self.row_groups = None
        self._new_segment()

    def bank_rows(self, rows: torch.Tensor) -> ChunkMemoryBank:
        """A copy of the bank restricted to the batch rows ``rows`` (an empty bank stays empty)."""
        bank = ChunkMemoryBank.from_state_dict(self.bank.state_dict())
        bank.index_select(rows)
        return bank

    def _new_segment(self) -> None:
        self.backbone_cache = DynamicCache(config=self.backbone_config)
        self.sidenet_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_sidenet_layers
        self.segment_keys: torch.Tensor | None = None
        self.segment_values: torch.Tensor | None = None
        self.segment_mask: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ segment state
    @property
    def segment_fill(self) -> int:
        """Tokens (real or padding) of the current segment seen so far."""
        return 0 if self.segment_mask is None else self.segment_mask.shape[1]

    def append_segment(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Record the retrieval layer's keys/values ``[b, Hkv, T, d]`` and mask ``[b, T]`` of new tokens."""
        if self.segment_mask is None:
            self.segment_keys, self.segment_values, self.segment_mask = keys, values, mask
        else:
            self.segment_keys = torch.cat((self.segment_keys, keys), dim=2)
            self.segment_values = torch.cat((self.segment_values, values), dim=2)
            self.segment_mask = torch.cat((self.segment_mask, mask), dim=1)
        self.seen_tokens += mask.shape[1]

    def finish_segment(self) -> None:
        """Write the complete segment to the bank (after its forward pass, as LongMem does) and start a new one."""
        if self.segment_mask is not None:
            self.bank.write(self.segment_keys, self.segment_values, self.segment_mask)
        self._new_segment()

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
        if self.segment_mask is not None:
            return self.segment_mask.shape[0]
        return self.bank.batch_size or -1

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("LongMemBankCache cannot be cropped: segments already written to the memory bank stay there")

    def reset(self) -> None:
        """Empty the bank and the current segment."""
        self.bank.reset()
        self.seen_tokens = 0
        self.row_groups = None
        self._new_segment()

    def memory_parts(self) -> MemoryParts:
        """Bytes held: ``bank`` (the memory bank), ``segment_kv`` (the current segment's backbone, SideNet and
        retrieval-layer keys/values) and ``row_groups`` (the caches of row groups, padded batches)."""
        tensors = [self.segment_keys, self.segment_values, self.segment_mask]
        tensors += [t for kv in self.sidenet_kv if kv is not None for t in kv]
        for layer in self.backbone_cache.layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        return {
            "bank": (RESIDENT, self.bank.memory_bytes()),
            "segment_kv": (RESIDENT, tensor_bytes(*tensors)),
            "row_groups": (RESIDENT, sum(group.memory_bytes() for _, _, group in self.row_groups or ())),
        }

    def _select(self, rows: torch.Tensor) -> None:
        if self.row_groups is not None:
            return self.regroup_rows(rows)
        self.bank.index_select(rows)
        if self.segment_mask is not None:
            self.segment_keys = self.segment_keys.index_select(0, rows)
            self.segment_values = self.segment_values.index_select(0, rows)
            self.segment_mask = self.segment_mask.index_select(0, rows)
        self.sidenet_kv = [
            None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows)) for kv in self.sidenet_kv
        ]
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
