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
    """``[batch, 1, q, n]`` mask for ``q = num_new`` queries (the last ``num_new`` slots) over ``n`` slots.

    A query sees every stored real slot, and the new real slots up to itself (causal). A pad query sees itself
    only, so no row is fully masked (a NaN there would reach real rows through ``0 * NaN``).

    Args:
        positions: ``[batch, n]`` true positions, ``PAD_POSITION`` for pads.
        num_new: number of queries.
        additive_dtype: ``None`` for a boolean mask (SDPA), else a float dtype for an additive mask (eager).
        sliding_window: a real query at position ``p`` also sees only slots at positions ``> p - sliding_window``
            (transformers' sliding-window overlay, by true positions), or ``None``.
    """
    n = positions.shape[-1]
    device = positions.device
    query_slot = torch.arange(n - num_new, n, device=device)[:, None]  # [q, 1]
    key_slot = torch.arange(n, device=device)[None, :]  # [1, n]
    causal = key_slot <= query_slot  # [q, n]
    real = positions != PAD_POSITION  # [b, n]
    allowed = causal[None] & real[:, None, :]
    if sliding_window is not None:
        query_positions = positions[:, n - num_new :, None].long()  # [b, q, 1]
        in_window = query_positions - positions[:, None, :].long() < sliding_window
        allowed = allowed & (in_window | (query_positions == PAD_POSITION))
    allowed = allowed | (key_slot == query_slot)[None]
    allowed = allowed[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros_like(allowed, dtype=additive_dtype).masked_fill(~allowed, torch.finfo(additive_dtype).min)
