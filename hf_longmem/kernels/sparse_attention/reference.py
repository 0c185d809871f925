"""Torch reference of LongGen's sparse attention (the spec the Triton kernel is tested against).

Which key a query may read is a function of the two tokens' *positions* (their index among the real tokens of
their row), never of slots: a cache that evicted keys, or a left-padded row, passes the positions it holds and the
pattern stays the same. A position ``< 0`` marks a pad (or empty) slot, which no query reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_longmem.validation import check_choice, check_int

KINDS = ("sink_window", "block_sparse")


@dataclass(frozen=True)
class SparsePattern:
    """A LongGen sparse-attention pattern (causal in every case).

    ``"sink_window"``: query ``p`` reads key ``j`` when ``j < sink_size`` (attention sinks) or ``p - j < window`` (the
    ``window`` most recent tokens, the query itself included).

    ``"block_sparse"`` (Phi-3-small's block-sparse pattern as LongGen trains it, the same for every head): the
    sequence is cut into blocks of ``block_size`` tokens; query block ``qb`` reads key block ``kb <= qb`` when
    ``qb - kb < local_blocks`` or ``(kb + 1) % vertical_stride == 0``; inside a block attention is causal per token.
    """

    kind: str = "sink_window"
    sink_size: int = 4
    window: int = 256
    block_size: int = 64
    local_blocks: int = 4
    vertical_stride: int = 8

    def __post_init__(self):
        check_choice("sparse", self.kind, KINDS)
        check_int("sink_size", self.sink_size, low=0)
        check_int("window", self.window, low=1)
        check_int("block_size", self.block_size, low=1)
        check_int("local_blocks", self.local_blocks, low=1)
        check_int("vertical_stride", self.vertical_stride, low=1)

    def allowed(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Whether each query may read each key.

        Args:
            query_positions: ``[batch, q]`` int (``< 0``: a pad query, which reads nothing).
            key_positions: ``[batch, n]`` int (``< 0``: a pad or empty slot).

        Returns:
            ``[batch, q, n]`` bool.
        """
        qp, kp = query_positions[:, :, None], key_positions[:, None, :]
        ok = (kp >= 0) & (qp >= 0) & (kp <= qp)
        if self.kind == "sink_window":
            return ok & ((kp < self.sink_size) | (qp - kp < self.window))
        qb, kb = qp // self.block_size, kp // self.block_size
        return ok & ((qb - kb < self.local_blocks) | ((kb + 1) % self.vertical_stride == 0))

    def readable_later(self, key_positions: torch.Tensor, next_position: torch.Tensor) -> torch.Tensor:
        """Which stored keys some query at a position ``>= next_position`` can still read (what a cache must keep).

        Args:
            key_positions: ``[batch, n]`` int (``< 0``: empty slot, never kept).
            next_position: ``[batch, 1]`` int, the position of the row's next real token.

        Returns:
            ``[batch, n]`` bool.
        """
        real = key_positions >= 0
        if self.kind == "sink_window":
            return real & ((key_positions < self.sink_size) | (next_position - key_positions < self.window))
        kb, nb = key_positions // self.block_size, next_position // self.block_size
        return real & ((nb - kb < self.local_blocks) | ((kb + 1) % self.vertical_stride == 0))


def naive_sparse_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    pattern: SparsePattern,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask-based sparse attention in float32 (GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``).

    Args:
        query: ``[b, Hq, q, d]``; keys ``[b, Hkv, n, d]``; values ``[b, Hkv, n, dv]``.
        query_positions: ``[b, q]``; key_positions ``[b, n]`` (see :meth:`SparsePattern.allowed`).

    Returns:
        ``out [b, Hq, q, dv]`` (query dtype), ``lse [b, Hq, q]`` float32 and the softmax weights ``[b, Hq, q, n]``
        float32. A query that may read no key gets zeros, ``lse = -inf`` and zero weights.
    """
    groups = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(groups, dim=1)
    v = values.float().repeat_interleave(groups, dim=1)
    allowed = pattern.allowed(query_positions, key_positions)[:, None]  # [b, 1, q, n]
    scores = (query.float() @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])  # masked: exp(-inf) = 0
    out = weights @ v
    return out.to(query.dtype), lse, weights
