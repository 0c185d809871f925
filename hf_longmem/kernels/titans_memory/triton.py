"""Triton chunk step of the Titans depth-2 MLP memory, forward and backward (one program per (batch, head)).

Forward (per program, everything in SRAM): ``Z = K W1``, ``A = silu(Z)``, ``E = K + A W2 - V``,
``Delta = (E W2^T) * silu'(Z)``; the two weighted gradient sums ``G(w) = (K^T (w*Delta), A^T (w*E))`` for
``w = coef_w, coef_s``; then ``S' = decay_s S - G(coef_s)``, ``W' = decay_w W + mix_s S - G(coef_w)``.

Backward recomputes the forward intermediates and applies the hand-derived vector-Jacobian product (second order
through the explicit gradient, so the outer training loop gets exact gradients), matching autograd through
:func:`~hf_longmem.kernels.titans_memory.reference.memory_step_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b):
    """``a @ b`` with exact float32 products. The default on GPUs (TF32, 10-bit mantissa) would compound over the
    chunk-by-chunk memory updates and break parity with the float32 reference (the kernel computes in float32
    whatever the input dtype)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load2(ptr, rows, cols, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store2(ptr, value, rows, cols, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * n_cols + cols[None, :], value, mask=mask)


@triton.jit
def _silu_parts(z):
    s = tl.sigmoid(z)
    a = z * s
    sp = s * (1.0 + z * (1.0 - s))
    spp = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    return a, sp, spp


@triton.jit
def _memory_step_fwd_kernel(
    W1,
    W2,
    S1,
    S2,
    K,
    V,
    CW,
    CS,
    DW,
    DS,
    MX,
    W1o,
    W2o,
    S1o,
    S2o,
    C,
    D,
    HID,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.cast(tl.program_id(0), tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, BLOCK_D)
    rh = tl.arange(0, BLOCK_H)
    w1 = _load2(W1 + pid * D * HID, rd, rh, D, HID)
    w2 = _load2(W2 + pid * HID * D, rh, rd, HID, D)
    k = _load2(K + pid * C * D, rc, rd, C, D)
    v = _load2(V + pid * C * D, rc, rd, C, D)
    cw = tl.load(CW + pid * C + rc, mask=rc < C, other=0.0).to(tl.float32)
    cs = tl.load(CS + pid * C + rc, mask=rc < C, other=0.0).to(tl.float32)
    z = _dot(k, w1)
    a, sp, _ = _silu_parts(z)
    e = k + _dot(a, w2) - v
    delta = _dot(e, tl.trans(w2)) * sp
    g1w = _dot(tl.trans(k * cw[:, None]), delta)
    g2w = _dot(tl.trans(a * cw[:, None]), e)
    g1s = _dot(tl.trans(k * cs[:, None]), delta)
    g2s = _dot(tl.trans(a * cs[:, None]), e)
    dw = tl.load(DW + pid).to(tl.float32)
    ds = tl.load(DS + pid).to(tl.float32)
    mx = tl.load(MX + pid).to(tl.float32)
    s1 = _load2(S1 + pid * D * HID, rd, rh, D, HID)
    s2 = _load2(S2 + pid * HID * D, rh, rd, HID, D)
    _store2(W1o + pid * D * HID, dw * w1 + mx * s1 - g1w, rd, rh, D, HID)
    _store2(W2o + pid * HID * D, dw * w2 + mx * s2 - g2w, rh, rd, HID, D)
    _store2(S1o + pid * D * HID, ds * s1 - g1s, rd, rh, D, HID)
    _store2(S2o + pid * HID * D, ds * s2 - g2s, rh, rd, HID, D)


@triton.jit
def _memory_step_bwd_kernel(
    W1,
    W2,
    S1,
    S2,
    K,
    V,
    CW,
    CS,
    DW,
    DS,
    MX,
    GW1,
    GW2,
    GS1,
    GS2,  # incoming gradients of W1', W2', S1', S2'
    dW1,
    dW2,
    dS1,
    dS2,
    dK,
    dV,
    dCW,
    dCS,
    dDW,
    dDS,
    dMX,
    C,
    D,
    HID,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.cast(tl.program_id(0), tl.int64)
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, BLOCK_D)
    rh = tl.arange(0, BLOCK_H)
    w1 = _load2(W1 + pid * D * HID, rd, rh, D, HID)
    w2 = _load2(W2 + pid * HID * D, rh, rd, HID, D)
    s1 = _load2(S1 + pid * D * HID, rd, rh, D, HID)
    s2 = _load2(S2 + pid * HID * D, rh, rd, HID, D)
    k = _load2(K + pid * C * D, rc, rd, C, D)
    v = _load2(V + pid * C * D, rc, rd, C, D)
    cw = tl.load(CW + pid * C + rc, mask=rc < C, other=0.0).to(tl.float32)
    cs = tl.load(CS + pid * C + rc, mask=rc < C, other=0.0).to(tl.float32)
    dw = tl.load(DW + pid).to(tl.float32)
    ds = tl.load(DS + pid).to(tl.float32)
    mx = tl.load(MX + pid).to(tl.float32)
    gw1 = _load2(GW1 + pid * D * HID, rd, rh, D, HID)
    gw2 = _load2(GW2 + pid * HID * D, rh, rd, HID, D)
    gs1 = _load2(GS1 + pid * D * HID, rd, rh, D, HID)
    gs2 = _load2(GS2 + pid * HID * D, rh, rd, HID, D)
    # scalar gates
    tl.store(dDW + pid, tl.sum(tl.sum(w1 * gw1, 1), 0) + tl.sum(tl.sum(w2 * gw2, 1), 0))
    tl.store(dMX + pid, tl.sum(tl.sum(s1 * gw1, 1), 0) + tl.sum(tl.sum(s2 * gw2, 1), 0))
    tl.store(dDS + pid, tl.sum(tl.sum(s1 * gs1, 1), 0) + tl.sum(tl.sum(s2 * gs2, 1), 0))
    _store2(dS1 + pid * D * HID, mx * gw1 + ds * gs1, rd, rh, D, HID)
    _store2(dS2 + pid * HID * D, mx * gw2 + ds * gs2, rh, rd, HID, D)
    # recompute the forward intermediates
    z = _dot(k, w1)
    a, sp, spp = _silu_parts(z)
    e = k + _dot(a, w2) - v
    ew = _dot(e, tl.trans(w2))
    delta = ew * sp
    # the gradient sums enter W' and S' with a minus sign: cotangents of G(coef_w) and G(coef_s)
    c1w = -gw1
    c2w = -gw2
    c1s = -gs1
    c2s = -gs2
    kc1w = _dot(k, c1w)  # [C, HID]
    kc1s = _dot(k, c1s)
    ac2w = _dot(a, c2w)  # [C, D]
    ac2s = _dot(a, c2s)
    tl.store(dCW + pid * C + rc, tl.sum(ac2w * e, 1) + tl.sum(kc1w * delta, 1), mask=rc < C)
    tl.store(dCS + pid * C + rc, tl.sum(ac2s * e, 1) + tl.sum(kc1s * delta, 1), mask=rc < C)
    d_a = _dot(e * cw[:, None], tl.trans(c2w)) + _dot(e * cs[:, None], tl.trans(c2s))  # [C, HID]
    d_e = ac2w * cw[:, None] + ac2s * cs[:, None]  # [C, D]
    d_k = _dot(delta * cw[:, None], tl.trans(c1w)) + _dot(delta * cs[:, None], tl.trans(c1s))  # [C, D]
    d_delta = kc1w * cw[:, None] + kc1s * cs[:, None]  # [C, HID]
    d_ew = d_delta * sp
    d_e += _dot(d_ew, w2)
    d_w2 = _dot(tl.trans(d_ew), e)  # [HID, D]
    d_z = d_delta * ew * spp
    # E = K + A W2 - V
    d_k += d_e
    d_a += _dot(d_e, tl.trans(w2))
    d_w2 += _dot(tl.trans(a), d_e)
    d_z += d_a * sp
    d_k += _dot(d_z, tl.trans(w1))
    d_w1 = _dot(tl.trans(k), d_z)  # [D, HID]
    _store2(dW1 + pid * D * HID, d_w1 + dw * gw1, rd, rh, D, HID)
    _store2(dW2 + pid * HID * D, d_w2 + dw * gw2, rh, rd, HID, D)
    _store2(dK + pid * C * D, d_k, rc, rd, C, D)
    _store2(dV + pid * C * D, -d_e, rc, rd, C, D)


def _blocks(c: int, d: int, hid: int) -> dict:
    p2 = triton.next_power_of_2
    return {"BLOCK_C": max(16, p2(c)), "BLOCK_D": max(16, p2(d)), "BLOCK_H": max(16, p2(hid))}


class _MemoryStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w1, w2, s1, s2, k, v, cw, cs, dw, ds, mx):
        b, h, c, d = k.shape
        hid = w1.shape[-1]
        ins = [t.float().contiguous() for t in (w1, w2, s1, s2, k, v, cw, cs, dw, ds, mx)]
        outs = [torch.empty_like(ins[i]) for i in range(4)]
        _memory_step_fwd_kernel[(b * h,)](*ins, *outs, c, d, hid, **_blocks(c, d, hid))
        ctx.save_for_backward(*ins)
        ctx.dtypes = [t.dtype for t in (w1, w2, s1, s2, k, v, cw, cs, dw, ds, mx)]
        return tuple(o.to(t.dtype) for o, t in zip(outs, (w1, w2, s1, s2)))

    @staticmethod
    def backward(ctx, gw1, gw2, gs1, gs2):
        ins = ctx.saved_tensors
        b, h, c, d = ins[4].shape
        hid = ins[0].shape[-1]
        grads_in = [
            torch.zeros_like(ins[i]) if g is None else g.float().contiguous()
            for i, g in enumerate((gw1, gw2, gs1, gs2))
        ]
        outs = [torch.empty_like(t) for t in ins]  # dW1, dW2, dS1, dS2, dK, dV, dCW, dCS, dDW, dDS, dMX
        _memory_step_bwd_kernel[(b * h,)](*ins, *grads_in, *outs, c, d, hid, **_blocks(c, d, hid))
        return tuple(o.to(dt) for o, dt in zip(outs, ctx.dtypes))


def triton_memory_step(weights, momentum, k, v, coef_w, coef_s, decay_w, decay_s, mix_s):
    """Triton version of :func:`~hf_longmem.kernels.titans_memory.reference.memory_step_reference` (depth 2)."""
    w1, w2 = weights
    s1, s2 = momentum
    nw1, nw2, ns1, ns2 = _MemoryStep.apply(w1, w2, s1, s2, k, v, coef_w, coef_s, decay_w, decay_s, mix_s)
    return (nw1, nw2), (ns1, ns2)
