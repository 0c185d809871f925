"""HMT's added parameters and the math of memory recall (He et al., "HMT: Hierarchical Memory Transformer for
Efficient Long Context Language Processing", NAACL 2025; official code OswaldHe/HMT-pytorch).

Shapes: ``B`` batch, ``N`` memories in the bank, ``d`` backbone hidden size, ``h`` recall width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def recall(query: torch.Tensor, bank: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """Memory recall: ``P = softmax((S W_q)(M̄ W_k)ᵀ / √h) M`` (cross-attention without a value projection).

    Args:
        query: summary embeddings ``S`` ``[B, 1, d]``.
        bank: cached memory embeddings ``M`` ``[B, N, T, d]``: ``N >= 1`` segments of ``T`` memory tokens each
            (HMT: ``T = 1``); a segment's key is ``W_k`` of the mean ``M̄`` of its ``T`` embeddings.
        w_q: ``[h, d]`` (an ``nn.Linear`` weight).
        w_k: ``[h, d]``.

    Returns:
        the recalled memory ``P`` ``[B, T, d]``: a convex combination of the bank's segments.

    The official code divides by ``h`` instead of ``√h`` when ``d, h >= 4096`` during training but not during
    generation (``long_mem_cross_attn.py``), so train and generate disagree for large backbones; we always use ``√h``.
    The softmax is taken in float32.
    """
    if bank.ndim != 4 or bank.shape[1] == 0:
        raise ValueError(f"bank must be [batch, num_memories >= 1, tokens, hidden], got shape {tuple(bank.shape)}")
    q = F.linear(query, w_q)  # [B, 1, h]
    k = F.linear(bank.mean(dim=2), w_k)  # [B, N, h]
    scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(w_q.shape[0])  # [B, 1, N]
    weights = torch.softmax(scores.float(), dim=-1).to(bank.dtype)
    return torch.einsum("bn,bntd->btd", weights[:, 0], bank)  # [B, T, d]


def append_to_bank(bank: torch.Tensor | None, memory: torch.Tensor, capacity: int) -> torch.Tensor:
    """Append one segment's memory embeddings per row and keep the newest ``capacity`` segments (the oldest are
    evicted).

    Args:
        bank: ``[B, N, T, d]`` or ``None`` (empty).
        memory: ``[B, T, d]``.
        capacity: maximum ``N`` kept (``>= 1``).

    Returns:
        ``[B, min(N + 1, capacity), T, d]``.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    memory = memory.unsqueeze(1)
    bank = memory if bank is None else torch.cat([bank, memory], dim=1)
    return bank[:, -capacity:]


class HMTMemory(nn.Module):
    """The parameters HMT adds to the backbone.

    Attributes:
        memory_init: ``[T, d]`` the learned memory embeddings ``P_0`` of the first segment (``MemoryCell.memory``).
        summary_embedding: ``[1, d]`` the summary embedding ``T`` of the summary pass (``RecurrentWrapper.mem``).
        recall_query: ``W_q`` ``d -> h`` without bias.
        recall_key: ``W_k`` ``d -> h`` without bias.
    """

    def __init__(self, hidden_size: int, recall_hidden_size: int, use_recall: bool = True, num_tokens: int = 1):
        super().__init__()
        self.memory_init = nn.Parameter(torch.zeros(num_tokens, hidden_size))
        self.use_recall = use_recall
        if use_recall:
            self.summary_embedding = nn.Parameter(torch.zeros(1, hidden_size))
            self.recall_query = nn.Linear(hidden_size, recall_hidden_size, bias=False)
            self.recall_key = nn.Linear(hidden_size, recall_hidden_size, bias=False)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Official initialisation: embeddings ``~ N(0, std²)`` (std of the input embeddings), ``nn.Linear``
        default for the recall projections."""
        self.memory_init.normal_(0.0, std)
        if self.use_recall:
            self.summary_embedding.normal_(0.0, std)
            self.recall_query.reset_parameters()
            self.recall_key.reset_parameters()

    def recall(self, query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """:func:`recall` with this module's projections: ``[B, 1, d]`` query, ``[B, N, T, d]`` bank -> ``[B, T, d]``."""
        return recall(query, bank, self.recall_query.weight, self.recall_key.weight)


__all__ = ["HMTMemory", "append_to_bank", "recall"]
