"""LongGen's block-sparse attention in Triton: forward and backward (flash-attention style, float32 accumulation).

Tiles: ``BLOCK`` queries x ``BLOCK`` keys. A torch pre-pass (:func:`tile_layout`) marks, per row and query tile, the
key tiles that may hold an allowed pair (from each tile's smallest and largest real position: a conservative test,
exact per token inside the kernel), and the kernels skip every other tile: the work is proportional to the pattern's
non-zero tiles, not to ``q x n``. The token-level mask is computed inside the kernel from the positions, so the same
kernel serves training (positions ``0..T-1``), left-padded rows and a cache that evicted keys.

* forward: one program per ``(query tile, batch x query head)``; online softmax; writes ``out`` and ``lse``.
* backward: ``delta = rowsum(dO * O)`` in torch; ``dQ`` with one program per query tile (loop over key tiles);
  ``dK, dV`` with one program per ``(key tile, batch x KV head)`` looping over the GQA group's heads and the query
  tiles (no atomics).

Tiles are loaded in their dtype and multiplied in float32 with IEEE products (``input_precision="ieee"``): exact
against the float32 reference, but without tensor-core speed for half-precision inputs. Deviation from a production
kernel: the layout is a dense ``[b, q tiles, k tiles]`` flag table whose zero entries are
skipped by a branch, not a compacted index list, so a program still loops over (and skips) every key tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import SparsePattern

KIND_CODES = {"sink_window": 0, "block_sparse": 1}
BLOCK = 16


def _tile_bounds(positions: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` real position of each tile: ``[b, tiles]``; a tile without a real token gets ``(big, -1)``."""
    b, n = positions.shape
    tiles = triton.cdiv(n, block)
    padded = torch.full((b, tiles * block), -1, dtype=torch.int64, device=positions.device)
    padded[:, :n] = positions
    padded = padded.view(b, tiles, block)
    real = padded >= 0
    big = torch.iinfo(torch.int64).max // 4
    low = padded.masked_fill(~real, big).amin(-1)
    high = padded.masked_fill(~real, -1).amax(-1)
    return low, high


def tile_layout(query_positions, key_positions, pattern: SparsePattern, block: int = BLOCK) -> torch.Tensor:
    """``[b, q tiles, k tiles]`` int8: 1 where the tile pair may hold an allowed (query, key) pair.

    Each test over-approximates (``key <= query`` needs ``kmin <= qmax``; a window hit needs ``kmax > qmin - window``;
    ...), so a tile marked 0 certainly holds no allowed pair.
    """
    qlo, qhi = (t[:, :, None] for t in _tile_bounds(query_positions, block))
    klo, khi = (t[:, None, :] for t in _tile_bounds(key_positions, block))
    need = (klo <= qhi) & (qhi >= 0) & (khi >= 0)
    if pattern.kind == "sink_window":
        need &= (klo < pattern.sink_size) | (khi > qlo - pattern.window)
    else:
        size, stride = pattern.block_size, pattern.vertical_stride
        kb_lo, kb_hi, qb_lo = klo.clamp_min(0) // size, khi.clamp_min(0) // size, qlo.clamp_max(2**40) // size
        local = qb_lo - kb_hi < pattern.local_blocks
        vertical = (kb_hi + 1) // stride > kb_lo // stride  # some kb in [kb_lo, kb_hi] has (kb + 1) % stride == 0
        need &= local | vertical
    return need.to(torch.int8).contiguous()


@triton.jit
def _allowed(qpos, kpos, KIND: tl.constexpr, SINK, WINDOW, BLOCK_SIZE, LOCAL, STRIDE):
    """``[M, N]`` bool from query positions ``[M]`` and key positions ``[N]`` (``< 0``: pad)."""
    qp = qpos[:, None]
    kp = kpos[None, :]
    ok = (kp >= 0) & (qp >= 0) & (kp <= qp)
    if KIND == 0:
        ok = ok & ((kp < SINK) | (qp - kp < WINDOW))
    else:
        qb = tl.where(qp >= 0, qp, 0) // BLOCK_SIZE
        kb = tl.where(kp >= 0, kp, 0) // BLOCK_SIZE
        ok = ok & (((qb - kb) < LOCAL) | (((kb + 1) % STRIDE) == 0))
    return ok


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    QP,
    KP,
    LAYOUT,
    OUT,
    LSE,
    sqb,
    sqh,
    sqm,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sob,
    soh,
    som,
    num_heads,
    groups,
    num_q,
    num_k,
    q_tiles,
    k_tiles,
    scaling,
    SINK,
    WINDOW,
    BLOCK_SIZE,
    LOCAL,
    STRIDE,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_D,
    HEAD_DV,
):
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // groups
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    row_ok = rows < num_q
    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :],
        mask=row_ok[:, None] & (dims[None, :] < HEAD_D),
        other=0.0,
    ).to(tl.float32)
    qpos = tl.load(QP + b * num_q + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for kt in range(0, k_tiles):
        flag = tl.load(LAYOUT + (b * q_tiles + qt) * k_tiles + kt)
        if flag != 0:
            cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < num_k
            k = tl.load(
                K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :],
                mask=col_ok[:, None] & (dims[None, :] < HEAD_D),
                other=0.0,
            ).to(tl.float32)
            v = tl.load(
                V + b * svb + kvh * svh + cols[:, None] * svn + vdims[None, :],
                mask=col_ok[:, None] & (vdims[None, :] < HEAD_DV),
                other=0.0,
            ).to(tl.float32)
            kpos = tl.load(KP + b * num_k + cols, mask=col_ok, other=-1)
            allowed = _allowed(qpos, kpos, KIND, SINK, WINDOW, BLOCK_SIZE, LOCAL, STRIDE)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(
        OUT + b * sob + h * soh + rows[:, None] * som + vdims[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & (vdims[None, :] < HEAD_DV),
    )
    tl.store(LSE + (b * num_heads + h) * num_q + rows, lse, mask=row_ok)


@triton.jit
def _probabilities(q, k, qpos, kpos, lse, scaling, KIND: tl.constexpr, SINK, WINDOW, BLOCK_SIZE, LOCAL, STRIDE):
    """Recomputed softmax weights ``[M, N]`` of a tile (0 where not allowed or for an empty query row)."""
    allowed = _allowed(qpos, kpos, KIND, SINK, WINDOW, BLOCK_SIZE, LOCAL, STRIDE)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    return tl.where(allowed, tl.exp(s - lse_safe[:, None]), 0.0)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    QP,
    KP,
    LAYOUT,
    LSE,
    DO,
    DELTA,
    DQ,
    sqb,
    sqh,
    sqm,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sdb,
    sdh,
    sdm,
    num_heads,
    groups,
    num_q,
    num_k,
    q_tiles,
    k_tiles,
    scaling,
    SINK,
    WINDOW,
    BLOCK_SIZE,
    LOCAL,
    STRIDE,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_D,
    HEAD_DV,
):
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // groups
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    row_ok = rows < num_q
    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :],
        mask=row_ok[:, None] & (dims[None, :] < HEAD_D),
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b * sdb + h * sdh + rows[:, None] * sdm + vdims[None, :],
        mask=row_ok[:, None] & (vdims[None, :] < HEAD_DV),
        other=0.0,
    ).to(tl.float32)
    qpos = tl.load(QP + b * num_q + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + (b * num_heads + h) * num_q + rows, mask=row_ok, other=float("-inf"))
    delta = tl.load(DELTA + (b * num_heads + h) * num_q + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for kt in range(0, k_tiles):
        flag = tl.load(LAYOUT + (b * q_tiles + qt) * k_tiles + kt)
        if flag != 0:
            cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < num_k
            k = tl.load(
                K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :],
                mask=col_ok[:, None] & (dims[None, :] < HEAD_D),
                other=0.0,
            ).to(tl.float32)
            v = tl.load(
                V + b * svb + kvh * svh + cols[:, None] * svn + vdims[None, :],
                mask=col_ok[:, None] & (vdims[None, :] < HEAD_DV),
                other=0.0,
            ).to(tl.float32)
            kpos = tl.load(KP + b * num_k + cols, mask=col_ok, other=-1)
            p = _probabilities(q, k, qpos, kpos, lse, scaling, KIND, SINK, WINDOW, BLOCK_SIZE, LOCAL, STRIDE)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds, k, input_precision="ieee")
    tl.store(
        DQ + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :],
        (dq * scaling).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (dims[None, :] < HEAD_D),
    )


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    QP,
    KP,
    LAYOUT,
    LSE,
    DO,
    DELTA,
    DK,
    DV,
    sqb,
    sqh,
    sqm,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    sdb,
    sdh,
    sdm,
    num_heads,
    groups,
    num_q,
    num_k,
    q_tiles,
    k_tiles,
    scaling,
    SINK,
    WINDOW,
    BLOCK_SIZE,
    LOCAL,
    STRIDE,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_D,
    HEAD_DV,
):
    kt = tl.program_id(0)
    bh = tl.program_id(1)
    kv_heads = num_heads // groups
    b = bh // kv_heads
    kvh = bh % kv_heads
    cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    col_ok = cols < num_k
    k = tl.load(
        K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :],
        mask=col_ok[:, None] & (dims[None, :] < HEAD_D),
        other=0.0,
    ).to(tl.float32)
    v = tl.load(
        V + b * svb + kvh * svh + cols[:, None] * svn + vdims[None, :],
        mask=col_ok[:, None] & (vdims[None, :] < HEAD_DV),
        other=0.0,
    ).to(tl.float32)
    kpos = tl.load(KP + b * num_k + cols, mask=col_ok, other=-1)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, groups):
        h = kvh * groups + g
        for qt in range(0, q_tiles):
            flag = tl.load(LAYOUT + (b * q_tiles + qt) * k_tiles + kt)
            if flag != 0:
                rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = rows < num_q
                q = tl.load(
                    Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :],
                    mask=row_ok[:, None] & (dims[None, :] < HEAD_D),
                    other=0.0,
                ).to(tl.float32)
                do = tl.load(
                    DO + b * sdb + h * sdh + rows[:, None] * sdm + vdims[None, :],
                    mask=row_ok[:, None] & (vdims[None, :] < HEAD_DV),
                    other=0.0,
                ).to(tl.float32)
                qpos = tl.load(QP + b * num_q + rows, mask=row_ok, other=-1)
                lse = tl.load(LSE + (b * num_heads + h) * num_q + rows, mask=row_ok, other=float("-inf"))
                delta = tl.load(DELTA + (b * num_heads + h) * num_q + rows, mask=row_ok, other=0.0)
                p = _probabilities(q, k, qpos, kpos, lse, scaling, KIND, SINK, WINDOW, BLOCK_SIZE, LOCAL, STRIDE)
                dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    tl.store(
        DK + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :],
        (dk * scaling).to(DK.dtype.element_ty),
        mask=col_ok[:, None] & (dims[None, :] < HEAD_D),
    )
    tl.store(
        DV + b * svb + kvh * svh + cols[:, None] * svn + vdims[None, :],
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None] & (vdims[None, :] < HEAD_DV),
    )


def _pattern_args(pattern: SparsePattern) -> tuple:
    return (pattern.sink_size, pattern.window, pattern.block_size, pattern.local_blocks, pattern.vertical_stride)


def _launch_meta(query, keys, values, pattern: SparsePattern) -> dict:
    return dict(
        KIND=KIND_CODES[pattern.kind],
        BLOCK_M=BLOCK,
        BLOCK_N=BLOCK,
        BLOCK_D=max(16, triton.next_power_of_2(query.shape[-1])),
        BLOCK_DV=max(16, triton.next_power_of_2(values.shape[-1])),
        HEAD_D=query.shape[-1],
        HEAD_DV=values.shape[-1],
    )


def _forward(query, keys, values, qpos, kpos, scaling, pattern, layout):
    b, hq, nq, _ = query.shape
    hkv, nk = keys.shape[1], keys.shape[2]
    out = torch.empty(*query.shape[:3], values.shape[-1], dtype=query.dtype, device=query.device)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=query.device)
    q_tiles, k_tiles = layout.shape[1], layout.shape[2]
    _fwd_kernel[(q_tiles, b * hq)](
        query,
        keys,
        values,
        qpos,
        kpos,
        layout,
        out,
        lse,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        hq,
        hq // hkv,
        nq,
        nk,
        q_tiles,
        k_tiles,
        scaling,
        *_pattern_args(pattern),
        **_launch_meta(query, keys, values, pattern),
    )
    return out, lse


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, keys, values, qpos, kpos, scaling, pattern):
        layout = tile_layout(qpos, kpos, pattern)
        out, lse = _forward(query, keys, values, qpos, kpos, scaling, pattern, layout)
        ctx.save_for_backward(query, keys, values, qpos, kpos, layout, out, lse)
        ctx.scaling, ctx.pattern = scaling, pattern
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, keys, values, qpos, kpos, layout, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # [b, Hq, q]
        b, hq, nq, _ = query.shape
        hkv, nk = keys.shape[1], keys.shape[2]
        q_tiles, k_tiles = layout.shape[1], layout.shape[2]
        dq, dk, dv = torch.empty_like(query), torch.empty_like(keys), torch.empty_like(values)
        common = (
            query.stride(0),
            query.stride(1),
            query.stride(2),
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            values.stride(0),
            values.stride(1),
            values.stride(2),
            grad_out.stride(0),
            grad_out.stride(1),
            grad_out.stride(2),
            hq,
            hq // hkv,
            nq,
            nk,
            q_tiles,
            k_tiles,
            ctx.scaling,
            *_pattern_args(ctx.pattern),
        )
        meta = _launch_meta(query, keys, values, ctx.pattern)
        _bwd_dq_kernel[(q_tiles, b * hq)](
            query, keys, values, qpos, kpos, layout, lse, grad_out, delta, dq, *common, **meta
        )
        _bwd_dkdv_kernel[(k_tiles, b * hkv)](
            query, keys, values, qpos, kpos, layout, lse, grad_out, delta, dk, dv, *common, **meta
        )
        return dq, dk, dv, None, None, None, None


def triton_sparse_attention(query, keys, values, query_positions, key_positions, scaling, pattern):
    """Same contract as :func:`~hf_longmem.kernels.sparse_attention.reference.naive_sparse_attention` without the
    weights: ``(out [b, Hq, q, dv], lse [b, Hq, q])``; differentiable in query, keys and values."""
    query, keys, values = (t.contiguous() for t in (query, keys, values))
    qpos = query_positions.to(torch.int64).contiguous()
    kpos = key_positions.to(torch.int64).contiguous()
    return _SparseAttention.apply(query, keys, values, qpos, kpos, float(scaling), pattern)
