"""Triton path for channel-pruned attention: the flash-decoding kernel with the query gathered per KV head.

The pruned slots and the optional full-width tail are two launches of the same kernel (the first with
``HAS_CHANNEL_INDEX``), merged exactly by their log-sum-exp.
"""

from __future__ import annotations

import torch

from hf_longmem.kernels.decode_attention.reference import merge_attention
from hf_longmem.kernels.decode_attention.triton import decode_attention_fwd


def _as_3d(valid: torch.Tensor | None) -> torch.Tensor | None:
    return valid[:, None] if valid is not None and valid.dim() == 2 else valid


def triton_channel_attention(
    query: torch.Tensor,
    keys_pruned: torch.Tensor,
    channel_index: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    causal_new: bool = True,
    keys_full: torch.Tensor | None = None,
    values_full: torch.Tensor | None = None,
    valid_full: torch.Tensor | None = None,
    softcap: float | None = None,
    *,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`~hf_longmem.kernels.channel_attention.reference.naive_channel_attention` (unchecked)."""
    num_q, num_pruned = query.shape[-2], keys_pruned.shape[-2]
    num_full = 0 if keys_full is None else keys_full.shape[-2]
    # Union slot j is visible to query i iff j <= n + r - q + i; per part, in its own slot numbering:
    offset = num_pruned + num_full - num_q
    pruned_offset = offset if causal_new and offset < num_pruned - 1 else None  # None: no pruned slot is cut
    tiling = {"softcap": softcap, "block_n": block_n, "num_splits": num_splits}
    out, lse = decode_attention_fwd(
        query, keys_pruned, values, scaling, _as_3d(valid), pruned_offset, channel_index, **tiling
    )
    if keys_full is None:
        return out, lse
    full = decode_attention_fwd(
        query,
        keys_full,
        values_full,
        scaling,
        _as_3d(valid_full),
        offset - num_pruned if causal_new else None,
        **tiling,
    )
    return merge_attention(out, lse, *full)
