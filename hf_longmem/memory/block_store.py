"""Memory blocks of past KV with CPU offload and a device LRU (InfLLM's ``MemoryUnit`` + ``CudaCache``).

A :class:`BlockStore` holds the memory of one attention layer: blocks of consecutive past tokens (keys
``[kv_heads, size, head_dim]`` and values ``[kv_heads, size, v_dim]``) plus one representative key per block
(``[q_heads, head_dim]``, used to score the block against a query). Representatives are per *query* head, as the
official ``VectorTensor`` (``dim_head * num_heads``, filled by ``get_block_k`` from the GQA-expanded keys and the
per-query-head window scores): the query heads of one KV group pick different keys of the block.

* **Where blocks live.** With ``offload=True`` (the default on CUDA) a block's home is CPU memory (pinned when
  CUDA is available, so copies are asynchronous) and at most ``max_cached_blocks`` blocks per row are also resident
  on the compute device, in least-recently-used order. Blocks selected for a step are copied in with non-blocking
  copies on a side CUDA stream (:meth:`prefetch`), which :meth:`gather` waits for. A selection larger than the LRU
  is served, but the blocks that do not fit are copied for that step only, so the LRU never exceeds its size.
  With ``offload=False`` (the default on CPU) the home is the compute device and nothing is copied.
* **Representatives** stay on the compute device by default (as the official ``VectorTensor``): retrieval reads
  all of them, so they grow with the context (``q_heads * head_dim`` values per block, half the bytes of a block
  of 2 tokens with GQA 4/2). With ``offload_representatives=True`` they live with the blocks (CPU when
  offloading) and :meth:`topk` scores them there: only the ``[b, H, d]`` query goes to the host and only the
  block ids come back, so the device holds a bounded amount of memory however long the context.
* **Batches.** Each row of the batch has its own list of blocks, LRU and representatives (the official code keeps
  one "unit" per row the same way), so rows may hold different numbers of blocks of different sizes. Rows of a
  left-padded batch hold only their real tokens, so one row may have no block yet while others have many.

``memory_breakdown()`` splits the bytes held into ``resident`` (on the compute device) and ``offloaded`` (in the CPU
home; ``memory_bytes()`` is their sum, as for the caches); :meth:`memory_parts` names the parts (blocks, LRU copies, representatives) and where each one is. The split
follows the store's roles, not the tensors' devices, so ``offload=True`` on a CPU device reports what would be
resident on an accelerator.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from hf_longmem.kernels.block_topk import block_topk
from hf_longmem.kernels.utils import resolve_backend
from hf_longmem.memory.accounting import MemoryReport


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class BlockStore(MemoryReport):
    """Blocks of one layer, per row of the batch.

    Args:
        device: the compute device (where attention runs).
        max_cached_blocks: device-resident blocks per row when offloading (the LRU size), ``>= 1``.
        offload: keep blocks in CPU memory with a device LRU; ``None``: only when ``device`` is CUDA. ``True`` on a
            CPU device exercises the same LRU (copies are clones).
        pin_memory: pin the CPU copies; ``None``: when offloading from a CUDA device.
        offload_representatives: keep the representatives where the blocks live (the CPU home when offloading)
            and score them there (:meth:`topk`); ``False`` (official): on the compute device.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_cached_blocks: int = 32,
        offload: bool | None = None,
        pin_memory: bool | None = None,
        offload_representatives: bool = False,
    ):
        if isinstance(max_cached_blocks, bool) or not isinstance(max_cached_blocks, int) or max_cached_blocks < 1:
            raise ValueError(f"`max_cached_blocks` must be an int >= 1, got {max_cached_blocks!r}")
        self.device = torch.device(device)
        self.max_cached_blocks = max_cached_blocks
        self.offload = self.device.type == "cuda" if offload is None else bool(offload)
        self.home = torch.device("cpu") if self.offload else self.device
        if pin_memory is None:
            pin_memory = self.offload and self.device.type == "cuda"
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("`pin_memory=True` needs CUDA")
        self.pin_memory = bool(pin_memory)
        self.offload_representatives = bool(offload_representatives)
        self.reprs_device = self.home if self.offload_representatives else self.device
        self._stream = torch.cuda.Stream(self.device) if self.offload and self.device.type == "cuda" else None
        self._blocks: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # [row][block] -> (keys, values) at home
        self._sizes: list[list[int]] = []  # [row][block] -> tokens (kept alongside: read every step)
        self._sizes_tensor: dict[tuple, torch.Tensor] = {}  # (row, device) -> [blocks] int64, built on demand
        self._max_size: list[int] = []  # [row] -> tokens of the row's largest block (0 without blocks)
        self._resident: list[OrderedDict[int, tuple[torch.Tensor, torch.Tensor]]] = []  # [row] LRU, oldest first
        self._events: dict[tuple[int, int], torch.cuda.Event] = {}  # pending host->device copies
        self.reprs: torch.Tensor | None = None  # [b, capacity, q_heads, head_dim] on reprs_device
        self._scoring: tuple | None = None  # (reprs, blocks, [b, H * d, blocks] view) for `_torch_topk`
        self.loads = 0  # blocks copied to the device so far (a cache-miss counter)

    # ------------------------------------------------------------------------------------------------ sizes
    @property
    def batch_size(self) -> int:
        return len(self._blocks)

    def num_blocks(self, row: int | None = None) -> int | list[int]:
        """Blocks of ``row``, or the list over rows."""
        counts = [len(blocks) for blocks in self._blocks]
        if row is None:
            return counts
        return counts[row] if counts else 0

    def counts(self, device: torch.device | None = None) -> torch.Tensor:
        """``[b]`` int64 number of blocks per row (on ``device``, default the compute device)."""
        return torch.tensor(self.num_blocks(), dtype=torch.long, device=device or self.device)

    def block_sizes(self, row: int) -> list[int]:
        return list(self._sizes[row])

    def max_block_size(self, row: int | None = None) -> int:
        """Tokens of the largest block of ``row`` (of any row when ``None``); 0 without blocks. Kept up to date
        as blocks are added, so reading it costs neither a scan nor a device sync."""
        if row is not None:
            return self._max_size[row] if self._max_size else 0
        return max(self._max_size, default=0)

    def block_sizes_tensor(self, row: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[blocks]`` int64 tokens per block of ``row``, on ``device`` (default the compute device; cached until
        blocks are added: read at every step, it is not rebuilt from the list each time)."""
        device = torch.device(device) if device is not None else self.device
        cached = self._sizes_tensor.get((row, device))
        if cached is None or cached.shape[0] != len(self._sizes[row]):
            cached = torch.tensor(self._sizes[row], dtype=torch.long, device=device)
            self._sizes_tensor[(row, device)] = cached
        return cached

    def representatives(self) -> torch.Tensor | None:
        """``[b, max blocks, q_heads, head_dim]`` on ``reprs_device`` (rows with fewer blocks are zero-filled past
        their count)."""
        if self.reprs is None:
            return None
        return self.reprs[:, : max(self.num_blocks(), default=0)]

    def resident_blocks(self, row: int) -> list[int]:
        """Block ids of ``row`` on the device, least recently used first (all of them without offload)."""
        if not self.offload:
            return list(range(len(self._blocks[row])))
        return list(self._resident[row])

    # ----------------------------------------------------------------------------------------------- adding
    def ensure_rows(self, batch: int) -> None:
        """Makes room for ``batch`` rows (no-op when the store already holds them; ``ValueError`` for another count)."""
        self._ensure_rows(batch)

    def _ensure_rows(self, batch: int) -> None:
        if self.batch_size == 0:
            self._blocks = [[] for _ in range(batch)]
            self._sizes = [[] for _ in range(batch)]
            self._max_size = [0] * batch
            self._resident = [OrderedDict() for _ in range(batch)]
        elif self.batch_size != batch:
            raise ValueError(f"the store holds {self.batch_size} rows, got blocks for {batch}")

    def _to_home(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.offload:
            return tensor.clone(memory_format=torch.contiguous_format)
        if self._stream is None:  # CPU "offload": same memory kind, a private copy
            return tensor.to(self.home, copy=True).contiguous()
        home = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.home, pin_memory=self.pin_memory)
        home.copy_(tensor, non_blocking=True)  # runs on the side stream (see add_blocks)
        tensor.record_stream(self._stream)
        return home

    def add_blocks(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        sizes: list[int],
        reprs: torch.Tensor,
        rows: list[int] | None = None,
    ) -> None:
        """Appends ``len(sizes)`` blocks of consecutive tokens to each row.

        Args:
            keys: ``[b, kv_heads, sum(sizes), head_dim]`` (``b`` rows of the batch, or ``len(rows)``).
            values: ``[b, kv_heads, sum(sizes), v_dim]``.
            sizes: tokens per block, in order.
            reprs: ``[b, len(sizes), q_heads, head_dim]`` representative keys.
            rows: the batch rows these are for (``None``: all rows, ``b`` = batch size).
        """
        if keys.dim() != 4 or values.dim() != 4 or reprs.dim() != 4:
            raise ValueError("`keys`/`values` must be [b, kv_heads, tokens, dim] and `reprs` [b, blocks, heads, dim]")
        if sum(sizes) != keys.shape[2] or values.shape[2] != keys.shape[2] or reprs.shape[1] != len(sizes):
            raise ValueError(
                f"sizes {sizes} must add up to the {keys.shape[2]} tokens given and match {reprs.shape[1]} reprs"
            )
        if any(size < 1 for size in sizes):
            raise ValueError(f"block sizes must be >= 1, got {sizes}")
        if rows is None:
            self._ensure_rows(keys.shape[0])
            rows = list(range(keys.shape[0]))
        elif len(rows) != keys.shape[0] or self.batch_size == 0 and rows != list(range(len(rows))):
            raise ValueError(f"`rows` {rows} must name the {keys.shape[0]} rows given")
        if not sizes:
            return
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        context = torch.cuda.stream(self._stream) if self._stream is not None else _null()
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with context:
            for i, row in enumerate(rows):  # loop over rows and blocks (each block is many tokens)
                for start, size in zip(starts, sizes):
                    block_keys = self._to_home(keys[i, :, start : start + size])
                    block_values = self._to_home(values[i, :, start : start + size])
                    self._blocks[row].append((block_keys, block_values))
                    self._sizes[row].append(size)
                self._max_size[row] = max(self._max_size[row], max(sizes))
        self._append_reprs(reprs, rows)

    def _append_reprs(self, reprs: torch.Tensor, rows: list[int]) -> None:
        counts = self.num_blocks()
        needed = max(counts)
        batch = self.batch_size
        if self.reprs is None or self.reprs.shape[1] < needed:
            capacity = max(16, needed, 2 * (0 if self.reprs is None else self.reprs.shape[1]))
            grown = reprs.new_zeros(batch, capacity, *reprs.shape[2:], device=self.reprs_device)
            if self.reprs is not None:
                grown[:, : self.reprs.shape[1]] = self.reprs
            self.reprs = grown
        added = reprs.shape[1]
        for i, row in enumerate(rows):
            self.reprs[row, counts[row] - added : counts[row]] = reprs[i].to(self.reprs_device, self.reprs.dtype)

    # ------------------------------------------------------------------------------------------- retrieving
    def topk(self, query: torch.Tensor, k: int, per_head: bool = False, backend: str | None = None) -> torch.Tensor:
        """The ``k`` blocks whose representatives best match ``query``, scored where the representatives live.

        Args:
            query: ``[b, H, d]`` (the chunk-mean query, rotated as the memory keys are).
            k: blocks to return (may exceed the number of blocks: the missing ones are ``-1``).
            per_head: one choice per query head by ``q_h . r_{b,h}`` (InfLLM ``perhead``) instead of one per row
                by the heads' summed score.
            backend: kernel backend (:func:`~hf_longmem.kernels.block_topk.block_topk`) when the representatives
                are on the compute device; representatives kept in the CPU home of an accelerator are scored with
                torch there.

        Returns:
            ``[b, k]`` (or ``[b, H, k]`` with ``per_head``) int64 block ids by descending score, ``-1`` padded, on
            ``reprs_device``: only the query crosses to the representatives and only these ids come back.
        """
        if self.reprs is None:
            raise ValueError("the store holds no blocks to score")
        equal = len(set(self.num_blocks())) == 1
        if (
            not per_head
            and equal
            and k <= self.num_blocks()[0]
            and self.reprs.device == self.device == query.device
            and resolve_backend(backend, query, self.reprs) == "torch"
        ):
            return self._torch_topk(query, k)
        reprs = self.representatives()
        if reprs.device != self.device:
            backend = None  # host scoring: the kernels run on the compute device
        query = query.to(reprs.device)
        # rows with the same number of blocks (the usual case) need no mask of the blocks beyond a row's count
        counts = None if equal else self.counts(reprs.device)
        if not per_head:
            return block_topk(query, reprs, k, counts, backend=backend)
        batch, heads, dim = query.shape
        flat = reprs.transpose(1, 2).reshape(batch * heads, -1, dim)  # [b * H, n, d]
        counts = None if equal else counts.repeat_interleave(heads)
        index = block_topk(query.reshape(batch * heads, dim), flat, k, counts, backend=backend)
        return index.view(batch, heads, -1)

    def _torch_topk(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """:func:`~hf_longmem.kernels.block_topk.block_topk`'s torch reference when every row holds the same number
        of blocks and ``k`` does not exceed it, with the transposed representatives ``[b, H * d, n]`` kept between
        block additions: the same scores (the same ``bmm`` of the same operands) and ids, in 6 ops instead of 11
        (InfLLM/EM-LLM score the blocks at every decoding step)."""
        reprs = self.reprs
        count = self.num_blocks()[0]
        kept = self._scoring
        if kept is None or kept[0] is not reprs or kept[1] != count:
            kept = self._scoring = (reprs, count, reprs[:, :count].flatten(2).transpose(1, 2))
        scores = torch.bmm(query.float().reshape(query.shape[0], 1, -1), kept[2].float())  # [b, 1, n]
        top = scores.topk(k, dim=-1)
        return top.indices.masked_fill(top.values == float("-inf"), -1)[:, 0]  # [b, k], as `select_topk`

    def prefetch(self, blocks: list[list[int]]) -> None:
        """Starts copying the blocks ``blocks[row]`` that are not resident (non-blocking; no-op without offload).

        Least recently used blocks that are not requested make room; requests beyond the LRU size are left to
        :meth:`gather`, which streams them for one step.
        """
        if not self.offload:
            return
        self._check_request(blocks)
        for row, ids in enumerate(blocks):
            wanted = list(dict.fromkeys(int(i) for i in ids))
            lru = self._resident[row]
            missing = [i for i in wanted if i not in lru]
            room = self.max_cached_blocks - len(lru)
            if len(missing) > room:  # evict least recently used blocks that are not wanted now
                keep = set(wanted)
                for victim in [i for i in lru if i not in keep][: len(missing) - room]:
                    self._drop(row, victim)
                room = self.max_cached_blocks - len(lru)
            for block_id in missing[:room]:
                lru[block_id] = self._load(row, block_id)

    def gather(self, blocks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values of ``blocks[row]`` (in that order), on the device.

        Args:
            blocks: per row, block ids (``-1`` entries are skipped).

        Returns:
            ``keys [b, kv_heads, L, head_dim]``, ``values [b, kv_heads, L, v_dim]`` and ``valid [b, L]`` bool
            (``None`` when every row has ``L`` tokens; shorter rows are zero-filled at the end and marked False).
        """
        self._check_request(blocks)
        blocks = [[int(i) for i in ids if int(i) >= 0] for ids in blocks]
        self.prefetch(blocks)
        per_row = []
        for row, ids in enumerate(blocks):
            parts = []
            for block_id in ids:
                if not self.offload:
                    parts.append(self._blocks[row][block_id])
                    continue
                lru = self._resident[row]
                if block_id in lru:
                    lru.move_to_end(block_id)
                    parts.append(self._wait(row, block_id, lru[block_id]))
                else:  # beyond the LRU size: this step only
                    parts.append(self._wait(row, block_id, self._load(row, block_id)))
            per_row.append(parts)
        return self._concatenate(per_row)

    def _concatenate(self, per_row) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        first = next((parts[0] for parts in per_row if parts), None)
        if first is None:
            raise ValueError("no block requested")
        heads, _, key_dim = first[0].shape
        value_dim = first[1].shape[-1]
        lengths = [sum(k.shape[1] for k, _ in parts) for parts in per_row]
        total = max(lengths)
        batch = len(per_row)
        if all(length == total for length in lengths):
            keys = torch.stack([torch.cat([k for k, _ in parts], dim=1) for parts in per_row])
            values = torch.stack([torch.cat([v for _, v in parts], dim=1) for parts in per_row])
            return keys, values, None
        keys = first[0].new_zeros(batch, heads, total, key_dim)
        values = first[1].new_zeros(batch, heads, total, value_dim)
        for row, parts in enumerate(per_row):
            if parts:
                keys[row, :, : lengths[row]] = torch.cat([k for k, _ in parts], dim=1)
                values[row, :, : lengths[row]] = torch.cat([v for _, v in parts], dim=1)
        valid = torch.arange(total, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        return keys, values, valid

    def _check_request(self, blocks) -> None:
        if len(blocks) != self.batch_size:
            raise ValueError(f"`blocks` must list block ids for each of the {self.batch_size} rows, got {len(blocks)}")
        for row, ids in enumerate(blocks):
            count = len(self._blocks[row])
            if len(ids) and max(ids) >= count:  # one C-level scan per row (this runs at every step)
                bad = [int(i) for i in ids if int(i) >= count]
                raise ValueError(f"row {row} has {count} blocks, asked for {bad}")

    def _load(self, row: int, block_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._blocks[row][block_id]
        self.loads += 1
        if self._stream is None:
            return keys.to(self.device, copy=True), values.to(self.device, copy=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            loaded = (keys.to(self.device, non_blocking=True), values.to(self.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self._stream)
        self._events[(row, block_id)] = event
        return loaded

    def _wait(self, row: int, block_id: int, loaded: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Makes the compute stream wait for a pending copy of the block (returns ``loaded``)."""
        event = self._events.pop((row, block_id), None)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in loaded or ():
                tensor.record_stream(current)  # allocated on the side stream, used on this one
        return loaded

    def _drop(self, row: int, block_id: int) -> None:
        self._events.pop((row, block_id), None)
        self._resident[row].pop(block_id, None)

    # ------------------------------------------------------------------------------------- batch and bytes
    def reorder(self, index: torch.Tensor | list[int]) -> None:
        """Rows ``index`` of the batch become the new rows (beam search, batch selection, repeats)."""
        if self.batch_size == 0:
            return
        index = [int(i) for i in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        self._sync()
        self._blocks = [list(self._blocks[i]) for i in index]
        self._sizes = [list(self._sizes[i]) for i in index]
        self._max_size = [self._max_size[i] for i in index]
        self._sizes_tensor = {}
        self._resident = [OrderedDict(self._resident[i]) for i in index]
        if self.reprs is not None:
            self.reprs = self.reprs.index_select(0, torch.tensor(index, device=self.reprs.device))

    def _sync(self) -> None:
        """Waits for every pending copy (host reads of pinned blocks, reordering)."""
        if self._stream is not None:
            self._stream.synchronize()
            current = torch.cuda.current_stream(self.device)
            for row, block_id in self._events:
                for tensor in self._resident[row].get(block_id, ()):
                    tensor.record_stream(current)
        self._events.clear()

    def clear(self) -> None:
        self._sync()
        self._blocks, self._sizes, self._resident, self.reprs, self.loads = [], [], [], None, 0
        self._max_size = []
        self._sizes_tensor = {}

    def memory_parts(self) -> dict[str, tuple[str, int]]:
        """``{part: (where, bytes)}`` with ``where`` ``"resident"`` (compute device) or ``"offloaded"`` (CPU home).

        Parts: ``blocks`` (every block's keys and values at home), ``lru`` (device copies of offloaded blocks, at
        most ``max_cached_blocks`` per row) and ``representatives`` (the allocated buffer, which grows by doubling).
        """
        home = sum(_nbytes(k) + _nbytes(v) for blocks in self._blocks for k, v in blocks)
        cached = sum(_nbytes(k) + _nbytes(v) for lru in self._resident for k, v in lru.values()) if self.offload else 0
        return {
            "blocks": ("offloaded" if self.offload else "resident", home),
            "lru": ("resident", cached),
            "representatives": (
                "offloaded" if self.offload and self.offload_representatives else "resident",
                _nbytes(self.reprs),
            ),
        }

    def __deepcopy__(self, memo):
        import copy

        self._sync()
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            if name == "_stream":
                clone._stream = value  # streams are shared handles
            elif name == "_scoring":
                clone._scoring = None  # a view of `reprs`, rebuilt on the copy's first scoring
            elif name == "_events":
                clone._events = {}
            else:
                setattr(clone, name, copy.deepcopy(value, memo))
        return clone


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


__all__ = ["BlockStore"]
