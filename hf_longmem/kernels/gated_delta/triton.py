"""Triton kernels of the gated delta rule: one pass over time per (row, head), state tile in registers.

* ``_gdr_fwd_kernel`` — forward; optionally writes the state every ``BT`` tokens (checkpoints for the backward)
  and the final state.
* ``_gdr_bwd_kernel`` — backward, walking the checkpointed chunks in reverse: each chunk's states are recomputed
  forward into a per-program scratch buffer, then the token-level adjoint recurrence runs backwards
  (``dS_{t-1} = alpha_t (dS_t + k_t dp_t^T)`` with ``dp_t = -beta_t dS_t^T k_t``), giving ``dq, dk, dv, dg, dbeta``
  and ``dh0``. Memory: ``T / BT`` checkpoints of ``[K, V]`` per (row, head) plus one ``BT x K x V`` scratch.
* ``_mom_fwd_kernel`` — MoM's routed recurrent step (decode): per (row, head), loop over the ``M`` memories and the
  tokens, update a memory only where the token is routed to it, and accumulate the routing-weighted reads
  (gather of the routed states, masking and the weighted mix fused in one kernel).

Every program owns a whole ``[K, V]`` state (``K, V <= 256``), so reductions over ``K`` or ``V`` stay in registers.
This is the recurrent form (``fused_recurrent_gated_delta_rule`` and MoM's decode step); the chunked WY form
(``tl.dot`` products within a chunk, used by ``chunk_gated_delta_rule``) is
:mod:`~hf_longmem.kernels.gated_delta.triton_chunk`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CHECKPOINT_EVERY = 64


@triton.jit
def _gdr_fwd_kernel(
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
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    STORE_CKPT: tl.constexpr,
):
    i_nh = tl.cast(tl.program_id(0), tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    kv_offs = offs_k[:, None] * V + offs_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        state += tl.load(h0_ptr + i_nh * K * V + kv_offs, mask=mask_kv, other=0.0).to(tl.float32)
    for c in range(0, NC):
        c64 = tl.cast(c, tl.int64)
        if STORE_CKPT:
            tl.store(ckpt_ptr + (i_nh * NC + c64) * K * V + kv_offs, state, mask=mask_kv)
        for j in range(0, BT):
            t = c64 * BT + tl.cast(j, tl.int64)
            b_q = tl.load(q_ptr + (i_nh * T + t) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            b_k = tl.load(k_ptr + (i_nh * T + t) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            b_v = tl.load(v_ptr + (i_nh * T + t) * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            b_g = tl.load(g_ptr + i_nh * T + t).to(tl.float32)
            b_beta = tl.load(beta_ptr + i_nh * T + t).to(tl.float32)
            state = state * tl.exp(b_g)
            pred = tl.sum(state * b_k[:, None], 0)
            u = b_beta * (b_v - pred)
            state = state + b_k[:, None] * u[None, :]
            b_o = tl.sum(state * b_q[:, None], 0) * scale
            tl.store(o_ptr + (i_nh * T + t) * V + offs_v, b_o.to(o_ptr.dtype.element_ty), mask=mask_v)
    if STORE_HT:
        tl.store(ht_ptr + i_nh * K * V + kv_offs, state, mask=mask_kv)


@triton.jit
def _gdr_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    ckpt_ptr,
    do_ptr,
    dht_ptr,
    scratch_ptr,
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
    BK: tl.constexpr,
    BV: tl.constexpr,
    BT: tl.constexpr,
    USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
):
    i_nh = tl.cast(tl.program_id(0), tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    kv_offs = offs_k[:, None] * V + offs_v[None, :]
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        d_state += tl.load(dht_ptr + i_nh * K * V + kv_offs, mask=mask_kv, other=0.0).to(tl.float32)
    scratch = scratch_ptr + i_nh * BT * K * V
    for cc in range(0, NC):
        c64 = tl.cast(NC - 1 - cc, tl.int64)
        state = tl.load(ckpt_ptr + (i_nh * NC + c64) * K * V + kv_offs, mask=mask_kv, other=0.0)
        # recompute the chunk forward, keeping the state before each token
        for j in range(0, BT):
            t = c64 * BT + tl.cast(j, tl.int64)
            tl.store(scratch + tl.cast(j, tl.int64) * K * V + kv_offs, state, mask=mask_kv)
            b_k = tl.load(k_ptr + (i_nh * T + t) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            b_v = tl.load(v_ptr + (i_nh * T + t) * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            b_g = tl.load(g_ptr + i_nh * T + t).to(tl.float32)
            b_beta = tl.load(beta_ptr + i_nh * T + t).to(tl.float32)
            state = state * tl.exp(b_g)
            pred = tl.sum(state * b_k[:, None], 0)
            state = state + b_k[:, None] * (b_beta * (b_v - pred))[None, :]
        tl.debug_barrier()
        # adjoint recurrence, newest token first
        for jj in range(0, BT):
            j64 = tl.cast(BT - 1 - jj, tl.int64)
            t = c64 * BT + j64
            prev = tl.load(scratch + j64 * K * V + kv_offs, mask=mask_kv, other=0.0)
            b_q = tl.load(q_ptr + (i_nh * T + t) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            b_k = tl.load(k_ptr + (i_nh * T + t) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            b_v = tl.load(v_ptr + (i_nh * T + t) * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            b_g = tl.load(g_ptr + i_nh * T + t).to(tl.float32)
            b_beta = tl.load(beta_ptr + i_nh * T + t).to(tl.float32)
            b_do = tl.load(do_ptr + (i_nh * T + t) * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            alpha = tl.exp(b_g)
            decayed = prev * alpha
            pred = tl.sum(decayed * b_k[:, None], 0)
            err = b_v - pred
            u = b_beta * err
            new = decayed + b_k[:, None] * u[None, :]
            d_state += scale * b_q[:, None] * b_do[None, :]
            b_dq = scale * tl.sum(new * b_do[None, :], 1)
            b_dk = tl.sum(d_state * u[None, :], 1)
            du = tl.sum(d_state * b_k[:, None], 0)
            b_dbeta = tl.sum(du * err, 0)
            b_dv = b_beta * du
            dpred = -b_beta * du
            d_decayed = d_state + b_k[:, None] * dpred[None, :]
            b_dk += tl.sum(decayed * dpred[None, :], 1)
            b_dg = tl.sum(tl.sum(d_decayed * decayed, 1), 0)
            d_state = d_decayed * alpha
            tl.store(dq_ptr + (i_nh * T + t) * K + offs_k, b_dq, mask=mask_k)
            tl.store(dk_ptr + (i_nh * T + t) * K + offs_k, b_dk, mask=mask_k)
            tl.store(dv_ptr + (i_nh * T + t) * V + offs_v, b_dv, mask=mask_v)
            tl.store(dg_ptr + i_nh * T + t, b_dg)
            tl.store(dbeta_ptr + i_nh * T + t, b_dbeta)
        tl.debug_barrier()
    if STORE_DH0:
        tl.store(dh0_ptr + i_nh * K * V + kv_offs, d_state, mask=mask_kv)


@triton.jit
def _mom_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    w_ptr,
    m_ptr,
    h0_ptr,
    o_ptr,
    ht_ptr,
    T,
    M,
    H,
    scale,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
):
    pid = tl.cast(tl.program_id(0), tl.int64)
    b = pid // H
    h = pid % H
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    mask_k = offs_k < K
    mask_v = offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    kv_offs = offs_k[:, None] * V + offs_v[None, :]
    o_base = o_ptr + pid * T * V  # o is [B, H, T, V]
    for m in range(0, M):
        m64 = tl.cast(m, tl.int64)
        row = (b * M + m64) * H + h  # (b, m, h) in [B, M, H, ...]
        state = tl.zeros([BK, BV], dtype=tl.float32)
        if USE_H0:
            state += tl.load(h0_ptr + row * K * V + kv_offs, mask=mask_kv, other=0.0).to(tl.float32)
        for t in range(0, T):
            t64 = tl.cast(t, tl.int64)
            routed = tl.load(m_ptr + (b * T + t64) * M + m64).to(tl.int32) != 0
            weight = tl.load(w_ptr + (b * T + t64) * M + m64).to(tl.float32)
            b_q = tl.load(q_ptr + (row * T + t64) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            b_k = tl.load(k_ptr + (row * T + t64) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            b_v = tl.load(v_ptr + (row * T + t64) * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            b_g = tl.where(routed, tl.load(g_ptr + row * T + t64).to(tl.float32), 0.0)
            b_beta = tl.where(routed, tl.load(beta_ptr + row * T + t64).to(tl.float32), 0.0)
            state = state * tl.exp(b_g)
            pred = tl.sum(state * b_k[:, None], 0)
            state = state + b_k[:, None] * (b_beta * (b_v - pred))[None, :]
            read = tl.sum(state * b_q[:, None], 0) * scale
            mix = tl.where(routed, weight, 0.0)
            acc = tl.load(o_base + t64 * V + offs_v, mask=mask_v, other=0.0)
            tl.store(o_base + t64 * V + offs_v, acc + mix * read, mask=mask_v)
        if STORE_HT:
            tl.store(ht_ptr + row * K * V + kv_offs, state, mask=mask_kv)


def _blocks(key_dim: int, value_dim: int) -> tuple[int, int]:
    if key_dim > 256 or value_dim > 256:
        raise ValueError(
            f"the Triton gated delta kernels hold a [K, V] state tile: K, V <= 256, got {key_dim}, {value_dim}"
        )
    return max(triton.next_power_of_2(key_dim), 2), max(triton.next_power_of_2(value_dim), 2)


class _GatedDeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, every):
        batch, heads, seq, key_dim = q.shape
        value_dim = v.shape[-1]
        rows = batch * heads
        bk, bv = _blocks(key_dim, value_dim)
        chunks = max(1, triton.cdiv(seq, every))
        pad = chunks * every - seq  # tail tokens with g = beta = 0 (and zero q, k, v) leave the state unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)).contiguous() for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)).contiguous() for x in (g, beta))
        padded = seq + pad
        need_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 4, 6))
        o = torch.empty_like(v)
        ht = q.new_empty(batch, heads, key_dim, value_dim, dtype=torch.float32) if output_final_state else o
        ckpt = q.new_empty(rows, chunks, key_dim, value_dim, dtype=torch.float32) if need_grad else o
        h0 = initial_state.float().contiguous() if initial_state is not None else o
        _gdr_fwd_kernel[(rows,)](
            q,
            k,
            v,
            g,
            beta,
            h0,
            o,
            ht,
            ckpt,
            padded,
            chunks,
            scale,
            K=key_dim,
            V=value_dim,
            BK=bk,
            BV=bv,
            BT=every,
            USE_H0=initial_state is not None,
            STORE_HT=output_final_state,
            STORE_CKPT=need_grad,
        )
        if need_grad:
            ctx.save_for_backward(q, k, v, g, beta, ckpt)
            ctx.meta = (
                scale,
                every,
                chunks,
                seq,
                initial_state is not None,
                initial_state.dtype if initial_state is not None else None,
            )
        return o[:, :, :seq], (ht if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, ckpt = ctx.saved_tensors
        scale, every, chunks, seq, has_h0, h0_dtype = ctx.meta
        batch, heads, padded, key_dim = q.shape
        value_dim = v.shape[-1]
        rows = batch * heads
        bk, bv = _blocks(key_dim, value_dim)
        do = F.pad(do, (0, 0, 0, padded - seq)).contiguous()
        f32 = dict(dtype=torch.float32, device=q.device)
        dq, dk = torch.empty(q.shape, **f32), torch.empty(k.shape, **f32)
        dv = torch.empty(v.shape, **f32)
        dg, dbeta = torch.empty(g.shape, **f32), torch.empty(beta.shape, **f32)
        dh0 = torch.empty(batch, heads, key_dim, value_dim, **f32) if has_h0 else dq
        scratch = torch.empty(rows, every, key_dim, value_dim, **f32)
        dht_arg = dht.float().contiguous() if dht is not None else dq
        _gdr_bwd_kernel[(rows,)](
            q,
            k,
            v,
            g,
            beta,
            ckpt,
            do,
            dht_arg,
            scratch,
            dq,
            dk,
            dv,
            dg,
            dbeta,
            dh0,
            padded,
            chunks,
            scale,
            K=key_dim,
            V=value_dim,
            BK=bk,
            BV=bv,
            BT=every,
            USE_DHT=dht is not None,
            STORE_DH0=has_h0,
        )
        dq, dk, dv, dg, dbeta = (x[:, :, :seq] for x in (dq, dk, dv, dg, dbeta))
        grads = [
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            dg.to(g.dtype),
            dbeta.to(beta.dtype),
            None,
            dh0.to(h0_dtype) if has_h0 else None,
            None,
            None,
        ]
        return tuple(grads)


def triton_fused_recurrent_gated_delta_rule(
    q, k, v, g, beta, scale, initial_state=None, output_final_state=False, checkpoint_every: int = CHECKPOINT_EVERY
):
    """Triton gated delta rule, forward and backward (see the module docstring); arguments as
    :func:`~hf_longmem.kernels.gated_delta.fused_recurrent_gated_delta_rule`."""
    return _GatedDeltaFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state, checkpoint_every)


def triton_fused_recurrent_mom_gated_delta_rule(
    q, k, v, g, beta, routing_weights, routing_mask, scale, initial_state=None, output_final_state=False
):
    """Triton MoM recurrent step (forward only: it serves decoding); arguments as
    :func:`~hf_longmem.kernels.gated_delta.fused_recurrent_mom_gated_delta_rule`."""
    batch, memories, heads, seq, key_dim = q.shape
    value_dim = v.shape[-1]
    bk, bv = _blocks(key_dim, value_dim)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    weights = routing_weights.float().contiguous()
    mask = routing_mask.to(torch.int8).contiguous()
    o = torch.zeros(batch, heads, seq, value_dim, dtype=torch.float32, device=q.device)
    ht = q.new_empty(batch, memories, heads, key_dim, value_dim, dtype=torch.float32) if output_final_state else o
    h0 = initial_state.float().contiguous() if initial_state is not None else o
    _mom_fwd_kernel[(batch * heads,)](
        q,
        k,
        v,
        g,
        beta,
        weights,
        mask,
        h0,
        o,
        ht,
        seq,
        memories,
        heads,
        scale,
        K=key_dim,
        V=value_dim,
        BK=bk,
        BV=bv,
        USE_H0=initial_state is not None,
        STORE_HT=output_final_state,
    )
    return o.to(v.dtype), (ht if output_final_state else None)
