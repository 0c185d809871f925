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


def tensor_version(tensor: torch.Tensor) -> int | None:
    """``tensor._version`` (bumped by every in-place change), ``None`` for an inference tensor (it has none)."""
    return None if tensor.is_inference() else tensor._version


class _SeenStep:
    """One memoised :func:`advance_seen` result (the inputs held, so that identity means the same tensors)."""

    __slots__ = ("position_ids", "position_version", "real_seen", "seen_version", "num_new", "result")

    def __init__(self, position_ids, real_seen, num_new, result):
        self.position_ids, self.real_seen, self.num_new, self.result = position_ids, real_seen, num_new, result
        self.position_version = None if position_ids is None else tensor_version(position_ids)
        self.seen_version = tensor_version(real_seen)

    def matches(self, position_ids, real_seen, num_new) -> bool:
        return (
            self.position_ids is position_ids
            and self.real_seen is real_seen
            and self.num_new == num_new
            and (position_ids is None or tensor_version(position_ids) == self.position_version)
            and tensor_version(real_seen) == self.seen_version
        )


#: Results of the latest :func:`advance_seen` calls: the layers of one forward pass the same ``position_ids`` with the
#: same ``real_seen`` (the tensor the previous step handed to all of them), so only the first layer checks.
_SEEN_MEMO: list[_SeenStep] = []
_SEEN_MEMO_SIZE = 4


def advance_seen(
    position_ids: torch.Tensor | None, real_seen: torch.Tensor, num_new: int, batch_size: int
) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """:func:`positions_and_padding` plus the real tokens seen after this step, ``[batch]``.

    Memoised on the input tensors (by identity and version; they are never modified in place here): every layer of a
    forward gets the same ``position_ids``, and a layer that stored the ``real_seen`` returned here for the previous
    step passes that same tensor, so the check and the addition run once per step, not once per layer, and the
    layers share the result. Raises what :func:`positions_and_padding` raises.
    """
    for entry in _SEEN_MEMO:
        if entry.matches(position_ids, real_seen, num_new):
            return entry.result
    positions, pads = positions_and_padding(position_ids, real_seen, num_new, batch_size)
    after = real_seen + ((positions != PAD_POSITION).sum(1) if pads else num_new)
    result = (positions, pads, after)
    _SEEN_MEMO.insert(0, _SeenStep(position_ids, real_seen, num_new, result))
    del _SEEN_MEMO[_SEEN_MEMO_SIZE:]
    return result


_ZERO_SEEN: list[torch.Tensor] = []


def zero_seen(batch_size: int, device) -> torch.Tensor:
    """``[batch]`` int64 zeros, the same tensor for every layer that starts with this batch size and device, so that
    :func:`advance_seen`'s memo serves all of them from the first step on (``real_seen`` is never modified in place;
    a modified one is not reused)."""
    device = torch.device(device)
    if torch.is_inference_mode_enabled():
        # an inference tensor has no version counter: an in-place change of a shared one could not be seen, so
        # every layer starts from its own zeros (the memo then serves no other layer: correct, only slower)
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    if _ZERO_SEEN:
        zeros = _ZERO_SEEN[0]
        if zeros.shape == (batch_size,) and zeros.device == device and tensor_version(zeros) == 0:
            return zeros
    zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
    _ZERO_SEEN[:] = [zeros]
    return zeros


_SLOT_POSITIONS: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []


def slot_positions(positions: torch.Tensor, heads: int) -> torch.Tensor:
    """``[batch, q]`` positions as the int32 per-head slot positions ``[batch, heads, q]`` a layer stores (a view).

    Memoised on the input tensor (identity and version): the layers of a forward convert the same positions that
    :func:`advance_seen` handed to all of them once. The result must not be modified in place.
    """
    for source, version, count, converted in _SLOT_POSITIONS:
        if source is positions and version == tensor_version(positions) and count == heads:
            return converted
    converted = positions.to(torch.int32)[:, None, :].expand(-1, heads, -1)
    _SLOT_POSITIONS[:] = [(positions, tensor_version(positions), heads, converted), *_SLOT_POSITIONS[:1]]
    return converted


_TAIL_POSITIONS: list[tuple[torch.Tensor, int | None, int, int, torch.Tensor]] = []


def tail_positions(start: torch.Tensor, count: int, heads: int) -> torch.Tensor:
    """The int32 slot positions ``[batch, heads, count]`` of ``count`` real tokens decoded from ``start`` on (``[batch]``,
    each row's first position): ``start + 0, ..., start + count - 1`` (a broadcast view).

    Memoised on ``start`` (identity and version), like :func:`slot_positions`: the layers that keep their decoding
    positions lazily all start from the ``real_seen`` tensor :func:`advance_seen` handed to each of them, so the
    layers of a forward build the tail once. The result must not be modified in place.
    """
    version = tensor_version(start)
    for source, source_version, source_count, source_heads, tail in _TAIL_POSITIONS:
        if source is start and source_version == version and source_count == count and source_heads == heads:
            return tail
    first = start.view(-1, 1, 1).to(torch.int32)
    tail = (first if count == 1 else first + torch.arange(count, device=start.device, dtype=torch.int32)).expand(
        -1, heads, -1
    )
    _TAIL_POSITIONS[:] = [(start, version, count, heads, tail), *_TAIL_POSITIONS[:1]]
    return tail
