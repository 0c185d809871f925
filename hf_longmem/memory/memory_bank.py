"""Bounded chunked key/value memory bank with exact top-k chunk retrieval (LongMem's ``External_Memory``).

A :class:`ChunkMemoryBank` holds, per row of the batch, a FIFO of past attention keys and values grouped into chunks
of ``chunk_size`` consecutive tokens:

* **Write.** :meth:`ChunkMemoryBank.write` appends the real tokens of a segment (``mask``) to each row's token stream.
  Complete chunks go into a ring buffer of ``max_chunks`` slots; when it is full the OLDEST chunks are overwritten
  (first in, first out). Tokens that do not fill a chunk yet wait in a per-row pending chunk and are completed by the
  next write (so writing a sequence in pieces stores exactly what writing it at once stores); :meth:`flush` stores a
  pending partial chunk right away (its missing tokens are masked out everywhere).
* **Chunk keys.** Each chunk is represented by the mean of its (real) keys, per head, as in LongMem.
* **Retrieval.** :meth:`ChunkMemoryBank.retrieve` scores every stored chunk against every query token and head with
  one GEMM (``q . mean_key``), keeps the exact top ``k`` chunks per (row, head, token) and gathers their keys, values
  and token mask. This replaces the official per-head ``faiss.IndexFlatIP``: the same exact inner-product search,
  without a CPU/GPU index to keep in sync, batched over rows and heads.

Differences from the official ``External_Memory`` (Victorwz/LongMem ``dynamic_memory_with_chunk.py``), which are bug
fixes: every row of the batch has its own memory (the official index mixes the rows of a batch into one store); the
eviction drops exactly the chunks that no longer fit (the official code drops ``2 * bsz * seq_len`` tokens' worth, and
its CPU path allocates the replacement on CUDA); the tail of a segment that does not fill a chunk is kept for the next
write instead of being dropped; padded positions are never stored.

GQA: keys are stored per key/value head (``num_heads``); queries may have a multiple of that many heads, query head
``h`` reading key/value head ``h // (query_heads // num_heads)`` (as in grouped-query attention).

``hf_longmem.kernels.block_topk`` scores ONE query per row against a row's blocks (InfLLM's chunk-mean query); LongMem
retrieves per query token and per head, so the scores here are a batched GEMM; the top-k selection reuses
:func:`hf_longmem.kernels.block_topk.select_topk`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hf_longmem.kernels.block_topk import select_topk
from hf_longmem.memory.accounting import RESIDENT, MemoryParts, MemoryReport, tensor_bytes

__all__ = ["ChunkMemoryBank"]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    return value


class ChunkMemoryBank(MemoryReport):
    """FIFO memory of past keys/values in chunks, per batch row, with chunk-mean keys for exact top-k retrieval.

    Args:
        num_heads: key/value heads ``H``.
        head_dim: key dimension ``d``.
        chunk_size: tokens per chunk ``c`` (LongMem: 4).
        max_tokens: capacity in tokens; a multiple of ``chunk_size`` (``max_chunks = max_tokens // chunk_size``).
        value_dim: value dimension (default ``head_dim``).

    Storage (allocated on the first write, with the batch size, dtype and device of that write):

    * ``keys`` ``[b, H, max_chunks, c, d]``, ``values`` ``[b, H, max_chunks, c, dv]``;
    * ``chunk_keys`` ``[b, H, max_chunks, d]``: mean of the real keys of each chunk;
    * ``token_mask`` ``[b, max_chunks, c]`` bool: which slots of a chunk hold a real token;
    * ``written`` ``[b]`` int64: chunks ever stored per row (slot of the ``i``-th chunk: ``i % max_chunks``);
    * ``pending_keys`` / ``pending_values`` ``[b, H, c, d|dv]`` and ``pending_count`` ``[b]``: the unfinished chunk.
    """

    def __init__(self, num_heads: int, head_dim: int, chunk_size: int, max_tokens: int, value_dim: int | None = None):
        self.num_heads = _check_positive_int("num_heads", num_heads)
        self.head_dim = _check_positive_int("head_dim", head_dim)
        self.chunk_size = _check_positive_int("chunk_size", chunk_size)
        _check_positive_int("max_tokens", max_tokens)
        if max_tokens % chunk_size:
            raise ValueError(f"`max_tokens` ({max_tokens}) must be a multiple of `chunk_size` ({chunk_size})")
        self.max_tokens = max_tokens
        self.max_chunks = max_tokens // chunk_size
        self.value_dim = head_dim if value_dim is None else _check_positive_int("value_dim", value_dim)
        self._clear()

    def _clear(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.chunk_keys: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self.written: torch.Tensor | None = None
        self.pending_keys: torch.Tensor | None = None
        self.pending_values: torch.Tensor | None = None
        self.pending_count: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget everything (the next write sets the batch size again)."""
        self._clear()

    # ------------------------------------------------------------------------------------------------ sizes
    @property
    def batch_size(self) -> int:
        return 0 if self.written is None else self.written.shape[0]

    def num_chunks(self) -> torch.Tensor:
        """``[b]`` chunks held per row (``min(written, max_chunks)``); empty tensor before the first write."""
        if self.written is None:
            return torch.zeros(0, dtype=torch.long)
        return self.written.clamp(max=self.max_chunks)

    def num_tokens(self) -> torch.Tensor:
        """``[b]`` real tokens held per row in stored chunks (pending tokens excluded)."""
        if self.token_mask is None:
            return torch.zeros(0, dtype=torch.long)
        return self.token_mask.sum(dim=(1, 2))

    def is_empty(self) -> bool:
        """True when no row holds a stored chunk."""
        return self.written is None or not bool((self.written > 0).any())

    def memory_parts(self) -> MemoryParts:
        """``{"bank": ("resident", bytes)}``: keys, values, chunk keys, masks, pending chunk, counters."""
        tensors = (
            self.keys,
            self.values,
            self.chunk_keys,
            self.token_mask,
            self.written,
            self.pending_keys,
            self.pending_values,
            self.pending_count,
        )
        return {"bank": (RESIDENT, tensor_bytes(*tensors))}

    # ------------------------------------------------------------------------------------------------ write
    def _allocate(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        h, n, c, d, dv = self.num_heads, self.max_chunks, self.chunk_size, self.head_dim, self.value_dim
        self.keys = torch.zeros(batch, h, n, c, d, dtype=dtype, device=device)
        self.values = torch.zeros(batch, h, n, c, dv, dtype=dtype, device=device)
        self.chunk_keys = torch.zeros(batch, h, n, d, dtype=dtype, device=device)
        self.token_mask = torch.zeros(batch, n, c, dtype=torch.bool, device=device)
        self.written = torch.zeros(batch, dtype=torch.long, device=device)
        self.pending_keys = torch.zeros(batch, h, c, d, dtype=dtype, device=device)
        self.pending_values = torch.zeros(batch, h, c, dv, dtype=dtype, device=device)
        self.pending_count = torch.zeros(batch, dtype=torch.long, device=device)

    def _check_kv(self, keys, values, mask) -> torch.Tensor:
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or not keys.is_floating_point():
            got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"`keys` must be a float tensor [b, H, T, d], got {got}")
        b, h, t, d = keys.shape
        if h != self.num_heads or d != self.head_dim:
            raise ValueError(f"`keys` {tuple(keys.shape)} must have H = {self.num_heads} heads of d = {self.head_dim}")
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (b, h, t, self.value_dim):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"`values` must be [b, H, T, dv] = {(b, h, t, self.value_dim)}, got {got}")
        if t == 0:
            raise ValueError("`keys` must hold at least one token (T >= 1)")
        if self.written is not None and b != self.batch_size:
            raise ValueError(f"`keys` has batch {b}, the bank holds {self.batch_size} rows (call reset() first)")
        if mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=keys.device)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, t):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"`mask` must be a [b, T] = {(b, t)} tensor, got {got}")
        return mask.to(device=keys.device, dtype=torch.bool)

    @torch.no_grad()
    def write(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Append the real tokens of a segment to each row's memory (FIFO eviction of the oldest chunks).

        Args:
            keys: ``[b, H, T, d]`` keys of ``T`` consecutive tokens (stored detached).
            values: ``[b, H, T, dv]``.
            mask: ``[b, T]`` bool/int, ``True`` for real tokens (padding is never stored); ``None``: all real.
        """
        mask = self._check_kv(keys, values, mask)
        b, h, t, _ = keys.shape
        c = self.chunk_size
        if self.written is None:
            self._allocate(b, keys.dtype, keys.device)
        keys = keys.detach().to(self.keys.dtype)
        values = values.detach().to(self.values.dtype)
        pending = self.pending_count
        # Stream position of every token of this write: after the row's pending tokens, real tokens only.
        width = -(-(c + t) // c) * c  # pending (< c) + t tokens, rounded up to whole chunks
        position = pending[:, None] + mask.long().cumsum(dim=1) - 1
        position = torch.where(mask, position, torch.full_like(position, width))  # padding -> dump column
        stream_k = keys.new_zeros(b, h, width + 1, keys.shape[-1])
        stream_v = values.new_zeros(b, h, width + 1, values.shape[-1])
        stream_k[:, :, :c] = self.pending_keys
        stream_v[:, :, :c] = self.pending_values
        stream_k.scatter_(2, position[:, None, :, None].expand(b, h, t, keys.shape[-1]), keys)
        stream_v.scatter_(2, position[:, None, :, None].expand(b, h, t, values.shape[-1]), values)
        num_chunks = width // c
        chunk_k = stream_k[:, :, :width].view(b, h, num_chunks, c, -1)
        chunk_v = stream_v[:, :, :width].view(b, h, num_chunks, c, -1)
        total = pending + mask.sum(dim=1)
        complete = total // c  # [b] new complete chunks per row
        # The unfinished chunk becomes the new pending chunk.
        rows = torch.arange(b, device=keys.device)
        self.pending_keys = chunk_k[rows, :, complete.clamp(max=num_chunks - 1)].clone()
        self.pending_values = chunk_v[rows, :, complete.clamp(max=num_chunks - 1)].clone()
        self.pending_count = total - complete * c
        full = torch.ones(b, num_chunks, c, dtype=torch.bool, device=keys.device)
        self._store(chunk_k, chunk_v, full, complete)

    def _store(self, chunk_k, chunk_v, chunk_mask, count) -> None:
        """Store the first ``count[r]`` chunks of ``chunk_k[r]`` (``[b, H, n, c, d]``) in row ``r``'s ring."""
        n = chunk_k.shape[2]
        index = torch.arange(n, device=count.device)[None, :]
        keep = (index < count[:, None]) & (index >= count[:, None] - self.max_chunks)  # only the newest fit
        rows, chunks = keep.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        slots = (self.written[rows] + chunks) % self.max_chunks
        new_k = chunk_k.permute(0, 2, 1, 3, 4)[rows, chunks]  # [N, H, c, d]
        new_v = chunk_v.permute(0, 2, 1, 3, 4)[rows, chunks]
        new_mask = chunk_mask[rows, chunks]  # [N, c]
        weight = new_mask.to(new_k.dtype)[:, None, :, None]
        mean = (new_k * weight).sum(dim=2) / weight.sum(dim=2).clamp(min=1)
        self.keys[rows, :, slots] = new_k
        self.values[rows, :, slots] = new_v
        self.chunk_keys[rows, :, slots] = mean
        self.token_mask[rows, slots] = new_mask
        self.written += count

    @torch.no_grad()
    def flush(self) -> None:
        """Store every non-empty pending chunk now, as a partial chunk (its missing tokens stay masked)."""
        if self.written is None or not bool((self.pending_count > 0).any()):
            return
        c = self.chunk_size
        has = self.pending_count > 0
        mask = torch.arange(c, device=has.device)[None, :] < self.pending_count[:, None]
        self._store(self.pending_keys[:, :, None], self.pending_values[:, :, None], mask[:, None], has.long())
        self.pending_keys.zero_()
        self.pending_values.zero_()
        self.pending_count.zero_()

    # ------------------------------------------------------------------------------------------------ read
    def chunk_scores(self, queries: torch.Tensor) -> torch.Tensor:
        """``[b, Hq, T, n]`` float32 scores ``q . chunk_key`` of the first ``n`` slots; ``-inf`` for empty ones.

        ``n`` is the largest number of chunks a row holds (slots fill from 0, so later slots are empty in every row).

        Args:
            queries: ``[b, Hq, T, d]`` with ``Hq`` a multiple of ``num_heads``.
        """
        if self.written is None:
            raise ValueError("the memory bank is empty: write() before chunk_scores()/retrieve()")
        if not isinstance(queries, torch.Tensor) or queries.dim() != 4 or not queries.is_floating_point():
            got = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise ValueError(f"`queries` must be a float tensor [b, Hq, T, d], got {got}")
        b, hq, t, d = queries.shape
        if b != self.batch_size or d != self.head_dim or hq % self.num_heads:
            raise ValueError(
                f"`queries` {tuple(queries.shape)} must be [b={self.batch_size}, Hq, T, d={self.head_dim}] "
                f"with Hq a multiple of {self.num_heads}"
            )
        groups = hq // self.num_heads
        held = self.num_chunks()
        n = max(int(held.max()), 1)
        q = queries.float().reshape(b, self.num_heads, groups * t, d)
        scores = torch.matmul(q, self.chunk_keys[:, :, :n].float().transpose(-1, -2)).view(b, hq, t, n)
        empty = torch.arange(n, device=queries.device)[None, :] >= held[:, None]
        return scores.masked_fill(empty[:, None, None, :], float("-inf"))

    def retrieve(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and token mask of the top-``k`` chunks of every query token and head.

        Args:
            queries: ``[b, Hq, T, d]``.
            k: chunks per query (``>= 1``; may exceed the chunks held: the missing ones are masked).

        Returns:
            ``(keys [b, Hq, T, k * c, d], values [b, Hq, T, k * c, dv], mask [b, Hq, T, k * c] bool)``, chunks by
            descending score; ``mask`` is ``False`` for missing chunks and for the empty slots of partial chunks.
        """
        _check_positive_int("k", k)
        scores = self.chunk_scores(queries)
        b, hq, t, n = scores.shape
        index = select_topk(scores.view(-1, n), k).view(b, hq, t, k)
        found = index >= 0
        slot = index.clamp(min=0)
        row = torch.arange(b, device=slot.device)[:, None, None, None]
        head = (torch.arange(hq, device=slot.device) // (hq // self.num_heads))[None, :, None, None]
        keys = self.keys[row, head, slot].flatten(3, 4)  # [b, Hq, T, k * c, d]
        values = self.values[row, head, slot].flatten(3, 4)
        mask = (self.token_mask[row, slot] & found[..., None]).flatten(3, 4)
        return keys, values, mask

    # ------------------------------------------------------------------------------------------------ batch ops
    def index_select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder/repeat) the batch rows ``rows`` (``[b']`` int64), e.g. for beam search."""
        if self.written is None:
            return
        for name in (
            "keys",
            "values",
            "chunk_keys",
            "token_mask",
            "written",
            "pending_keys",
            "pending_values",
            "pending_count",
        ):
            setattr(self, name, getattr(self, name).index_select(0, rows.to(self.written.device)))

    def repeat_rows(self, batch_size: int) -> None:
        """Turn a one-row bank into ``batch_size`` identical rows (e.g. after memorizing shared documents)."""
        _check_positive_int("batch_size", batch_size)
        if self.written is None:
            return
        if self.batch_size != 1:
            raise ValueError(f"repeat_rows needs a one-row bank, this one has {self.batch_size} rows")
        self.index_select(torch.zeros(batch_size, dtype=torch.long, device=self.written.device))

    # ------------------------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Configuration and tensors (``None`` before the first write)."""
        return {
            "config": {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "chunk_size": self.chunk_size,
                "max_tokens": self.max_tokens,
                "value_dim": self.value_dim,
            },
            "tensors": {
                name: getattr(self, name)
                for name in (
                    "keys",
                    "values",
                    "chunk_keys",
                    "token_mask",
                    "written",
                    "pending_keys",
                    "pending_values",
                    "pending_count",
                )
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> ChunkMemoryBank:
        bank = cls(**state["config"])
        for name, tensor in state["tensors"].items():
            setattr(bank, name, tensor)
        return bank

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to ``path`` atomically (temporary file + ``os.replace``)."""
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), temporary)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location=None) -> ChunkMemoryBank:
        """Read a bank written by :meth:`save`."""
        return cls.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))
