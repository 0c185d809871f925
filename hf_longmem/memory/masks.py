"""Attention masks built from a layer's own slot metadata.

transformers builds one mask per forward, sized for the first full-attention layer. A layer that stores a different
number of tokens (PyramidKV's per-layer budgets) rebuilds its mask from the positions it keeps.
"""

from __future__ import annotations

import torch

from hf_longmem.memory.padding import PAD_POSITION


def slot_mask(
    positions: torch.Tensor,
    num_new: int,
    additive_dtype: torch.dtype | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``[batch, 1 or kv_heads, q, n]`` mask for ``q = num_new`` queries (the last ``num_new`` slots) over ``n`` slots.

    A query sees every stored real slot, and the new real slots up to itself (causal). A pad query sees itself
    only, so no row is fully masked (a NaN there would reach real rows through ``0 * NaN``). With
    ``sliding_window`` a query at true position ``p`` also sees only keys at true positions ``> p - sliding_window``
    (transformers' sliding-window mask, on the positions the slots hold rather than on their columns, so it stays
    right after eviction).

    Args:
        positions: ``[batch, n]`` true positions (``[batch, kv_heads, n]`` when heads keep different tokens),
            ``PAD_POSITION`` for pads.
        num_new: number of queries.
        additive_dtype: ``None`` for a boolean mask (SDPA), else a float dtype for an additive mask (eager).
        sliding_window: the layer's attention window, or ``None`` (full attention). A pad query (position -1) is
            within every window, so it still sees itself.
    """
    n = positions.shape[-1]
    device = positions.device
    per_head = positions if positions.ndim == 3 else positions[:, None]  # [b, h', n]
    query_slot = torch.arange(n - num_new, n, device=device)[:, None]  # [q, 1]
    key_slot = torch.arange(n, device=device)[None, :]  # [1, n]
    causal = key_slot <= query_slot  # [q, n]
    real = per_head != PAD_POSITION  # [b, h', n]
    allowed = causal & real[:, :, None, :]  # [b, h', q, n]
    if sliding_window is not None:
        query_pos = per_head[..., -num_new:, None].long()  # [b, h', q, 1]
        allowed = allowed & (query_pos - per_head[:, :, None, :].long() < sliding_window)
    allowed = allowed | (key_slot == query_slot)
    if additive_dtype is None:
        return allowed
    return torch.zeros_like(allowed, dtype=additive_dtype).masked_fill(~allowed, torch.finfo(additive_dtype).min)
