"""Attention column scores in Triton without materialising the ``[q, n]`` probabilities: two passes.

1. ``_row_lse_kernel``: one program per ``(batch, kv_head)`` and tile of query rows streams the keys and writes
   each row's log-sum-exp (the rows are the ``group * q`` queries of the GQA group, as in decode attention).
2. ``_column_scores_kernel``: one program per ``(batch, kv_head)`` and block of keys streams the query rows and
   accumulates ``sum_rows exp(s - lse)`` for its keys, divided by the group size (mean over query heads). Each key
   block is owned by one program, so no atomics are needed and the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_longmem.kernels.decode_attention.triton import (
    _allowed_block,
    _autotune_configs,
    _block_size,
    _dot,
    _load_query_rows,
    device_guard,
)


@triton.autotune(configs=_autotune_configs(), key=["GROUP", "BLOCK_M", "BLOCK_N", "BLOCK_D"])
@triton.jit
def _row_lse_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mn,
    scaling,
    causal_offset,
    num_kv_heads,
    num_queries,
    num_keys,
    HEAD_DIM,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_VALID: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    batch = tl.cast(pid_bh // num_kv_heads, tl.int64)
    kv_head = tl.cast(pid_bh % num_kv_heads, tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = qi < num_queries
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_query_rows(
        q_ptr + batch * stride_qb,
        q_ptr,
        stride_qh,
        stride_qm,
        stride_qd,
        0,
        head,
        qi,
        row_ok,
        offs_d,
        d_ok,
        HEAD_DIM,
        False,
    )
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    valid_base = valid_ptr + batch * stride_mb + kv_head * stride_mh
    qk_scale = scaling * 1.4426950408889634

    stop = num_keys
    if CAUSAL:
        last_query = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, num_queries - 1)
        stop = tl.minimum(stop, causal_offset + last_query + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for block_start in range(0, stop, BLOCK_N):
        cols = tl.cast(block_start, tl.int64) + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        k = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = _dot(q, k, IEEE_DOT) * qk_scale
        allowed = _allowed_block(valid_base, stride_mn, cols, col_ok, qi, row_ok, causal_offset, HAS_VALID, CAUSAL)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    # base-2 LSE of the scaled logits (what pass 2 subtracts); -inf for rows that see nothing
    lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + (batch * num_kv_heads * GROUP + head) * num_queries + qi, lse2, mask=row_ok)


@triton.autotune(configs=_autotune_configs(), key=["GROUP", "BLOCK_M", "BLOCK_N", "BLOCK_D"])
@triton.jit
def _column_scores_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    qvalid_ptr,
    lse_ptr,
    scores_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mn,
    stride_qvb,
    stride_qvm,
    scaling,
    causal_offset,
    num_kv_heads,
    num_queries,
    num_keys,
    HEAD_DIM,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_QUERY_VALID: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = tl.cast(pid_bh // num_kv_heads, tl.int64)
    kv_head = tl.cast(pid_bh % num_kv_heads, tl.int64)
    col_start = pid_n * BLOCK_N
    cols = tl.cast(col_start, tl.int64) + tl.arange(0, BLOCK_N)
    col_ok = cols < num_keys
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = tl.load(
        k_ptr + batch * stride_kb + kv_head * stride_kh + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=col_ok[None, :] & d_ok[:, None],
        other=0.0,
    )  # [BLOCK_D, BLOCK_N], loaded once, reused for every query row
    q_base = q_ptr + batch * stride_qb
    valid_base = valid_ptr + batch * stride_mb + kv_head * stride_mh
    lse_base = lse_ptr + (batch * num_kv_heads * GROUP + kv_head * GROUP) * num_queries
    qk_scale = scaling * 1.4426950408889634

    num_rows = num_queries * GROUP
    first_row = 0
    if CAUSAL:  # queries before `col_start - causal_offset` see none of these keys
        first_row = tl.maximum(col_start - causal_offset, 0) * GROUP
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_start in range(first_row, num_rows, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        qi = rows // GROUP
        group_head = rows % GROUP
        row_ok = rows < num_rows
        if HAS_QUERY_VALID:
            real = tl.load(qvalid_ptr + batch * stride_qvb + qi * stride_qvm, mask=row_ok, other=0)
            row_ok = row_ok & (real != 0)
        q = _load_query_rows(
            q_base,
            q_ptr,
            stride_qh,
            stride_qm,
            stride_qd,
            0,
            kv_head * GROUP + group_head,
            qi,
            row_ok,
            offs_d,
            d_ok,
            HEAD_DIM,
            False,
        )
        lse2 = tl.load(lse_base + group_head * num_queries + qi, mask=row_ok, other=0.0)
        s = _dot(q, k, IEEE_DOT) * qk_scale
        allowed = _allowed_block(valid_base, stride_mn, cols, col_ok, qi, row_ok, causal_offset, HAS_VALID, CAUSAL)
        p = tl.where(allowed, tl.exp2(s - tl.where(allowed, lse2[:, None], 0.0)), 0.0)
        acc += tl.sum(p, 0)
    tl.store(scores_ptr + pid_bh * num_keys + cols, acc / GROUP, mask=col_ok)


def triton_attention_column_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    causal_new: bool = True,
    query_valid: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`~hf_longmem.kernels.attention_scores.reference.naive_attention_column_scores`.

    Arguments are not checked here (the public op does). ``block_m``/``block_n`` override the tiling (tests).
    """
    batch, q_heads, num_q, head_dim = query.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    rows = group * num_q
    block_d = _block_size(head_dim)
    block_m = block_m or max(16, min(64, triton.next_power_of_2(rows)))
    block_n = block_n or (64 if block_d <= 128 else 32)
    if valid is not None and valid.dim() == 2:
        valid = valid[:, None]
    valid_arg = valid.view(torch.uint8) if valid is not None else query
    valid_strides = (0, 0, 0) if valid is None else valid.stride()
    if valid is not None and valid.shape[1] == 1:
        valid_strides = (valid_strides[0], 0, valid_strides[2])
    qvalid_arg = query_valid.view(torch.uint8) if query_valid is not None else query
    qvalid_strides = (0, 0) if query_valid is None else query_valid.stride()
    causal_offset = num_keys - num_q if causal_new else 0
    common = {
        "GROUP": group,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": block_d,
        "HAS_VALID": valid is not None,
        "CAUSAL": causal_new,
        "IEEE_DOT": query.dtype == torch.float32,
    }

    lse2 = torch.empty(batch, q_heads, num_q, device=query.device, dtype=torch.float32)
    scores = torch.empty(batch, kv_heads, num_keys, device=query.device, dtype=torch.float32)
    with device_guard(query):
        _row_lse_kernel[(batch * kv_heads, triton.cdiv(rows, block_m))](
            query,
            keys,
            valid_arg,
            lse2,
            *query.stride(),
            *keys.stride(),
            *valid_strides,
            scaling,
            causal_offset,
            kv_heads,
            num_q,
            num_keys,
            head_dim,
            **common,
        )
        _column_scores_kernel[(batch * kv_heads, triton.cdiv(num_keys, block_n))](
            query,
            keys,
            valid_arg,
            qvalid_arg,
            lse2,
            scores,
            *query.stride(),
            *keys.stride(),
            *valid_strides,
            *qvalid_strides,
            scaling,
            causal_offset,
            kv_heads,
            num_q,
            num_keys,
            head_dim,
            HAS_QUERY_VALID=query_valid is not None,
            **common,
        )
    return scores
