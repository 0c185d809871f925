"""Torch reference (the spec) and chunked torch path of the gated delta rule, plus the routed MoM form.

Notation (as in fla's ``gated_delta_rule``): per head, the state ``S`` is a ``[K, V]`` matrix. For each token ``t``
with key ``k_t`` (L2-normalised by the caller), value ``v_t``, log-decay ``g_t <= 0`` and writing strength
``beta_t in (0, 1)``::

    S   <- exp(g_t) * S                          # forgetting (gate alpha_t = exp(g_t))
    u_t  = beta_t * (v_t - S^T k_t)             # delta-rule error, scaled
    S   <- S + k_t u_t^T                         # i.e. S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t  = scale * S^T q_t

A token with ``beta = 0`` and ``g = 0`` leaves the state unchanged: the MoM layer uses this to skip memories a token
is not routed to, and to right-pad packed streams.

:func:`naive_recurrent_gated_delta_rule` loops over tokens: it is the specification. :func:`chunk_gated_delta_rule_torch`
computes the same thing chunk-parallel (the WY/UT-transform form of fla's chunk kernels, linear in sequence length):
inside a chunk of ``C`` tokens with cumulative log-decay ``G_i = sum_{j<=i} g_j`` and chunk-start state ``S_0``,

    (I + A) U = beta * V - diag(beta * exp(G)) K S_0,      A_ij = beta_i exp(G_i - G_j) k_i . k_j  (j < i)
    o_i       = scale * (exp(G_i) S_0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) u_j)
    S_C       = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j u_j^T

so ``U = W~ - W S_0`` with ``W = (I + A)^{-1} diag(beta exp(G)) K`` and ``W~ = (I + A)^{-1} diag(beta) V`` computed
for all chunks at once (a unit-lower-triangular solve, no loop over tokens); only ``S`` is carried across chunks.
Every ``exp`` is of a non-positive number, so nothing overflows however strong the decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x**2) + eps)`` over the last axis (fla's ``use_qk_l2norm_in_kernel``), in ``x``'s dtype."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule (the specification; a Python loop over tokens).

    Args:
        q: ``[batch, heads, seq, K]`` queries.
        k: ``[batch, heads, seq, K]`` keys (normally L2-normalised).
        v: ``[batch, heads, seq, V]`` values.
        g: ``[batch, heads, seq]`` log-decay (``<= 0``; ``alpha = exp(g)``).
        beta: ``[batch, heads, seq]`` writing strength.
        scale: output scale, default ``K ** -0.5``.
        initial_state: ``[batch, heads, K, V]`` or ``None`` (zeros).
        output_final_state: return the state after the last token.

    Returns:
        ``o [batch, heads, seq, V]`` in ``v``'s dtype and the final state ``[batch, heads, K, V]`` float32 (or None).
    """
    batch, heads, seq, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float32)
    if initial_state is not None:
        state = state + initial_state.float()
    qf, kf, vf, gf, bf = (x.float() for x in (q, k, v, g, beta))
    outputs = []
    for t in range(seq):
        state = state * gf[:, :, t, None, None].exp()
        error = vf[:, :, t] - torch.einsum("bhkv,bhk->bhv", state, kf[:, :, t])
        state = state + torch.einsum("bhk,bhv->bhkv", kf[:, :, t], bf[:, :, t, None] * error)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, qf[:, :, t]) * scale)
    o = torch.stack(outputs, dim=2) if outputs else vf.new_zeros(batch, heads, 0, v.shape[-1])
    return o.to(v.dtype), (state if output_final_state else None)


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk-parallel gated delta rule in torch (same signature and result as the naive form, plus ``chunk_size``).

    Cost is linear in ``seq``: each chunk does ``C x C`` and ``C x K x V`` work, and a loop over the
    ``ceil(seq / C)`` chunks carries the ``[K, V]`` state. Differentiable by autograd. ``seq`` need not be a multiple
    of ``chunk_size``: the tail is padded with ``beta = g = 0`` tokens, which leave the state unchanged.

    Args: see :func:`naive_recurrent_gated_delta_rule`; ``chunk_size``: tokens per chunk ``C``.

    Returns:
        ``o [batch, heads, seq, V]`` in ``v``'s dtype and the final state ``[batch, heads, K, V]`` float32 (or None).
    """
    batch, heads, seq, key_dim = q.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    size = chunk_size
    pad = (-seq) % size
    qf, kf, vf, gf, bf = (x.float() for x in (q, k, v, g, beta))
    if pad:
        qf, kf, vf = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf))
        gf, bf = (F.pad(x, (0, pad)) for x in (gf, bf))
    n = (seq + pad) // size
    qc, kc, vc = (x.reshape(batch, heads, n, size, -1) for x in (qf, kf, vf))
    gc, bc = gf.reshape(batch, heads, n, size), bf.reshape(batch, heads, n, size)
    cum = gc.cumsum(-1)  # G_i
    lower = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # exp(G_i - G_j) for j <= i, 0 above the diagonal (masked before exp: no overflow)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    kk = kc @ kc.transpose(-1, -2)
    a = (bc[..., :, None] * kk * decay).tril(-1)
    eye = torch.eye(size, dtype=a.dtype, device=a.device)
    system = eye + a
    rhs = torch.cat([(bc * cum.exp())[..., None] * kc, bc[..., None] * vc], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    w, u_tilde = solved[..., :key_dim], solved[..., key_dim:]
    qk = (qc @ kc.transpose(-1, -2)) * decay
    q_decayed = qc * cum.exp()[..., None]
    last = cum[..., -1]  # G_C per chunk
    k_to_end = kc * (last[..., None] - cum).exp()[..., None]

    state = q.new_zeros(batch, heads, key_dim, value_dim, dtype=torch.float32)
    if initial_state is not None:
        state = state + initial_state.float()
    outputs = []
    for i in range(n):
        u = u_tilde[:, :, i] - w[:, :, i] @ state
        outputs.append(q_decayed[:, :, i] @ state + qk[:, :, i] @ u)
        state = last[:, :, i, None, None].exp() * state + k_to_end[:, :, i].transpose(-1, -2) @ u
    o = torch.cat(outputs, dim=2)[:, :, :seq] * scale
    return o.to(v.dtype), (state if output_final_state else None)


def naive_recurrent_mom_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    routing_weights: torch.Tensor,
    routing_mask: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mixture of memories, token by token (the specification of MoM's memory math).

    Each of ``M`` memories has its own ``[K, V]`` state per head. Token ``t`` updates memory ``m`` only where
    ``routing_mask[b, t, m]``; the output mixes the routed memories' reads::

        o_t = sum_{m routed} routing_weights[b, t, m] * scale * S_{m,t}^T q_{m,t}

    Args:
        q: ``[batch, M, heads, seq, K]`` queries as seen by each memory (MoM's short conv runs per memory stream).
        k: ``[batch, M, heads, seq, K]``.
        v: ``[batch, M, heads, seq, V]``.
        g, beta: ``[batch, M, heads, seq]``.
        routing_weights: ``[batch, seq, M]`` mixing weights (only read where routed).
        routing_mask: ``[batch, seq, M]`` bool, True where the token is routed to the memory.
        scale: default ``K ** -0.5``.
        initial_state: ``[batch, M, heads, K, V]`` or ``None``.

    Returns:
        ``o [batch, heads, seq, V]`` in ``v``'s dtype and the final states ``[batch, M, heads, K, V]`` (float32).
    """
    batch, memories, heads, seq, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    state = q.new_zeros(batch, memories, heads, key_dim, v.shape[-1], dtype=torch.float32)
    if initial_state is not None:
        state = state + initial_state.float()
    qf, kf, vf, gf, bf = (x.float() for x in (q, k, v, g, beta))
    mask = routing_mask.transpose(1, 2)  # [b, M, seq]
    weights = routing_weights.float().transpose(1, 2)
    outputs = []
    for t in range(seq):
        routed = mask[:, :, t, None, None, None]
        new = state * gf[..., t, None, None].exp()
        error = vf[..., t, :] - torch.einsum("bmhkv,bmhk->bmhv", new, kf[..., t, :])
        new = new + torch.einsum("bmhk,bmhv->bmhkv", kf[..., t, :], bf[..., t, None] * error)
        state = torch.where(routed, new, state)
        reads = torch.einsum("bmhkv,bmhk->bmhv", state, qf[..., t, :]) * scale
        mix = torch.where(mask[:, :, t], weights[:, :, t], torch.zeros_like(weights[:, :, t]))
        outputs.append(torch.einsum("bm,bmhv->bhv", mix, reads))
    o = torch.stack(outputs, dim=2) if outputs else vf.new_zeros(batch, heads, 0, v.shape[-1])
    return o.to(v.dtype), (state if output_final_state else None)
