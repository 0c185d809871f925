"""Block scores in Triton: one program per ``(row, tile of BLOCK_N blocks)`` streams the representatives.

Retrieval reads every block representative of a layer once per chunk (``n`` blocks of ``heads * head_dim``
numbers); the kernel computes all ``q . r_b`` dot products in one pass with float32 accumulation and writes
``-inf`` past each row's block count. Choosing the top ``k`` of ``n`` scalars is left to ``torch.topk`` (a few
microseconds next to reading ``n x D`` representatives).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_longmem.kernels.decode_attention.triton import device_guard

from .reference import select_topk


@triton.jit
def _block_scores_kernel(
    q_ptr,
    r_ptr,
    count_ptr,
    out_ptr,
    stride_qb,
    stride_qd,
    stride_rb,
    stride_rn,
    stride_rd,
    stride_ob,
    num_blocks,
    dim,
    HAS_COUNT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.cast(tl.program_id(0), tl.int64)
    pid_n = tl.program_id(1)
    offs_n = tl.cast(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), tl.int64)
    n_ok = offs_n < num_blocks
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        offs_d = tl.cast(start + tl.arange(0, BLOCK_D), tl.int64)
        d_ok = offs_d < dim
        q = tl.load(q_ptr + row * stride_qb + offs_d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        r = tl.load(
            r_ptr + row * stride_rb + offs_n[:, None] * stride_rn + offs_d[None, :] * stride_rd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(r * q[None, :], axis=1)
    real = n_ok
    if HAS_COUNT:
        count = tl.load(count_ptr + row)
        real = real & (offs_n < count)
    acc = tl.where(real, acc, float("-inf"))
    tl.store(out_ptr + row * stride_ob + offs_n, acc, mask=n_ok)


def triton_block_scores(
    query: torch.Tensor,
    reprs: torch.Tensor,
    num_blocks: torch.Tensor | None = None,
    *,
    block_n: int = 64,
    block_d: int = 64,
) -> torch.Tensor:
    """Same contract as :func:`~hf_longmem.kernels.block_topk.reference.naive_block_scores` (arguments checked)."""
    batch, n, dim = reprs.shape
    out = torch.empty(batch, n, dtype=torch.float32, device=reprs.device)
    if n == 0 or batch == 0:
        return out
    counts = num_blocks.to(device=reprs.device, dtype=torch.int64).contiguous() if num_blocks is not None else out
    grid = (batch, triton.cdiv(n, block_n))
    with device_guard(reprs):
        _block_scores_kernel[grid](
            query,
            reprs,
            counts,
            out,
            query.stride(0),
            query.stride(1),
            reprs.stride(0),
            reprs.stride(1),
            reprs.stride(2),
            out.stride(0),
            n,
            dim,
            HAS_COUNT=num_blocks is not None,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
        )
    return out


def triton_block_topk(
    query: torch.Tensor, reprs: torch.Tensor, k: int, num_blocks: torch.Tensor | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = triton_block_scores(query, reprs, num_blocks, **kwargs)
    return select_topk(scores, k), scores
