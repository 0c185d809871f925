"""Telling pad tokens from real tokens inside a cache layer.

A cache layer only sees ``position_ids`` (generate builds them as ``attention_mask.cumsum(-1) - 1`` with pads set
to 1). With left padding, the real tokens of a row are the trailing run of consecutive positions that continues
the row's real-token count; everything before that run is padding.
"""

from __future__ import annotations

import torch

PAD_POSITION = -1

_NOT_LEFT_PADDED = (
    "position_ids do not look like left padding (pads after real tokens, or positions that do not continue "
    "the tokens seen); hf_longmem caches need left padding (tokenizer.padding_side='left'), as `generate` "
    "uses, and position_ids that count the real tokens of each row"
)


def positions_and_padding(
    position_ids: torch.Tensor | None, real_seen: torch.Tensor, num_new: int, batch_size: int
) -> tuple[torch.Tensor, bool]:
    """Returns the true position of each new token, ``PAD_POSITION`` for pads, and whether any token is a pad.

    Args:
        position_ids: ``[batch or 1, num_new]`` positions the model uses for the new tokens, or ``None`` (then no row
            is padded and positions continue ``real_seen``).
        real_seen: ``[batch]`` number of real (non-pad) tokens each row has seen before this step.
        num_new: number of new tokens (the query length).
        batch_size: batch size of the key states.

    Returns:
        ``[batch, num_new]`` int64 positions, ``PAD_POSITION`` where the token is a pad, and ``True`` if any token
        is a pad (known without another device sync: the checks below synchronise anyway).

    Raises:
        ValueError: if a row has pads after real tokens (right padding), which a compressed cache cannot tell apart
            from content.
    """
    device = real_seen.device
    if position_ids is None:
        return real_seen[:, None] + torch.arange(num_new, device=device), False
    if num_new == 1 and position_ids.shape == (batch_size, 1) and position_ids.dtype == real_seen.dtype:
        # decoding, the hot path: every row continues its count, so no pad (one comparison, no temporaries)
        if position_ids.device == device and torch.equal(position_ids.view(batch_size), real_seen):
            return position_ids, False
    pos = position_ids.to(device=device, dtype=torch.long).expand(batch_size, num_new)
    if num_new == 1:  # decoding: a token is real iff it continues its row's count
        is_real = pos[:, 0] == real_seen
        if bool(((~is_real) & ((real_seen > 0) | (pos[:, 0] > 1))).any()):
            raise ValueError(_NOT_LEFT_PADDED)
        return torch.where(is_real[:, None], pos, torch.full_like(pos, PAD_POSITION)), True
    steps = torch.arange(num_new, device=device)
    # Length of the trailing run of +1 steps: consecutive[j] says pos[j+1] == pos[j] + 1.
    consecutive = pos[:, 1:] - pos[:, :-1] == 1
    ones = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
    run = torch.cat((consecutive, ones), dim=1).flip(1).to(torch.long).cumprod(1).sum(1)  # [b], >= 1
    first = pos.gather(1, (num_new - run)[:, None]).squeeze(1)
    num_real = torch.where(first == real_seen, run, torch.zeros_like(run))
    is_real = steps[None, :] >= (num_new - num_real)[:, None]
    # Pads come before any real token of the row and carry a fill position (generate uses 1, clamped cumsums 0).
    bad_pad = ~is_real & ((real_seen[:, None] > 0) | (pos > 1))
    if bool(bad_pad.any()):
        raise ValueError(_NOT_LEFT_PADDED)
    return torch.where(is_real, pos, torch.full_like(pos, PAD_POSITION)), not bool(is_real.all())
