"""Short causal depthwise convolution over packed per-memory token streams (MoM's q/k/v conv), with SiLU.

In MoM the conv runs over each memory's own stream of routed tokens (as in the official code and fla's
``ShortConvolution`` with ``cu_seqlens``), so each memory keeps its own conv state: the last ``W - 1`` pre-conv
vectors it received.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def stream_short_conv(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal conv over right-padded streams, continuing from ``state``.

    Args:
        x: ``[streams, L, C]`` pre-conv features; slot ``l >= lengths[s]`` is padding (it never reaches an earlier
            output: the conv is causal).
        weight: ``[C, W]`` depthwise kernel (tap ``W - 1`` multiplies the current token).
        state: ``[streams, C, W - 1]`` the previous ``W - 1`` inputs of each stream (oldest first), or ``None``.
        lengths: ``[streams]`` real tokens per stream.

    Returns:
        ``silu(conv) [streams, L, C]`` and the new state ``[streams, C, W - 1]`` (the last ``W - 1`` real inputs;
        unchanged for an empty stream).
    """
    streams, length, channels = x.shape
    width = weight.shape[-1]
    if state is None:
        state = x.new_zeros(streams, channels, width - 1)
    full = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=2)  # [s, C, W-1+L]
    out = F.conv1d(full, weight[:, None, :].to(x.dtype), groups=channels)  # [s, C, L]
    tail = lengths[:, None] + torch.arange(width - 1, device=x.device)  # last W-1 real inputs of `full`
    new_state = full.gather(2, tail[:, None, :].expand(-1, channels, -1))
    return F.silu(out).transpose(1, 2), new_state


def step_short_conv(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, update: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per stream; a stream whose ``update`` is False keeps its state (its output is unused).

    Args:
        x: ``[streams, C]``; weight: ``[C, W]``; state: ``[streams, C, W - 1]`` or ``None``; update: ``[streams]`` bool.

    Returns:
        ``silu(conv) [streams, C]`` and the new state.
    """
    width = weight.shape[-1]
    if state is None:
        state = x.new_zeros(*x.shape, width - 1)
    window = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)  # [s, C, W]
    out = F.silu((window * weight.to(x.dtype)).sum(-1))
    new_state = torch.where(update[:, None, None], window[..., 1:], state.to(x.dtype))
    return out, new_state
