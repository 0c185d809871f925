"""Left-padded batches for the segment-recurrent architectures (HMT, LongMem).

Their caches advance all rows of a batch in lockstep (one segment position, one bank write per segment), so a
left-padded row would be segmented at other tokens than the same row alone. Instead, rows are grouped by their number
of padding tokens: each group is an *unpadded* batch of its real tokens, run with its own cache, and so segmented from
its own first token, exactly as alone. The parent cache keeps the groups (:class:`RowGroupsMixin`), reorders and
repeats them for beam search, and the model scatters the groups' outputs back into the batch (zeros at padding).

Shapes: ``B`` rows, ``T`` new tokens, ``seen`` tokens before them (padding included).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def left_padding(attention_mask: torch.Tensor | None, length: int, seen: int, recorded: torch.Tensor | None):
    """Padding tokens per row ``[B]`` of a left-padded batch, or ``None`` for a batch without left padding.

    Right padding (ones then zeros in every row, as training batches are padded) is not left padding: a causal model's
    outputs at the real tokens do not depend on what follows them, so the caller runs such a batch as it is (``None``).

    Args:
        attention_mask: ``[B, seen + T]`` (1 = real token) or ``None``; once there is left padding it must cover every
            token so far and be zeros then ones in every row (left padding, as ``generate`` pads).
        length: ``T``.
        seen: tokens the cache has seen (padding included).
        recorded: the padding recorded on earlier calls (``RowGroupsMixin.group_padding``), ``None`` if none.

    Raises:
        ValueError: right/inner padding, a mask that does not cover all tokens, padding that differs from the earlier
            calls, or padding appearing after an unpadded start.
    """
    if attention_mask is None or bool(attention_mask.all()):
        if recorded is None:
            return None
        if attention_mask is None:
            raise ValueError("this cache holds a left-padded batch: pass its attention_mask ([batch, seen + T])")
    if recorded is None and attention_mask.dim() == 2 and bool(attention_mask[:, 0].bool().all()):
        mask = attention_mask.bool()
        if not bool((mask[:, 1:] <= mask[:, :-1]).all()):  # every row ones then zeros
            raise ValueError("attention_mask: padding inside a row (only left or right padding is supported)")
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] != seen + length:
        raise ValueError(
            f"attention_mask of a padded batch must be [batch, {seen + length}] (seen {seen} + new {length} tokens), "
            f"got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    pads = (~mask).sum(dim=1)
    columns = torch.arange(mask.shape[1], device=mask.device)
    if not bool((mask == (columns[None, :] >= pads[:, None])).all()):
        raise ValueError(
            "attention_mask: a left-padded batch must be left padding only (zeros before the first real token of a "
            "row, none after)"
        )
    if recorded is not None:
        if not torch.equal(pads, recorded.to(pads.device)):
            raise ValueError("attention_mask: the rows' padding differs from the earlier calls on this cache")
    elif seen > 0:
        raise ValueError("attention_mask has padding but this cache started without: pad the first call only")
    return pads


class RowGroupsMixin:
    """For a cache that may hold a left-padded batch as groups of rows with equal padding.

    ``row_groups``: ``None`` (an unpadded batch; the cache's own fields hold the state) or a list of
    ``(rows [g] sorted, pad, cache)``: the rows of the batch with ``pad`` padding tokens and their own cache.
    """

    row_groups: list[tuple[torch.Tensor, int, Cache]] | None = None

    def group_padding(self) -> torch.Tensor | None:
        """``[B]`` padding per row recorded by the groups (``None`` when the batch is not padded)."""
        if self.row_groups is None:
            return None
        batch = sum(int(rows.numel()) for rows, _, _ in self.row_groups)
        pads = torch.zeros(batch, dtype=torch.long, device=self.row_groups[0][0].device)
        for rows, pad, _ in self.row_groups:
            pads[rows] = pad
        return pads

    def make_row_groups(self, pads: torch.Tensor, new_cache) -> None:
        """Group rows by ``pads`` ``[B]``; ``new_cache(rows)`` builds the cache of a group."""
        self.row_groups = []
        for pad in torch.unique(pads).tolist():
            rows = (pads == pad).nonzero().flatten()
            self.row_groups.append((rows, int(pad), new_cache(rows)))

    def regroup_rows(self, source: torch.Tensor) -> None:
        """New row ``i`` is old row ``source[i]`` (beam reordering, row selection). Rows keep the group of their
        padding, so each group's cache is reordered within the group (a beam never changes its padding)."""
        source = torch.as_tensor(source)
        if source.dtype == torch.bool:
            source = source.nonzero().flatten()
        groups = []
        for rows, pad, group in self.row_groups:
            rows = rows.to(source.device)
            new_rows = torch.isin(source, rows).nonzero().flatten()
            if new_rows.numel():
                group.reorder_cache(torch.searchsorted(rows, source[new_rows]))
                groups.append((new_rows, pad, group))
        self.row_groups = groups

    def repeat_row_groups(self, repeats: int) -> None:
        """Every row ``r`` becomes rows ``r * repeats .. r * repeats + repeats - 1`` (``generate``'s expansion)."""
        for index, (rows, pad, group) in enumerate(self.row_groups):
            group.batch_repeat_interleave(repeats)
            rows = (rows[:, None] * repeats + torch.arange(repeats, device=rows.device)).flatten()
            self.row_groups[index] = (rows, pad, group)


def scatter_rows(full: torch.Tensor | None, rows: torch.Tensor, skip: int, part: torch.Tensor, shape) -> torch.Tensor:
    """Write a group's ``part`` ``[g, T - skip, ...]`` into rows ``rows``, columns ``skip:`` of ``full`` (zeros of
    ``shape`` with ``part``'s dtype when ``None``)."""
    if full is None:
        full = part.new_zeros((*shape[:2], *part.shape[2:]))
    full[rows, skip:] = part
    return full


__all__ = ["RowGroupsMixin", "left_padding", "scatter_rows"]
