"""Chunked (WY / UT-transform) Triton kernel of the gated delta rule: every within-chunk product is a ``tl.dot``.

One program per (row = batch x head, block of ``BV`` value columns) walks the ``ceil(T / BT)`` chunks in order
with its ``[K, BV]`` slice of the state in registers (the columns of ``S`` never mix, so value blocks are
independent; ``A``, ``T`` and ``W`` below only involve keys and are recomputed by each block). Per chunk of ``BT``
tokens (notation of :mod:`~hf_longmem.kernels.gated_delta.reference`; ``G`` the in-chunk cumulative sum of ``g``,
``D_ij = exp(G_i - G_j)`` for ``j <= i`` else 0, ``G_L`` the last ``G`` of the chunk, ``S`` the state at its
start)::

    A  = strict_lower(diag(beta) K K^T * D)        T = (I + A)^-1   (forward substitution over the BT rows)
    W  = T diag(beta exp(G)) K                     Ut = T diag(beta) V
    U  = Ut - W S
    O  = scale * (diag(exp(G)) Q S + lower_incl(Q K^T * D) U)
    S <- exp(G_L) S + (diag(exp(G_L - G)) K)^T U

Every ``exp`` is of a non-positive number (masked before the ``exp``). A sequence that is not a multiple of ``BT``
is read with masked loads: the tail reads ``q = k = v = 0`` and ``g = beta = 0``, tokens that leave the state
unchanged. The forward stores ``S`` at each chunk start (``[rows, NC, K, V]`` float32) for the backward.

Backward (hand-derived; newest chunk first, carrying ``dS'``, the gradient of the chunk's end state, which starts
at ``dht``). Each chunk recomputes ``A, T, W, Ut, U`` from its checkpoint; with ``Qg = diag(exp(G)) Q``,
``P = lower_incl(Q K^T * D)``, ``Kd = diag(exp(G_L - G)) K``, ``Kb = diag(beta) K``, ``Kbg = diag(exp(G)) Kb``,
``Vb = diag(beta) V`` (so ``O = scale (Qg S + P U)``, ``U = T (Vb - Kbg S)``, ``S' = exp(G_L) S + Kd^T U``)::

    dU   = scale P^T dO + Kd dS'
    dS   = scale Qg^T dO + exp(G_L) dS' - W^T dU          (carried to the previous chunk; dh0 after the first)
    dP   = scale dO U^T     dQg = scale dO S^T     dKd = U dS'^T     dW = -dU S^T
    dT   = dW Kbg^T + dU Vb^T     dKbg = T^T dW     dVb = T^T dU
    dA   = strict_lower(-T^T dT T^T)                        (d(X^-1) = -X^-1 dX X^-1 with X = I + A)
    dq   = diag(exp(G)) dQg + (dP * D) K
    dk   = (dP * D)^T Q + (dA * D)^T Kb + diag(beta) (dA * D) K + diag(beta exp(G)) dKbg + diag(exp(G_L - G)) dKd
    dv   = diag(beta) dVb
    dbeta = rowsum(((dA * D) K + diag(exp(G)) dKbg) * K) + rowsum(dVb * V)
    dG   = rowsum(dQg * Qg + dKbg * Kbg - dKd * Kd) + rowsum(E) - colsum(E) + [i = last] dG_L,
           E = dP * P + dA * A   (D_ij = exp(G_i - G_j): dD * D adds to row i, subtracts from column j),
           dG_L = sum(dKd * Kd) + exp(G_L) sum(dS' * S)
    dg   = reverse cumulative sum of dG within the chunk    (G = cumsum(g))

``dv`` and ``dS`` are per value column; ``dq, dk, dg, dbeta`` sum over the columns, so each value block writes its
partial sums (``[blocks, ...]``) and the wrapper adds them. Memory: the checkpoints, nothing per token but the
gradients.

Precision: float32 inputs use exact float32 products (``input_precision="ieee"``); TF32, the GPU default, breaks
float32 parity because its error compounds through ``T = (I + A)^-1`` and the state carried over the chunks, so
float32 runs without tensor cores; bfloat16/float16 inputs use the default (TF32 tensor cores). Everything is
computed and accumulated in float32 either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# float32 ``a @ b``, exact products when IEEE (TF32 error compounds through T = (I + A)^-1 and the carried state)
from hf_longmem.kernels.decode_attention.triton import _dot

CHUNK_SIZES = (16, 32, 64)


@triton.jit
def _load_chunk(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    i_nh,
    t0,
    T,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    i_v,
):
    """The chunk's ``q, k [BT, BK]``, ``v [BT, BV]`` (value block ``i_v``), ``g, beta [BT]`` in float32; rows past
    ``T`` and padded columns read 0."""
    offs_t = t0 + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_t = offs_t < T
    mask_tk = mask_t[:, None] & (offs_k < K)[None, :]
    mask_tv = mask_t[:, None] & (offs_v < V)[None, :]
    b_q = tl.load(q_ptr + (i_nh * T + offs_t[:, None]) * K + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k_ptr + (i_nh * T + offs_t[:, None]) * K + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
    b_v = tl.load(v_ptr + (i_nh * T + offs_t[:, None]) * V + offs_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)
    b_g = tl.load(g_ptr + i_nh * T + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    b_beta = tl.load(beta_ptr + i_nh * T + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    return b_q, b_k, b_v, b_g, b_beta


@triton.jit
def _chunk_factors(b_k, b_v, b_g, b_beta, BT: tl.constexpr, IEEE: tl.constexpr):
    """``G [BT]``, ``D [BT, BT]``, ``A [BT, BT]``, ``T = (I + A)^-1``, ``W [BT, BK]``, ``Ut [BT, BV]`` of a chunk."""
    offs_t = tl.arange(0, BT)
    incl = offs_t[:, None] >= offs_t[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    b_G = tl.cumsum(b_g, 0)
    b_D = tl.where(incl, tl.exp(tl.where(incl, b_G[:, None] - b_G[None, :], 0.0)), 0.0)
    b_kb = b_k * b_beta[:, None]
    b_A = tl.where(strict, _dot(b_kb, tl.trans(b_k), IEEE) * b_D, 0.0)
    # T - I, row by row: (T - I)_i = -A_i - sum_{j<i} A_ij (T - I)_j (rows j < i are final; A_ij = 0 for j >= i)
    b_T = -b_A
    for i in range(1, BT):
        b_a = tl.sum(tl.where(offs_t[:, None] == i, b_T, 0.0), 0)
        b_a = b_a + tl.sum(b_a[:, None] * b_T, 0)
        b_T = tl.where(offs_t[:, None] == i, b_a[None, :], b_T)
    b_T = b_T + tl.where(offs_t[:, None] == offs_t[None, :], 1.0, 0.0)
    b_w = _dot(b_T, b_kb * tl.exp(b_G)[:, None], IEEE)
    b_ut = _dot(b_T, b_v * b_beta[:, None], IEEE)
    return b_G, b_D, b_A, b_T, b_w, b_ut


@triton.jit
def _chunk_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    h0_ptr,
    o_ptr,
    ht_ptr,
    ckpt_ptr,
    T,
    NC,
    scale,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    STORE_CKPT: tl.constexpr,
    IEEE: tl.constexpr,
):
    i_nh = tl.cast(tl.program_id(0), tl.int64)
    i_v = tl.program_id(1)
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_kv = (offs_k < K)[:, None] & (offs_v < V)[None, :]
    kv_offs = offs_k[:, None] * V + offs_v[None, :]
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_S += tl.load(h0_ptr + i_nh * K * V + kv_offs, mask=mask_kv, other=0.0).to(tl.float32)
    for c in range(0, NC):
        c64 = tl.cast(c, tl.int64)
        t0 = c64 * BT
        if STORE_CKPT:
            tl.store(ckpt_ptr + (i_nh * NC + c64) * K * V + kv_offs, b_S, mask=mask_kv)
        b_q, b_k, b_v, b_g, b_beta = _load_chunk(
            q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, i_nh, t0, T, K, V, BT, BK, BV, i_v
        )
        b_G, b_D, b_A, b_T, b_w, b_ut = _chunk_factors(b_k, b_v, b_g, b_beta, BT, IEEE)
        b_u = b_ut - _dot(b_w, b_S, IEEE)
        b_P = _dot(b_q, tl.trans(b_k), IEEE) * b_D
        b_o = (_dot(b_q * tl.exp(b_G)[:, None], b_S, IEEE) + _dot(b_P, b_u, IEEE)) * scale
        offs_tt = t0 + offs_t
        mask_tv = (offs_tt < T)[:, None] & (offs_v < V)[None, :]
        tl.store(
            o_ptr + (i_nh * T + offs_tt[:, None]) * V + offs_v[None, :], b_o.to(o_ptr.dtype.element_ty), mask=mask_tv
        )
        b_gl = tl.sum(tl.where(offs_t == BT - 1, b_G, 0.0), 0)
        b_kd = b_k * tl.exp(b_gl - b_G)[:, None]
        b_S = b_S * tl.exp(b_gl) + _dot(tl.trans(b_kd), b_u, IEEE)
    if STORE_HT:
        tl.store(ht_ptr + i_nh * K * V + kv_offs, b_S, mask=mask_kv)


@triton.jit
def _chunk_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    ckpt_ptr,
    do_ptr,
    dht_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dg_ptr,
    dbeta_ptr,
    dh0_ptr,
    T,
    NC,
    scale,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    IEEE: tl.constexpr,
):
    i_nh = tl.cast(tl.program_id(0), tl.int64)
    i_v = tl.program_id(1)
    part = tl.cast(i_v, tl.int64) * tl.num_programs(0) + i_nh  # this value block's slice of the partial sums
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < K
    mask_kv = mask_k[:, None] & (offs_v < V)[None, :]
    kv_offs = offs_k[:, None] * V + offs_v[None, :]
    strict = offs_t[:, None] > offs_t[None, :]
    last = offs_t == BT - 1
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dS += tl.load(dht_ptr + i_nh * K * V + kv_offs, mask=mask_kv, other=0.0).to(tl.float32)
    for cc in range(0, NC):
        c64 = tl.cast(NC - 1 - cc, tl.int64)
        t0 = c64 * BT
        offs_tt = t0 + offs_t
        mask_t = offs_tt < T
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_tv = mask_t[:, None] & (offs_v < V)[None, :]
        # recompute the chunk's forward from the state checkpointed at its start
        b_S = tl.load(ckpt_ptr + (i_nh * NC + c64) * K * V + kv_offs, mask=mask_kv, other=0.0)
        b_q, b_k, b_v, b_g, b_beta = _load_chunk(
            q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, i_nh, t0, T, K, V, BT, BK, BV, i_v
        )
        b_do = tl.load(do_ptr + (i_nh * T + offs_tt[:, None]) * V + offs_v[None, :], mask=mask_tv, other=0.0).to(
            tl.float32
        )
        b_G, b_D, b_A, b_T, b_w, b_ut = _chunk_factors(b_k, b_v, b_g, b_beta, BT, IEEE)
        b_eG = tl.exp(b_G)
        b_u = b_ut - _dot(b_w, b_S, IEEE)
        b_P = _dot(b_q, tl.trans(b_k), IEEE) * b_D
        b_gl = tl.sum(tl.where(last, b_G, 0.0), 0)
        b_tail = tl.exp(b_gl - b_G)
        b_kd = b_k * b_tail[:, None]
        b_kb = b_k * b_beta[:, None]
        b_kbg = b_kb * b_eG[:, None]
        b_Tt = tl.trans(b_T)
        # adjoints of O = scale (Qg S + P U) and S' = exp(G_L) S + Kd^T U, then of U = T (Vb - Kbg S)
        b_du = _dot(tl.trans(b_P), b_do, IEEE) * scale + _dot(b_kd, b_dS, IEEE)
        b_dqg = _dot(b_do, tl.trans(b_S), IEEE) * scale
        b_dP = _dot(b_do, tl.trans(b_u), IEEE) * scale
        b_dkd = _dot(b_u, tl.trans(b_dS), IEEE)
        b_dw = -_dot(b_du, tl.trans(b_S), IEEE)
        b_dT = _dot(b_dw, tl.trans(b_kbg), IEEE) + _dot(b_du, tl.trans(b_v * b_beta[:, None]), IEEE)
        b_dkbg = _dot(b_Tt, b_dw, IEEE)
        b_dvb = _dot(b_Tt, b_du, IEEE)
        b_dA = tl.where(strict, -_dot(_dot(b_Tt, b_dT, IEEE), b_Tt, IEEE), 0.0)
        b_dPD = b_dP * b_D
        b_dAD = b_dA * b_D
        b_dkb = _dot(b_dAD, b_k, IEEE)
        b_dq = b_dqg * b_eG[:, None] + _dot(b_dPD, b_k, IEEE)
        b_dk = (
            _dot(tl.trans(b_dPD), b_q, IEEE)
            + _dot(tl.trans(b_dAD), b_kb, IEEE)
            + b_dkb * b_beta[:, None]
            + b_dkbg * (b_beta * b_eG)[:, None]
            + b_dkd * b_tail[:, None]
        )
        b_dv = b_dvb * b_beta[:, None]
        b_dbeta = tl.sum(b_dkb * b_k, 1) + tl.sum(b_dkbg * b_k, 1) * b_eG + tl.sum(b_dvb * b_v, 1)
        # d/dG: through exp(G) (Qg, Kbg), exp(G_L - G) (Kd), D_ij = exp(G_i - G_j) (in P and A), exp(G_L) S
        b_E = b_dP * b_P + b_dA * b_A
        b_kd_dot = tl.sum(b_dkd * b_kd, 1)
        b_dgl = tl.sum(b_kd_dot, 0) + tl.exp(b_gl) * tl.sum(tl.sum(b_dS * b_S, 1), 0)
        b_dG = (
            tl.sum(b_dqg * b_q, 1) * b_eG
            + tl.sum(b_dkbg * b_kbg, 1)
            - b_kd_dot
            + tl.sum(b_E, 1)
            - tl.sum(b_E, 0)
            + tl.where(last, b_dgl, 0.0)
        )
        b_dg = tl.cumsum(b_dG, 0, reverse=True)  # G = cumsum(g)
        # gradient of the chunk-start state, carried to the previous chunk
        b_dS = (
            _dot(tl.trans(b_q * b_eG[:, None]), b_do, IEEE) * scale
            + tl.exp(b_gl) * b_dS
            - _dot(tl.trans(b_w), b_du, IEEE)
        )
        tk_offs = (part * T + offs_tt[:, None]) * K + offs_k[None, :]
        tl.store(dq_ptr + tk_offs, b_dq, mask=mask_tk)
        tl.store(dk_ptr + tk_offs, b_dk, mask=mask_tk)
        tl.store(dg_ptr + part * T + offs_tt, b_dg, mask=mask_t)
        tl.store(dbeta_ptr + part * T + offs_tt, b_dbeta, mask=mask_t)
        tl.store(dv_ptr + (i_nh * T + offs_tt[:, None]) * V + offs_v[None, :], b_dv, mask=mask_tv)
    if STORE_DH0:
        tl.store(dh0_ptr + i_nh * K * V + kv_offs, b_dS, mask=mask_kv)


def _tiles(key_dim: int, value_dim: int, chunk_size, block_v, need_grad: bool) -> tuple[int, int, int]:
    """``(BT, BK, BV)``. ``tl.dot`` needs every dimension ``>= 16``, so ``K`` and ``V`` are padded (masked).

    ``chunk_size`` is an upper bound: ``BT`` and ``BV`` are capped by shared memory, where Triton stages the
    float32 ``tl.dot`` operands and the transposes. Measured with ``triton.compile`` for sm_90 (Triton 3.9, no GPU
    needed): the backward holds about ten ``[BT, BT]`` tiles and needs 140-224 KiB at ``BT = 64`` whatever ``K``;
    with the caps below, TF32 dots (bf16/fp16 inputs) need at most 96 KiB in either kernel (every GPU from sm_80 on,
    sm_86/89's 99 KiB included) and exact float32 dots 108-132 KiB in the backward (sm_80 / sm_90 only). The caps:
    ``BT <= 32`` when a backward will run or ``K > 64``, ``BT = 16`` for ``K > 128`` (the forward alone keeps
    ``BT = 64`` for ``K <= 64``: at most 68 KiB); ``BV <= 64``, 32 for ``K > 64``, 16 for ``K > 128``. The result does
    not depend on ``BT``. Register use is not tuned on a GPU (ptxas reports spills at these tiles).
    """
    if key_dim > 256 or value_dim > 256:
        raise ValueError(
            f"the chunked Triton gated delta kernel holds [K, V] state tiles: K, V <= 256, got K = "
            f"{key_dim}, V = {value_dim}"
        )
    if isinstance(chunk_size, bool) or chunk_size not in CHUNK_SIZES:
        raise ValueError(f"`chunk_size` of the chunked Triton kernel must be one of {CHUNK_SIZES}, got {chunk_size!r}")
    bk = max(16, triton.next_power_of_2(key_dim))
    bt = min(chunk_size, 16 if bk > 128 else 32 if need_grad or bk > 64 else 64)
    if block_v is None:
        block_v = min(max(16, triton.next_power_of_2(value_dim)), 16 if bk > 128 else 32 if bk > 64 else 64)
    if isinstance(block_v, bool) or block_v not in (16, 32, 64, 128, 256):
        raise ValueError(f"`block_v` must be a power of two in [16, 256] or None, got {block_v!r}")
    return bt, bk, block_v


def _num_warps(bk: int) -> int:
    """8 warps from ``K = 64`` on (ptxas spills less than with 4); not timed on a GPU."""
    return 8 if bk >= 64 else 4


class _ChunkGatedDeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size, block_v):
        batch, heads, seq, key_dim = q.shape
        value_dim = v.shape[-1]
        need_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 4, 6))
        bt, bk, bv = _tiles(key_dim, value_dim, chunk_size, block_v, need_grad)
        rows = batch * heads
        chunks = triton.cdiv(seq, bt)
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        f32 = dict(dtype=torch.float32, device=q.device)
        o = torch.empty_like(v)
        ht = torch.empty(batch, heads, key_dim, value_dim, **f32) if output_final_state else o
        ckpt = torch.empty(rows, chunks, key_dim, value_dim, **f32) if need_grad else o
        h0 = initial_state.float().contiguous() if initial_state is not None else o
        ieee = all(x.dtype == torch.float32 for x in (q, k, v))
        _chunk_fwd_kernel[(rows, triton.cdiv(value_dim, bv))](
            q,
            k,
            v,
            g,
            beta,
            h0,
            o,
            ht,
            ckpt,
            seq,
            chunks,
            scale,
            K=key_dim,
            V=value_dim,
            BT=bt,
            BK=bk,
            BV=bv,
            USE_H0=initial_state is not None,
            STORE_HT=output_final_state,
            STORE_CKPT=need_grad,
            IEEE=ieee,
            num_warps=_num_warps(bk),
        )
        if need_grad:
            ctx.save_for_backward(q, k, v, g, beta, ckpt)
            ctx.meta = (scale, bt, bk, bv, initial_state.dtype if initial_state is not None else None)
            ctx.ieee = ieee
        return o, (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, ckpt = ctx.saved_tensors
        scale, bt, bk, bv, h0_dtype = ctx.meta
        batch, heads, seq, key_dim = q.shape
        value_dim = v.shape[-1]
        rows, chunks = ckpt.shape[:2]
        blocks = triton.cdiv(value_dim, bv)
        f32 = dict(dtype=torch.float32, device=q.device)
        # dq, dk, dg, dbeta sum over the value columns: one partial per value block, added here
        dq, dk = torch.empty(blocks, *q.shape, **f32), torch.empty(blocks, *k.shape, **f32)
        dg, dbeta = torch.empty(blocks, *g.shape, **f32), torch.empty(blocks, *beta.shape, **f32)
        dv = torch.empty(v.shape, **f32)
        dh0 = torch.empty(batch, heads, key_dim, value_dim, **f32) if h0_dtype is not None else dv
        dht_arg = dht.float().contiguous() if dht is not None else dv
        _chunk_bwd_kernel[(rows, blocks)](
            q,
            k,
            v,
            g,
            beta,
            ckpt,
            do.contiguous(),
            dht_arg,
            dq,
            dk,
            dv,
            dg,
            dbeta,
            dh0,
            seq,
            chunks,
            scale,
            K=key_dim,
            V=value_dim,
            BT=bt,
            BK=bk,
            BV=bv,
            USE_DHT=dht is not None,
            STORE_DH0=h0_dtype is not None,
            IEEE=ctx.ieee,
            num_warps=_num_warps(bk),
        )
        dq, dk, dg, dbeta = (x[0] if blocks == 1 else x.sum(0) for x in (dq, dk, dg, dbeta))
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            dg.to(g.dtype),
            dbeta.to(beta.dtype),
            None,
            dh0.to(h0_dtype) if h0_dtype is not None else None,
            None,
            None,
            None,
        )


def triton_chunk_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    scale,
    initial_state=None,
    output_final_state=False,
    chunk_size: int = 64,
    block_v: int | None = None,
):
    """Chunked Triton gated delta rule, forward and backward (see the module docstring).

    Args:
        q, k: ``[batch, heads, seq, K]``; v: ``[batch, heads, seq, V]``; g, beta: ``[batch, heads, seq]``
            (``K, V <= 256``).
        scale: output scale (a float).
        initial_state: ``[batch, heads, K, V]`` or ``None``.
        output_final_state: also return the final state.
        chunk_size: largest chunk ``BT``, one of 16, 32, 64 (the kernel caps it by shared memory, see
            :func:`_tiles`: 32 when gradients are needed or ``K > 64``, 16 when ``K > 128``).
        block_v: value columns per program (power of two in ``[16, 256]``; default ``V`` rounded up to a power of
            two ``>= 16``, at most 64, or 32 when ``K > 64``, 16 when ``K > 128``).

    Returns:
        ``o [batch, heads, seq, V]`` in ``v``'s dtype and the final state ``[batch, heads, K, V]`` float32 (or None).
    """
    if not torch.is_grad_enabled():  # no checkpoints and the forward-only chunk size under no_grad / inference
        q, k, v, g, beta = (x.detach() for x in (q, k, v, g, beta))
        initial_state = initial_state.detach() if initial_state is not None else None
    return _ChunkGatedDeltaFunction.apply(
        q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size, block_v
    )
