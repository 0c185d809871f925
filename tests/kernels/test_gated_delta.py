"""Gated delta rule: chunked torch path and Triton kernels vs the token-loop reference (forward and gradients),
MoM routing (packing, fused recurrent mixture), argument checks."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.kernels.gated_delta import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_torch,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_mom_gated_delta_rule,
    l2norm,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_mom_gated_delta_rule,
    pack_streams,
    plan_routing,
    unpack_mix,
)

from .common import DEVICE, needs_triton


def inputs(batch, heads, seq, key_dim, value_dim, seed=0, lead=(), dtype=torch.float32, strong_decay=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *lead, heads, seq)
    q = l2norm(torch.randn(*shape, key_dim, generator=gen))
    k = l2norm(torch.randn(*shape, key_dim, generator=gen))
    v = torch.randn(*shape, value_dim, generator=gen)
    g = -torch.rand(*shape, generator=gen) * (8.0 if strong_decay else 0.5)
    beta = torch.rand(*shape, generator=gen)
    h0 = torch.randn(batch, *lead, heads, key_dim, value_dim, generator=gen)
    return [x.to(DEVICE, dtype) for x in (q, k, v, g, beta)] + [h0.to(DEVICE)]


def grads(fn, tensors, seed=5):
    """Forward ``fn`` and the gradients of a random projection of (o, final state) w.r.t. ``tensors``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    o, state = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    dht = torch.randn(state.shape, generator=gen).to(o.device)
    ((o.float() * do).sum() + (state * dht).sum()).backward()
    return o.detach(), state.detach(), [leaf.grad for leaf in leaves]


CHUNK_CASES = [  # (batch, heads, seq, K, V, chunk, strong_decay)
    (2, 3, 37, 8, 6, 8, False),
    (1, 2, 64, 16, 16, 16, True),
    (2, 1, 5, 4, 12, 64, False),
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-T{c[2]}-K{c[3]}-V{c[4]}-C{c[5]}")
def test_chunk_torch_matches_recurrent_reference_fwd_bwd(case):
    b, h, t, kd, vd, chunk, strong = case
    tensors = inputs(b, h, t, kd, vd, strong_decay=strong)
    ref = grads(
        lambda *x: naive_recurrent_gated_delta_rule(*x[:5], initial_state=x[5], output_final_state=True), tensors
    )
    got = grads(
        lambda *x: chunk_gated_delta_rule_torch(*x[:5], initial_state=x[5], output_final_state=True, chunk_size=chunk),
        tensors,
    )
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-4)
    for name, a, e in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), got[2], ref[2]):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_zero_beta_and_gate_tokens_leave_state_unchanged():
    q, k, v, g, beta, h0 = inputs(1, 2, 12, 4, 4)
    g[..., 5:], beta[..., 5:] = 0.0, 0.0
    _, early = naive_recurrent_gated_delta_rule(
        q[:, :, :5], k[:, :, :5], v[:, :, :5], g[:, :, :5], beta[:, :, :5], initial_state=h0, output_final_state=True
    )
    _, late = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=4, backend="torch"
    )
    torch.testing.assert_close(late, early, atol=1e-6, rtol=1e-5)


def test_routing_pack_unpack():
    index = torch.tensor([[[0, 2], [1, 2], [0, 2], [1, 2]]])
    weights = torch.tensor([[[0.7, 1.0], [0.6, 1.0], [0.5, 1.0], [0.4, 1.0]]])
    valid = torch.tensor([[False, True, True, True]])
    plan = plan_routing(index, weights, 3, valid)
    assert plan.lengths.tolist() == [[1, 2, 3]]
    assert plan.token_index[0, 2].tolist() == [1, 2, 3] and plan.token_index[0, 1, :2].tolist() == [1, 3]
    x = torch.arange(4.0)[None, :, None]
    streams = pack_streams(x, plan)  # each stream slot holds its token's position
    mixed = unpack_mix(streams * 10, plan)
    # token t mixes w_0 * 10t + 1.0 * 10t; the pad token gets 0
    torch.testing.assert_close(mixed[0, :, 0], torch.tensor([0.0, 16.0, 30.0, 42.0]))


def test_fused_recurrent_mom_torch_matches_spec():
    q, k, v, g, beta, h0 = inputs(2, 2, 9, 4, 6, lead=(3,))
    gen = torch.Generator().manual_seed(3)
    weights, mask = torch.rand(2, 9, 3, generator=gen).to(DEVICE), (torch.rand(2, 9, 3, generator=gen) > 0.4).to(DEVICE)
    ref = naive_recurrent_mom_gated_delta_rule(
        q, k, v, g, beta, weights, mask, initial_state=h0, output_final_state=True
    )
    got = fused_recurrent_mom_gated_delta_rule(
        q, k, v, g, beta, weights, mask, initial_state=h0, output_final_state=True, backend="torch"
    )
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-4)


def test_argument_checks():
    q, k, v, g, beta, h0 = inputs(1, 2, 6, 4, 4)
    with pytest.raises(ValueError, match="`k`"):
        chunk_gated_delta_rule(q, k[..., :3], v, g, beta)
    with pytest.raises(ValueError, match="`g`"):
        chunk_gated_delta_rule(q, k, v, g[..., :2], beta)
    with pytest.raises(ValueError, match="`initial_state`"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0[..., :2])
    with pytest.raises(ValueError, match="`scale`"):
        chunk_gated_delta_rule(q, k, v, g, beta, scale=-1.0)
    with pytest.raises(ValueError, match="`backend`"):
        chunk_gated_delta_rule(q, k, v, g, beta, backend="cuda")
    with pytest.raises(ValueError, match="`chunk_size`"):
        chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match="routing_mask"):
        fused_recurrent_mom_gated_delta_rule(
            q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], torch.ones(1, 6, 1), torch.ones(1, 6, 1)
        )


TRITON_CASES = [  # (batch, heads, seq, K, V, checkpoint_every, with h0)
    (2, 2, 13, 8, 6, 4, True),
    (1, 3, 9, 5, 16, 16, False),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-T{c[2]}-K{c[3]}-V{c[4]}-ck{c[5]}")
def test_triton_matches_reference_fwd_bwd(case):
    from hf_longmem.kernels.gated_delta.triton import triton_fused_recurrent_gated_delta_rule

    b, h, t, kd, vd, every, with_h0 = case
    tensors = inputs(b, h, t, kd, vd, seed=7)
    if not with_h0:
        tensors[5] = torch.zeros_like(tensors[5])
    ref = grads(
        lambda *x: naive_recurrent_gated_delta_rule(*x[:5], initial_state=x[5], output_final_state=True), tensors
    )
    got = grads(
        lambda *x: triton_fused_recurrent_gated_delta_rule(
            *x[:5], kd**-0.5, initial_state=x[5] if with_h0 else None, output_final_state=True, checkpoint_every=every
        ),
        tensors,
    )
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-4)
    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")[: 6 if with_h0 else 5]
    for name, a, e in zip(names, got[2], ref[2]):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


@needs_triton
def test_triton_public_dispatch_and_mom_step():
    q, k, v, g, beta, h0 = inputs(2, 2, 3, 4, 6, lead=(3,), seed=11)
    gen = torch.Generator().manual_seed(4)
    weights = torch.rand(2, 3, 3, generator=gen).to(DEVICE)
    mask = (torch.rand(2, 3, 3, generator=gen) > 0.4).to(DEVICE)
    ref = naive_recurrent_mom_gated_delta_rule(
        q, k, v, g, beta, weights, mask, initial_state=h0, output_final_state=True
    )
    got = fused_recurrent_mom_gated_delta_rule(
        q, k, v, g, beta, weights, mask, initial_state=h0, output_final_state=True, backend="triton"
    )
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-4)
    flat = [x[:, 0] for x in (q, k, v, g, beta)]
    o, state = chunk_gated_delta_rule(*flat, initial_state=h0[:, 0], output_final_state=True, backend="triton")
    o_ref, state_ref = naive_recurrent_gated_delta_rule(*flat, initial_state=h0[:, 0], output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-4)


CHUNK_TRITON_CASES = [  # (batch, heads, seq, K, V, chunk, block_v, with h0, output_final_state)
    (1, 2, 37, 16, 32, 16, 16, True, True),  # two value blocks, two full chunks and a tail
    (2, 1, 37, 20, 16, 16, None, False, True),  # K padded to 32
    (1, 1, 45, 32, 12, 32, None, True, False),  # V padded to 16, no final state (no dht)
]


@needs_triton
@pytest.mark.parametrize(
    "case",
    CHUNK_TRITON_CASES,
    ids=lambda c: f"B{c[0]}-H{c[1]}-T{c[2]}-K{c[3]}-V{c[4]}-C{c[5]}-bv{c[6]}-h0{c[7]:d}-ht{c[8]:d}",
)
def test_triton_chunk_matches_reference_fwd_bwd(case):
    from hf_longmem.kernels.gated_delta.triton_chunk import triton_chunk_gated_delta_rule

    b, h, t, kd, vd, chunk, block_v, with_h0, final = case
    tensors = inputs(b, h, t, kd, vd, seed=13, strong_decay=True)  # g down to -8, beta in (0, 1)
    if not with_h0:
        tensors = tensors[:5]

    def run(fn):
        leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
        o, state = fn(*leaves[:5], initial_state=leaves[5] if with_h0 else None, output_final_state=final)
        gen = torch.Generator().manual_seed(5)
        loss = (o * torch.randn(o.shape, generator=gen).to(o.device)).sum()
        if final:
            loss = loss + (state * torch.randn(state.shape, generator=gen).to(o.device)).sum()
        loss.backward()
        return o.detach(), state, [leaf.grad for leaf in leaves]

    ref = run(naive_recurrent_gated_delta_rule)
    got = run(lambda *x, **kw: triton_chunk_gated_delta_rule(*x, kd**-0.5, chunk_size=chunk, block_v=block_v, **kw))
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
    assert (got[1] is None) == (not final)
    if final:
        torch.testing.assert_close(got[1].detach(), ref[1].detach(), atol=1e-5, rtol=1e-4)
    for name, a, e in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), got[2], ref[2]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@needs_triton
def test_triton_chunk_dispatch_and_checks():
    from hf_longmem.kernels.gated_delta import _triton_chunk_size
    from hf_longmem.kernels.gated_delta.triton_chunk import triton_chunk_gated_delta_rule

    assert [_triton_chunk_size(c) for c in (1, 16, 48, 64, 100)] == [16, 16, 32, 64, 64]
    q, k, v, g, beta, h0 = inputs(1, 2, 21, 8, 8, seed=17)
    o, state = chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=24, backend="triton"
    )
    o_ref, state_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-4)
    # forward alone (no backward to come) keeps 64-token chunks: two chunks, the second a 6-token tail
    q, k, v, g, beta, h0 = inputs(1, 1, 70, 16, 20, seed=19, strong_decay=True)
    with torch.no_grad():
        o, state = triton_chunk_gated_delta_rule(q, k, v, g, beta, 0.3, initial_state=h0, output_final_state=True)
    o_ref, state_ref = naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, 0.3, initial_state=h0, output_final_state=True
    )
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="`chunk_size`"):
        triton_chunk_gated_delta_rule(q, k, v, g, beta, 1.0, chunk_size=24)
    with pytest.raises(ValueError, match="K, V <= 256"):
        triton_chunk_gated_delta_rule(q, k, v.new_zeros(1, 1, 70, 257), g, beta, 1.0)


@needs_triton
def test_triton_chunk_under_no_grad_stores_no_checkpoints(monkeypatch):
    """Inputs that require grad, run under ``no_grad`` (inference): the forward-only tiles, no checkpoints."""
    from hf_longmem.kernels.gated_delta import triton_chunk

    asked = []
    tiles = triton_chunk._tiles
    monkeypatch.setattr(triton_chunk, "_tiles", lambda *a: asked.append(a[-1]) or tiles(*a))
    q = torch.randn(1, 1, 20, 16, device=DEVICE, requires_grad=True)
    k = l2norm(torch.randn(1, 1, 20, 16, device=DEVICE))
    v = torch.randn(1, 1, 20, 16, device=DEVICE)
    g, beta = -torch.rand(1, 1, 20, device=DEVICE), torch.rand(1, 1, 20, device=DEVICE)
    with torch.no_grad():
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, backend="triton")
    assert not o.requires_grad and asked == [False]
    chunk_gated_delta_rule(q, k, v, g, beta, backend="triton")[0].sum().backward()
    assert asked == [False, True] and q.grad is not None
