"""The memory bank of CMT: compressed document memories with self-matching keys, bounded, oldest evicted first.

One memory is what the compressor makes of one document: its ``m`` memory slots as the frozen LM's per-layer keys and
values (``[layers, 2, kv_heads, m, head_dim]``, keys rotated as if the slots sat at positions ``0 .. m-1``) and a
unit-norm self-matching key (``[retrieval_dim]``). Retrieval is one GEMM of the question keys against all memory
keys and a top-k (:func:`hf_longmem.kernels.block_topk.block_topk`, Triton on CUDA).

Banks save to one safetensors file (tensors + a JSON header with the shape signature and the document ids), written
atomically (temporary file, then ``os.replace``); loading checks the signature against the model's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_longmem.kernels.block_topk import block_topk
from hf_longmem.memory.accounting import RESIDENT, MemoryParts, MemoryReport, tensor_bytes

BANK_FILE = "cmt_memory_bank.safetensors"


@dataclass(frozen=True)
class BankSignature:
    """What a memory was computed for; a bank only fits a model with the same signature.

    Attributes:
        num_layers: attention layers of the backbone.
        num_kv_heads: key/value heads per layer.
        head_dim: channels per head.
        num_memory_tokens: slots per memory.
        retrieval_dim: width of the self-matching keys.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_memory_tokens: int
    retrieval_dim: int

    def memory_shape(self) -> tuple[int, ...]:
        """``(layers, 2, kv_heads, m, head_dim)``: the shape of one memory."""
        return (self.num_layers, 2, self.num_kv_heads, self.num_memory_tokens, self.head_dim)

    def check(self, other: BankSignature, what: str = "memory bank") -> None:
        """``ValueError`` naming the first field where ``other`` differs."""
        for name, want in asdict(self).items():
            got = getattr(other, name)
            if got != want:
                raise ValueError(f"{what} does not match the model: {name} is {got}, the model needs {want}")


class DocumentMemoryBank(MemoryReport):
    """Compressed document memories, at most ``capacity`` of them (first in, first out).

    Args:
        signature: shapes of the memories this bank holds.
        capacity: the most memories kept (``>= 1``); adding beyond it evicts the oldest.
        device: where the tensors live (``None``: CPU).
        dtype: floating dtype of the memories and keys (``None``: float32).
    """

    def __init__(
        self,
        signature: BankSignature,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.signature = signature
        self.capacity = capacity
        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        self.memories = torch.empty((0, *signature.memory_shape()), device=device, dtype=dtype)
        self.keys = torch.empty((0, signature.retrieval_dim), device=device, dtype=dtype)
        self.doc_ids: list[str] = []
        self.num_added = 0  # memories ever added (the default doc id counter)
        self.num_evicted = 0

    def __len__(self) -> int:
        return self.memories.shape[0]

    @property
    def device(self) -> torch.device:
        return self.memories.device

    @property
    def dtype(self) -> torch.dtype:
        return self.memories.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DocumentMemoryBank:
        """Move the tensors (in place); returns ``self``."""
        self.memories = self.memories.to(device=device, dtype=dtype)
        self.keys = self.keys.to(device=device, dtype=dtype)
        return self

    def memory_parts(self) -> MemoryParts:
        """``{"documents": ("resident", bytes of the memories and their keys)}``."""
        return {"documents": (RESIDENT, tensor_bytes(self.memories, self.keys))}

    def clear(self) -> None:
        """Forget every memory (the counters keep counting)."""
        self.memories = self.memories[:0]
        self.keys = self.keys[:0]
        self.doc_ids = []

    def add(self, memories: torch.Tensor, keys: torch.Tensor, doc_ids: list[str] | None = None) -> list[str]:
        """Append memories; evict the oldest beyond ``capacity``.

        Args:
            memories: ``[n, layers, 2, kv_heads, m, head_dim]`` compressed memories.
            keys: ``[n, retrieval_dim]`` self-matching keys (normalised here to unit length).
            doc_ids: one id per memory (``None``: ``"doc-<counter>"``).

        Returns:
            the ids of the added memories (some may already be evicted when ``n > capacity``).
        """
        shape = self.signature.memory_shape()
        if not isinstance(memories, torch.Tensor) or memories.dim() != 1 + len(shape) or memories.shape[1:] != shape:
            got = tuple(memories.shape) if isinstance(memories, torch.Tensor) else type(memories).__name__
            raise ValueError(f"memories must have shape [n, {', '.join(map(str, shape))}], got {got}")
        n = memories.shape[0]
        if not isinstance(keys, torch.Tensor) or tuple(keys.shape) != (n, self.signature.retrieval_dim):
            got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must have shape [{n}, {self.signature.retrieval_dim}], got {got}")
        if doc_ids is None:
            doc_ids = [f"doc-{self.num_added + i}" for i in range(n)]
        elif len(doc_ids) != n or not all(isinstance(d, str) for d in doc_ids):
            raise ValueError(f"doc_ids must be {n} strings, got {doc_ids!r}")
        keys = torch.nn.functional.normalize(keys.detach().float(), dim=-1)
        self.memories = torch.cat([self.memories, memories.detach().to(self.device, self.dtype)])
        self.keys = torch.cat([self.keys, keys.to(self.device, self.dtype)])
        self.doc_ids = self.doc_ids + list(doc_ids)
        self.num_added += n
        overflow = len(self) - self.capacity
        if overflow > 0:
            self.memories = self.memories[overflow:].clone()
            self.keys = self.keys[overflow:].clone()
            self.doc_ids = self.doc_ids[overflow:]
            self.num_evicted += overflow
        return list(doc_ids)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-matching: the ``k`` memories whose keys best match each query (cosine similarity).

        Args:
            queries: ``[batch, retrieval_dim]`` question keys (normalised here).
            k: memories per query, ``>= 1``; capped at the bank size.

        Returns:
            ``(indices, scores)``: ``[batch, min(k, len(self))]`` int64 indices into the bank by descending score, and
            their float32 cosine similarities.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if queries.dim() != 2 or queries.shape[1] != self.signature.retrieval_dim:
            raise ValueError(f"queries must be [batch, {self.signature.retrieval_dim}], got {tuple(queries.shape)}")
        if len(self) == 0:
            raise ValueError("the memory bank is empty: memorize documents first")
        k = min(k, len(self))
        queries = torch.nn.functional.normalize(queries.float(), dim=-1).to(self.keys.dtype)
        reprs = self.keys.unsqueeze(0).expand(queries.shape[0], -1, -1)
        indices, scores = block_topk(queries, reprs, k, return_scores=True)
        return indices, scores.gather(1, indices)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """``[batch, k, layers, 2, kv_heads, m, head_dim]`` memories at ``indices`` (``[batch, k]``)."""
        return self.memories[indices]

    # ------------------------------------------------------------------------------------------------------------------
    # Persistence
    # ------------------------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank to ``path`` (a ``.safetensors`` file, or a folder that gets :data:`BANK_FILE`) atomically."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / BANK_FILE
        header = {
            "signature": json.dumps(asdict(self.signature)),
            "capacity": str(self.capacity),
            "doc_ids": json.dumps(self.doc_ids),
            "num_added": str(self.num_added),
            "num_evicted": str(self.num_evicted),
        }
        tensors = {"memories": self.memories.detach().contiguous().cpu(), "keys": self.keys.detach().contiguous().cpu()}
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, str(temporary), metadata=header)
        os.replace(temporary, path)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        signature: BankSignature | None = None,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DocumentMemoryBank:
        """Read a bank written by :meth:`save`.

        Args:
            path: the file, or a folder holding :data:`BANK_FILE`.
            signature: the model's signature; a ``ValueError`` names the first field that differs.
            capacity: override the saved capacity (the oldest memories beyond it are evicted).
            device, dtype: where and in which dtype to put the tensors (``None``: CPU, the saved dtype).
        """
        path = Path(path)
        if path.is_dir():
            path = path / BANK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no CMT memory bank at {str(path)!r}")
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if "signature" not in header:
                raise ValueError(f"{str(path)!r} is not a CMT memory bank (no signature in its header)")
            memories, keys = handle.get_tensor("memories"), handle.get_tensor("keys")
        saved = BankSignature(**json.loads(header["signature"]))
        if signature is not None:
            signature.check(saved, what=f"memory bank {str(path)!r}")
        bank = cls(saved, int(header["capacity"]) if capacity is None else capacity, device, dtype or memories.dtype)
        bank.add(memories, keys, json.loads(header["doc_ids"]))
        bank.num_added = int(header["num_added"])
        bank.num_evicted = int(header["num_evicted"]) + max(0, memories.shape[0] - bank.capacity)
        return bank
