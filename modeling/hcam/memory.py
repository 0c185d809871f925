"""Which chunks the queries of one forward call read: the stored ones plus those the call itself completes.

A query at position ``t`` of its row's token stream (real tokens only) sees chunk ``g`` (the ``g``-th chunk of the
stream, tokens ``g*C .. g*C + C - 1``) when the chunk is complete before it and among the ``max_chunks`` most recent
complete ones::

    t // C - max_chunks <= g < t // C

(a chunk is written after the step that completes it, as the agent writes its accumulator). A call reads the chunks
its store already holds and the chunks it completes itself (the store's pending tokens followed by the call's real
tokens), so one call over a long input sees what token-by-token decoding sees; the store is written after the call.
"""

from __future__ import annotations

import torch

from hf_longmem.memory.memory_bank import ChunkMemoryBank


def stored_chunk_index(store: ChunkMemoryBank) -> torch.Tensor | None:
    """``[b, n]`` stream index ``g`` of the chunk in each ring slot of ``store`` (``-1`` for empty slots), ``n`` the
    most chunks a row holds; ``None`` before the first write."""
    if store.written is None:
        return None
    held = store.num_chunks()
    n = int(held.max())
    if n == 0:
        return None
    slots = torch.arange(n, device=held.device)[None, :]
    last = store.written[:, None] - 1  # the newest chunk, in slot last % max_chunks
    index = last - torch.remainder(last - slots, store.max_chunks)
    return index.masked_fill(slots >= held[:, None], -1)


def new_chunks(store: ChunkMemoryBank, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The chunks completed by the store's pending tokens followed by the real tokens of ``x``.

    Args:
        x: ``[b, T, D]`` new contents (constants).
        mask: ``[b, T]`` bool, real tokens.

    Returns:
        ``(contents [b, n, C, D], index [b, n])`` with ``index`` the stream index of each chunk (``-1`` past a row's
        complete chunks), or ``None`` when no row completes a chunk.
    """
    b, t, d = x.shape
    c = store.chunk_size
    if store.written is None:
        pending = torch.zeros(b, dtype=torch.long, device=x.device)
        written = torch.zeros(b, dtype=torch.long, device=x.device)
        pending_x = x.new_zeros(b, c, d)
    else:
        pending, written = store.pending_count.to(x.device), store.written.to(x.device)
        pending_x = store.pending_keys[:, 0].to(x.device, x.dtype)
    complete = (pending + mask.sum(dim=1)) // c
    n = int(complete.max())
    if n == 0:
        return None
    width = -(-(c + t) // c) * c
    position = pending[:, None] + mask.long().cumsum(dim=1) - 1
    position = torch.where(mask, position, torch.full_like(position, width))  # padding -> a dump column
    stream = x.new_zeros(b, width + 1, d)
    stream[:, :c] = pending_x
    stream.scatter_(1, position[:, :, None].expand(b, t, d), x)
    contents = stream[:, : n * c].view(b, n, c, d)
    chunk = torch.arange(n, device=x.device)[None, :]
    index = torch.where(chunk < complete[:, None], written[:, None] + chunk, torch.full_like(chunk, -1))
    return contents, index


def read_set(
    store: ChunkMemoryBank, x: torch.Tensor, mask: torch.Tensor, summaries: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Contents ``[b, N, C, D]``, summaries ``[b, N, D]`` and stream indices ``[b, N]`` of every chunk a query of this
    call may read (stored chunks first, then the ones the call completes); ``None`` when there is none.

    Contents stay where the store keeps them (the CPU when offloaded); summaries and indices are on ``x``'s device
    (``summaries``: a copy of the store's chunk summaries kept there, ``[b, max_chunks, D]``; ``None``: the store's
    own). With gradients enabled the stored tensors are copied (the store is written in place later, and autograd
    keeps what the branch read); without, they are views of the store (decoding reads only the chunks it chooses)."""
    parts = []
    stored = stored_chunk_index(store)
    home = x.device if store.keys is None else store.keys.device
    copy = torch.is_grad_enabled()
    if stored is not None:
        n = stored.shape[1]
        contents = store.keys[:, 0, :n].to(dtype=x.dtype, copy=copy)
        source = store.chunk_keys[:, 0, :n] if summaries is None else summaries[:, :n]
        parts.append((contents, source.to(x.device, x.dtype, copy=copy), stored.to(x.device)))
    fresh = new_chunks(store, x, mask)
    if fresh is not None:
        contents, index = fresh
        # the mean as the store computes it when it writes the chunk
        mean = (contents * 1.0).sum(dim=2) / store.chunk_size
        parts.append((contents.to(home), mean, index))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(items, dim=1) for items in zip(*parts))


def visible_chunks(index: torch.Tensor, positions: torch.Tensor, chunk_size: int, max_chunks: int) -> torch.Tensor:
    """``[b, T, N]`` bool: query at stream position ``positions [b, T]`` may read chunk ``index [b, N]``."""
    current = torch.div(positions, chunk_size, rounding_mode="floor")[:, :, None]  # chunks complete before t
    g = index[:, None, :]
    return (g >= 0) & (g < current) & (g >= current - max_chunks)


__all__ = ["new_chunks", "read_set", "stored_chunk_index", "visible_chunks"]
