"""Titans memory kernels: chunk-parallel torch path == per-token recurrent spec; Triton chunk step == torch (fwd+bwd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_longmem.kernels.titans_memory import (
    chunk_coefficients,
    chunk_titans_memory,
    memory_step,
    naive_recurrent_titans_memory,
)
from tests.kernels.common import DEVICE, needs_triton


def _inputs(b, h, T, d, hid, depth, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).requires_grad_(grad)

    q, k = (F.normalize(torch.randn(b, h, T, d, generator=g), dim=-1).requires_grad_(grad) for _ in range(2))
    v = r(b, h, T, d)
    lr = (0.3 * torch.rand(b, h, T, generator=g)).requires_grad_(grad)
    log_eta = (-torch.rand(b, h, T, generator=g)).requires_grad_(grad)
    log_keep = (-0.1 * torch.rand(b, h, T, generator=g)).requires_grad_(grad)
    w = (r(b, h, d, hid, scale=0.3), r(b, h, hid, d, scale=0.3)) if depth == 2 else (r(b, h, d, d, scale=0.3),)
    s = tuple(r(*x.shape, scale=0.1) for x in w)
    return q, k, v, lr, log_eta, log_keep, w, s


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [1, 3, 5, 16])
def test_chunk_parallel_equals_recurrent_spec(depth, chunk):
    q, k, v, lr, le, lk, w, s = _inputs(2, 2, 13, 6, 10, depth)
    out, w_new, s_new = chunk_titans_memory(q, k, v, lr, le, lk, w, s, chunk_size=chunk, backend="torch")
    ref, w_ref, s_ref = naive_recurrent_titans_memory(q, k, v, lr, le, lk, w, s, chunk_size=chunk)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip((*w_new, *s_new), (*w_ref, *s_ref)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_chunk_parallel_gradients_equal_recurrent_spec():
    inputs = _inputs(1, 2, 9, 4, 8, 2, grad=True)
    leaves = [*inputs[:6], *inputs[6], *inputs[7]]
    grads = []
    for fn in (chunk_titans_memory, naive_recurrent_titans_memory):
        out, w, s = fn(*inputs, chunk_size=3)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + sum(x.pow(2).sum() for x in (*w, *s))
        grads.append(torch.autograd.grad(loss, leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_per_row_lengths_equal_separate_rows():
    q, k, v, lr, le, lk, w, s = _inputs(2, 1, 11, 4, 8, 2)
    lengths = torch.tensor([7, 11])
    out, w_new, s_new = chunk_titans_memory(q, k, v, lr, le, lk, w, s, chunk_size=3, lengths=lengths)
    for row, n in enumerate(lengths.tolist()):
        part = [x[row : row + 1, :, :n] for x in (q, k, v, lr, le, lk)]
        ref, w_ref, s_ref = naive_recurrent_titans_memory(
            *part, tuple(x[row : row + 1] for x in w), tuple(x[row : row + 1] for x in s), chunk_size=3
        )
        torch.testing.assert_close(out[row : row + 1, :, :n], ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(w_new[0][row : row + 1], w_ref[0], atol=2e-5, rtol=1e-4)


def test_coefficients_fold_the_token_recurrence():
    lr, le, lk = torch.rand(5), -torch.rand(5), -torch.rand(5)
    coef_w, coef_s, decay_w, decay_s, mix_s = chunk_coefficients(lr, le, lk)
    # scalar "weights": W_i = keep_i W + S_i, S_i = eta_i S - theta_i g_i with g one-hot per token
    for j in range(5):
        W, S = torch.tensor(0.7), torch.tensor(-0.3)
        for i in range(5):
            S = le[i].exp() * S - lr[i] * (1.0 if i == j else 0.0)
            W = lk[i].exp() * W + S
        torch.testing.assert_close(W, decay_w * 0.7 + mix_s * -0.3 - coef_w[j])
        torch.testing.assert_close(S, decay_s * -0.3 - coef_s[j])


@needs_triton
@pytest.mark.parametrize("shape", [(1, 2, 5, 6, 12), (2, 1, 8, 4, 8)], ids=["B1-H2-C5-D6-F12", "B2-H1-C8-D4-F8"])
def test_triton_step_equals_torch_forward_and_backward(shape):
    b, h, c, d, hid = shape
    q, k, v, lr, le, lk, w, s = _inputs(b, h, c, d, hid, 2, seed=3, grad=True)
    leaves = [k, v, lr, le, lk, *w, *s]
    results = {}
    for backend in ("torch", "triton"):
        coefs = chunk_coefficients(lr, le, lk)
        args = [t.to(DEVICE) for t in (k, v, *coefs)]
        new_w, new_s = memory_step(
            tuple(x.to(DEVICE) for x in w), tuple(x.to(DEVICE) for x in s), *args, backend=backend
        )
        outs = [*new_w, *new_s]
        cot = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i, o in enumerate(outs)]
        loss = sum((o * g).sum() for o, g in zip(outs, cot))
        results[backend] = ([o.detach().cpu() for o in outs], [g.cpu() for g in torch.autograd.grad(loss, leaves)])
    for a, b_ in zip(results["torch"][0] + results["torch"][1], results["triton"][0] + results["triton"][1]):
        torch.testing.assert_close(b_, a, atol=2e-5, rtol=1e-4)


@needs_triton
def test_triton_backend_in_chunk_loop():
    q, k, v, lr, le, lk, w, s = _inputs(1, 2, 10, 4, 8, 2, seed=5)
    q, k, v, lr, le, lk = (t.to(DEVICE) for t in (q, k, v, lr, le, lk))
    w, s = tuple(t.to(DEVICE) for t in w), tuple(t.to(DEVICE) for t in s)
    ref = chunk_titans_memory(q, k, v, lr, le, lk, w, s, chunk_size=4, backend="torch")
    tri = chunk_titans_memory(q, k, v, lr, le, lk, w, s, chunk_size=4, backend="triton")
    torch.testing.assert_close(tri[0], ref[0], atol=2e-5, rtol=1e-4)


def test_bad_arguments():
    q, k, v, lr, le, lk, w, s = _inputs(1, 1, 4, 4, 8, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_titans_memory(q, k, v, lr, le, lk, w, chunk_size=0)
    with pytest.raises(ValueError, match="lr"):
        chunk_titans_memory(q, k, v, lr[..., :2], le, lk, w)
    with pytest.raises(ValueError, match="lengths"):
        chunk_titans_memory(q, k, v, lr, le, lk, w, lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="depth-2"):
        memory_step((w[0],), (s[0],), k, v, *chunk_coefficients(lr, le, lk), backend="triton")
