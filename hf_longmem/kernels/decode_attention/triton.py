"""Flash-decoding in Triton: split-K attention of a few queries over a (compressed) KV cache.

One program owns one ``(batch, kv_head)``, a tile of ``BLOCK_M`` query rows and one split of the key axis. The
rows are the ``group * q`` queries of all query heads that share the KV head (row ``r`` is query ``r // group`` of
head ``kv_head * group + r % group``), so each key/value block is loaded once for the whole GQA group and keys are
never repeated. Each split writes a float32 partial output and its log-sum-exp; a second kernel merges the splits
exactly (``out = sum_s exp(lse_s - lse) out_s``).

The same kernel serves ThinK's channel-pruned keys (``HAS_CHANNEL_INDEX``): the query row is gathered at the KV
head's kept channels before the dot product, so pruned keys are never re-expanded.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _autotune_configs():
    # Under TRITON_INTERPRET=1 tests patch the autotuner to keep the first config only.
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (4, 3), (8, 2), (2, 2))]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` accumulated in float32; exact float32 products when ``IEEE`` (float32 inputs), else the default."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _allowed_block(
    valid_ptr,
    stride_vn,
    cols,
    col_ok,
    qi,
    row_ok,
    causal_offset,
    HAS_VALID: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` bool: row (query ``qi``) may read slot ``cols``."""
    allowed = row_ok[:, None] & col_ok[None, :]
    if HAS_VALID:
        real = tl.load(valid_ptr + cols * stride_vn, mask=col_ok, other=0)
        allowed = allowed & (real != 0)[None, :]
    if CAUSAL:
        allowed = allowed & (cols[None, :] <= (causal_offset + qi)[:, None])
    return allowed


@triton.jit
def _load_query_rows(
    q_ptr,
    cidx_ptr,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_cd,
    head,
    qi,
    row_ok,
    offs_d,
    d_ok,
    QUERY_DIM,
    HAS_CHANNEL_INDEX: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_D]`` query rows, gathered at the KV head's kept channels when ``HAS_CHANNEL_INDEX``."""
    if HAS_CHANNEL_INDEX:
        channels = tl.cast(tl.load(cidx_ptr + offs_d * stride_cd, mask=d_ok, other=0), tl.int64)
        ch_ok = d_ok & (channels >= 0) & (channels < QUERY_DIM)
    else:
        channels = offs_d
        ch_ok = d_ok
    ptrs = q_ptr + head[:, None] * stride_qh + qi[:, None] * stride_qm + channels[None, :] * stride_qd
    return tl.load(ptrs, mask=row_ok[:, None] & ch_ok[None, :], other=0.0)


@triton.autotune(configs=_autotune_configs(), key=["GROUP", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV"])
@triton.jit
def _decode_attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    valid_ptr,
    cidx_ptr,
    o_part_ptr,
    lse_part_ptr,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mn,
    stride_cb,
    stride_ch,
    stride_cd,
    scaling,
    softcap,
    causal_offset,
    num_kv_heads,
    num_queries,
    num_keys,
    num_splits,
    split_len,
    QUERY_DIM,
    KEY_DIM,
    VALUE_DIM,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_CHANNEL_INDEX: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    batch = tl.cast(pid_bh // num_kv_heads, tl.int64)
    kv_head = tl.cast(pid_bh % num_kv_heads, tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = qi < num_queries
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < KEY_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM

    q = _load_query_rows(
        q_ptr + batch * stride_qb,
        cidx_ptr + batch * stride_cb + kv_head * stride_ch,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_cd,
        head,
        qi,
        row_ok,
        offs_d,
        d_ok,
        QUERY_DIM,
        HAS_CHANNEL_INDEX,
    )
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    valid_base = valid_ptr + batch * stride_mb + kv_head * stride_mh
    qk_scale = scaling * 1.4426950408889634  # log2(e): softmax in base 2

    start = pid_s * split_len
    stop = tl.minimum(start + split_len, num_keys)
    if CAUSAL:  # no slot past the last query of this row tile
        last_query = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, num_queries - 1)
        stop = tl.minimum(stop, causal_offset + last_query + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for block_start in range(start, stop, BLOCK_N):
        cols = tl.cast(block_start, tl.int64) + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        k = tl.load(
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 2 sigmoid(2x) - 1; then to base 2
            s = _dot(q, k, IEEE_DOT) * scaling
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0) * 1.4426950408889634
        else:
            s = _dot(q, k, IEEE_DOT) * qk_scale
        allowed = _allowed_block(valid_base, stride_mn, cols, col_ok, qi, row_ok, causal_offset, HAS_VALID, CAUSAL)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=col_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + _dot(tl.cast(p, v.dtype), v, IEEE_DOT)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    # partial buffers: o_part [b, Hq, q, splits, dv], lse_part [b, Hq, q, splits], contiguous
    part_row = ((batch * num_kv_heads * GROUP + head) * num_queries + qi) * num_splits + pid_s
    tl.store(lse_part_ptr + part_row, lse, mask=row_ok)
    tl.store(o_part_ptr + part_row[:, None] * VALUE_DIM + offs_dv[None, :], out, mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    o_part_ptr,
    lse_part_ptr,
    out_ptr,
    lse_ptr,
    num_splits,
    VALUE_DIM,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One program per query row: ``lse = logsumexp_s lse_s``, ``out = sum_s exp(lse_s - lse) out_s``."""
    row = tl.cast(tl.program_id(0), tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM
    lse_s = tl.load(lse_part_ptr + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    o_s = tl.load(
        o_part_ptr + (row * num_splits + offs_s[:, None]) * VALUE_DIM + offs_dv[None, :],
        mask=s_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )
    out = tl.sum(o_s * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + row, lse)
    tl.store(out_ptr + row * VALUE_DIM + offs_dv, tl.cast(out, out_ptr.dtype.element_ty), mask=dv_ok)


def _block_size(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device), a no-op on CPU (interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(device: torch.device, programs: int, num_keys: int, block_n: int) -> int:
    """Enough splits of the key axis to fill the GPU (about two programs per SM), at least one block each."""
    if device.type == "cuda":
        target = 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    else:  # interpreter: a few splits, so the merge path is exercised
        target = 4
    return max(1, min(math.ceil(target / max(programs, 1)), math.ceil(num_keys / block_n)))


def decode_attention_fwd(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None,
    causal_offset: int | None,
    channel_index: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches split-K decode attention (arguments already checked by the public op).

    Args:
        query: ``[b, Hq, q, d]``.
        keys: ``[b, Hkv, n, dk]`` with ``dk = d``, or ``dk = d_keep`` when ``channel_index`` is given.
        values: ``[b, Hkv, n, dv]``.
        valid: ``[b, 1 or Hkv, n]`` bool or ``None``.
        causal_offset: query ``i`` sees slots ``<= causal_offset + i``; ``None``: no causal limit.
        channel_index: ``[b, Hkv, d_keep]`` integer, the query channels each KV head's keys kept.
        softcap: ``tanh(s / softcap) * softcap`` of the scaled logits, or ``None``.
        block_n: keys per block (default 64, or 32 for wide heads); num_splits: key-axis splits (default: fill
            the device).

    Returns:
        ``out [b, Hq, q, dv]`` (query dtype) and ``lse [b, Hq, q]`` float32.
    """
    batch, q_heads, num_q, query_dim = query.shape
    kv_heads, num_keys, key_dim = keys.shape[1], keys.shape[2], keys.shape[3]
    value_dim = values.shape[-1]
    group = q_heads // kv_heads
    rows = group * num_q
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    block_d, block_dv = _block_size(key_dim), _block_size(value_dim)
    if block_n is None:
        block_n = 64 if max(block_d, block_dv) <= 128 else 32
    m_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = _num_splits(query.device, batch * kv_heads * m_blocks, num_keys, block_n)
    split_len = triton.cdiv(triton.cdiv(max(num_keys, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(num_keys, split_len))

    o_part = torch.empty(batch, q_heads, num_q, num_splits, value_dim, device=query.device, dtype=torch.float32)
    lse_part = torch.empty(batch, q_heads, num_q, num_splits, device=query.device, dtype=torch.float32)
    valid_arg = valid.view(torch.uint8) if valid is not None else query
    valid_strides = valid.stride() if valid is not None else (0, 0, 0)
    if valid is not None and valid.shape[1] == 1:
        valid_strides = (valid_strides[0], 0, valid_strides[2])
    cidx_arg = channel_index if channel_index is not None else query
    cidx_strides = channel_index.stride() if channel_index is not None else (0, 0, 0)

    out = torch.empty(batch, q_heads, num_q, value_dim, device=query.device, dtype=query.dtype)
    lse = torch.empty(batch, q_heads, num_q, device=query.device, dtype=torch.float32)
    with device_guard(query):
        grid = (batch * kv_heads, m_blocks, num_splits)
        _decode_attention_fwd_kernel[grid](
            query,
            keys,
            values,
            valid_arg,
            cidx_arg,
            o_part,
            lse_part,
            *query.stride(),
            *keys.stride(),
            *values.stride(),
            *valid_strides,
            *cidx_strides,
            scaling,
            softcap if softcap is not None else 1.0,
            causal_offset if causal_offset is not None else 0,
            kv_heads,
            num_q,
            num_keys,
            num_splits,
            split_len,
            query_dim,
            key_dim,
            value_dim,
            GROUP=group,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            BLOCK_DV=block_dv,
            HAS_VALID=valid is not None,
            HAS_CHANNEL_INDEX=channel_index is not None,
            CAUSAL=causal_offset is not None,
            IEEE_DOT=query.dtype == torch.float32,
            HAS_SOFTCAP=softcap is not None,
        )
        _merge_splits_kernel[(batch * q_heads * num_q,)](
            o_part,
            lse_part,
            out,
            lse,
            num_splits,
            value_dim,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            BLOCK_DV=block_dv,
        )
    return out, lse


def triton_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    causal_new: bool = True,
    *,
    softcap: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`~hf_longmem.kernels.decode_attention.reference.naive_decode_attention` (unchecked).

    ``valid`` may be ``[b, n]`` or ``[b, Hkv, n]``. ``block_n``/``num_splits`` override the tiling (tests).
    """
    if valid is not None and valid.dim() == 2:
        valid = valid[:, None]
    num_q, num_keys = query.shape[-2], keys.shape[-2]
    offset = num_keys - num_q if causal_new else None
    return decode_attention_fwd(
        query, keys, values, scaling, valid, offset, softcap=softcap, block_n=block_n, num_splits=num_splits
    )
