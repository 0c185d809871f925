"""Titans neural-memory update, chunk-parallel: torch reference (the spec) and a Triton chunk step (fwd + bwd).

The sequence is cut into chunks of ``chunk_size`` tokens; chunks run one after the other (each chunk's gradients are
taken at the weights the previous chunk left, the paper's mini-batch gradient descent), while everything inside a
chunk is parallel: per-token gradients, momentum and decay fold into closed-form coefficients
(:func:`~hf_longmem.kernels.titans_memory.reference.chunk_coefficients`). The chunk step (weighted gradients of the
MLP memory + momentum/decay update) runs in Triton on CUDA for the depth-2 memory (the paper's default), in torch
elsewhere; retrieval is a batched MLP forward in torch.
"""

from __future__ import annotations

import torch

from hf_longmem.kernels.utils import resolve_backend

from .reference import (
    Weights,
    chunk_coefficients,
    memory_mlp,
    memory_step_reference,
    naive_recurrent_titans_memory,
    weighted_memory_grads,
)

__all__ = [
    "chunk_coefficients",
    "chunk_titans_memory",
    "memory_mlp",
    "memory_step",
    "memory_step_reference",
    "naive_recurrent_titans_memory",
    "weighted_memory_grads",
]


def memory_step(
    weights: Weights, momentum: Weights, k, v, coef_w, coef_s, decay_w, decay_s, mix_s, backend: str | None = None
) -> tuple[Weights, Weights]:
    """One chunk update; same arguments as :func:`~.reference.memory_step_reference` (+ ``backend``).

    ``backend``: ``"torch"``, ``"triton"`` (depth-2 memory only) or ``None`` (Triton on CUDA for depth 2, else torch).
    """
    if len(weights) == 2 and resolve_backend(backend, k, v, *weights) == "triton":
        from .triton import triton_memory_step

        return triton_memory_step(weights, momentum, k, v, coef_w, coef_s, decay_w, decay_s, mix_s)
    if backend == "triton":
        raise ValueError("backend='triton' supports the depth-2 memory only (weights must be (W1, W2))")
    return memory_step_reference(weights, momentum, k, v, coef_w, coef_s, decay_w, decay_s, mix_s)


@torch.compiler.disable
def chunk_titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    log_eta: torch.Tensor,
    log_keep: torch.Tensor,
    weights: Weights,
    momentum: Weights | None = None,
    chunk_size: int = 16,
    lengths: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, Weights, Weights]:
    """Chunk-parallel Titans memory over a left-aligned batch: retrieval outputs and the state after the last
    complete chunk of every row. Equals :func:`~.reference.naive_recurrent_titans_memory` (per row of length
    ``lengths[b]``).

    Args:
        q, k, v: ``[batch, heads, T, d]``; row ``b``'s tokens are ``[0, lengths[b])`` (the rest is ignored).
        lr: ``[batch, heads, T]`` learning rates ``theta >= 0``.
        log_eta, log_keep: ``[batch, heads, T]`` ``log(eta)`` (momentum) and ``log(1 - alpha)`` (forgetting), <= 0.
        weights: initial memory weights (tuple of ``[batch, heads, ...]``, see :func:`~.reference.memory_mlp`).
        momentum: initial surprise ``S`` (same shapes; zeros if ``None``).
        chunk_size: tokens per chunk ``c``.
        lengths: ``[batch]`` number of real tokens per row (``None``: all ``T``).
        backend: chunk-step backend, see :func:`memory_step`.

    Returns:
        ``out [batch, heads, T, d]`` (token ``t`` reads the weights after ``floor((t + 1) / c)`` chunks; rows past
        their length hold garbage), and ``(W, S)`` after ``floor(lengths[b] / c)`` chunks of each row.

    Examples::

        >>> b, h, T, d = 2, 2, 10, 8
        >>> q, k, v = torch.randn(3, b, h, T, d).unbind(0)
        >>> lr, log_eta, log_keep = torch.rand(b, h, T), -torch.rand(b, h, T), -0.1 * torch.rand(b, h, T)
        >>> w = (0.1 * torch.randn(b, h, d, 16), 0.1 * torch.randn(b, h, 16, d))
        >>> out, w_new, s_new = chunk_titans_memory(q, k, v, lr, log_eta, log_keep, w, chunk_size=4)
        >>> ref = naive_recurrent_titans_memory(q, k, v, lr, log_eta, log_keep, w, chunk_size=4)
        >>> torch.allclose(out, ref[0], atol=1e-5) and torch.allclose(w_new[0], ref[1][0], atol=1e-5)
        True
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:3] != k.shape[:3]:
        raise ValueError(f"q, k, v must be [batch, heads, T, d] alike, got {tuple(q.shape)}, {tuple(k.shape)}")
    if lr.shape != k.shape[:3] or log_eta.shape != lr.shape or log_keep.shape != lr.shape:
        raise ValueError(f"lr, log_eta, log_keep must be [batch, heads, T] = {tuple(k.shape[:3])}")
    if len(weights) not in (1, 2):
        raise ValueError(f"weights must be (W1,) or (W1, W2), got {len(weights)} tensors")
    if momentum is None:
        momentum = tuple(torch.zeros_like(w) for w in weights)
    batch, heads, T, d = k.shape
    c = chunk_size
    if lengths is None:
        num_chunks_row = None
        num_updates = T // c
    else:
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must be [batch] = ({batch},), got {tuple(lengths.shape)}")
        num_chunks_row = lengths.to(k.device) // c
        num_updates = int(num_chunks_row.max()) if batch else 0
    groups = T // c + 1  # retrieval groups: group g = tokens reading the weights after g chunks
    pad = groups * c - (T + 1)  # one left position shifts the ``floor((t + 1) / c)`` rule onto chunk boundaries
    q_groups = torch.nn.functional.pad(q, (0, 0, 1, pad)).view(batch, heads, groups, c, d)
    if num_updates:
        span = num_updates * c
        kc = k[:, :, :span].reshape(batch, heads, num_updates, c, d)
        vc = v[:, :, :span].reshape(batch, heads, num_updates, c, d)
        shape = (batch, heads, num_updates, c)
        coef_w, coef_s, decay_w, decay_s, mix_s = chunk_coefficients(
            lr[:, :, :span].reshape(shape), log_eta[:, :, :span].reshape(shape), log_keep[:, :, :span].reshape(shape)
        )
    outs = [memory_mlp(q_groups[:, :, 0], weights)]
    w_cur, s_cur = tuple(weights), tuple(momentum)
    w_fin, s_fin = w_cur, s_cur
    for n in range(num_updates):
        w_cur, s_cur = memory_step(
            w_cur,
            s_cur,
            kc[:, :, n],
            vc[:, :, n],
            coef_w[:, :, n],
            coef_s[:, :, n],
            decay_w[:, :, n],
            decay_s[:, :, n],
            mix_s[:, :, n],
            backend=backend,
        )
        if num_chunks_row is None:
            w_fin, s_fin = w_cur, s_cur
        else:
            take = (num_chunks_row == n + 1).view(batch, *([1] * (w_cur[0].dim() - 1)))
            w_fin = tuple(torch.where(take, a, b) for a, b in zip(w_cur, w_fin))
            s_fin = tuple(torch.where(take, a, b) for a, b in zip(s_cur, s_fin))
        if n + 1 < groups:
            outs.append(memory_mlp(q_groups[:, :, n + 1], w_cur))
    for g in range(num_updates + 1, groups):  # tokens past every row's last complete chunk (ignored)
        outs.append(memory_mlp(q_groups[:, :, g], w_cur))
    out = torch.cat(outs, dim=2)[:, :, 1 : T + 1]
    return out, w_fin, s_fin
