"""Torch reference of the Titans neural long-term memory (Behrouz et al., 2024, "Titans: Learning to Memorize at
Test Time"): an MLP memory updated by gradient descent with momentum and weight decay on the associative loss.

Notation (per batch row and memory head; ``d`` head dim, ``c`` chunk size):

- memory ``f_W(x) = x + silu(x W1) W2`` (depth 2, the paper's default ``L_M = 2``) or ``f_W(x) = x + x W1``
  (depth 1, a linear memory); row vectors, ``W1 [d, hidden]``, ``W2 [hidden, d]``;
- per-token loss ``l_t(W) = 1/2 ||f_W(k_t) - v_t||^2`` with learning rate ``theta_t``;
- surprise (momentum) ``S_t = eta_t S_{t-1} - theta_t grad l_t(W_{t'})`` and weights
  ``W_t = (1 - alpha_t) W_{t-1} + S_t`` (paper eqs. 10, 13, 14), where ``t'`` is the start of ``t``'s chunk: the
  paper's mini-batch gradient descent (Sec. 3.2), all gradients of a chunk at the weights the chunk starts with;
- retrieval: token ``t`` reads ``f_{W}(q_t)`` with the weights left after the last chunk that ends at or before
  ``t`` (``W`` after ``floor((t + 1) / c)`` chunks), as in the official-style titans-pytorch. With ``c = 1`` this is
  exactly the paper's per-token recurrence ``y_t = M_t(q_t)``.

Gates are passed in log space for stability: ``log_eta = log(eta)`` and ``log_keep = log(1 - alpha)`` (both <= 0).

:func:`naive_recurrent_titans_memory` is the per-token specification (gradients by autograd). The chunk-parallel
form used for training folds a chunk's token recurrences into closed-form scalar coefficients
(:func:`chunk_coefficients`) and weighted sums of per-token gradients (:func:`memory_step_reference`, explicit
gradient formulas, differentiable for the outer training loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Weights = tuple[torch.Tensor, ...]


def memory_mlp(x: torch.Tensor, weights: Weights) -> torch.Tensor:
    """Apply the memory ``f_W``.

    Args:
        x: ``[batch, heads, n, d]``.
        weights: ``(W1 [batch, heads, d, hidden], W2 [batch, heads, hidden, d])`` or ``(W1 [batch, heads, d, d],)``.

    Returns:
        ``[batch, heads, n, d]``.
    """
    if len(weights) == 1:
        return x + x @ weights[0]
    return x + F.silu(x @ weights[0]) @ weights[1]


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def weighted_memory_grads(weights: Weights, k: torch.Tensor, v: torch.Tensor, token_weights: torch.Tensor) -> list:
    """``sum_t w_t grad_W l_t(W)`` for several weightings ``w`` at once, by explicit formulas (no autograd).

    Args:
        weights: memory weights, see :func:`memory_mlp`.
        k, v: ``[batch, heads, c, d]``.
        token_weights: ``[m, batch, heads, c]``: ``m`` weightings of the per-token gradients.

    Returns:
        ``m`` tuples of gradients shaped like ``weights``.
    """
    if len(weights) == 1:
        err = k + k @ weights[0] - v  # [b, h, c, d]
        return [((k * w.unsqueeze(-1)).transpose(-1, -2) @ err,) for w in token_weights]
    w1, w2 = weights
    z = k @ w1  # [b, h, c, hidden]
    a = F.silu(z)
    err = k + a @ w2 - v  # [b, h, c, d]
    delta = (err @ w2.transpose(-1, -2)) * _silu_grad(z)  # [b, h, c, hidden]
    out = []
    for w in token_weights:
        w = w.unsqueeze(-1)
        out.append(((k * w).transpose(-1, -2) @ delta, (a * w).transpose(-1, -2) @ err))
    return out


def chunk_coefficients(
    lr: torch.Tensor, log_eta: torch.Tensor, log_keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold a chunk's per-token recurrences ``S_i = eta_i S_{i-1} - theta_i g_i``, ``W_i = keep_i W_{i-1} + S_i``
    into ``S_end = decay_s S - sum_l coef_s[l] g_l`` and ``W_end = decay_w W + mix_s S - sum_l coef_w[l] g_l``.

    Args:
        lr, log_eta, log_keep: ``[..., c]`` per-token ``theta``, ``log eta``, ``log(1 - alpha)`` of one chunk.

    Returns:
        ``coef_w [..., c]``, ``coef_s [..., c]``, ``decay_w [...]``, ``decay_s [...]``, ``mix_s [...]``.
    """
    c = lr.shape[-1]
    cum_eta = log_eta.cumsum(-1)  # L_eta(i)
    cum_keep = log_keep.cumsum(-1)  # L_keep(i)
    last_eta, last_keep = cum_eta[..., -1:], cum_keep[..., -1:]
    coef_s = lr * torch.exp(last_eta - cum_eta)
    # exponent[l, i] = L_keep(c) - L_keep(i) + L_eta(i) - L_eta(l) for i >= l (all <= 0)
    inner = (cum_eta - cum_keep).unsqueeze(-2) - cum_eta.unsqueeze(-1) + last_keep.unsqueeze(-1)
    upper = torch.ones(c, c, dtype=torch.bool, device=lr.device).triu()
    inner = inner.masked_fill(~upper, float("-inf"))
    coef_w = lr * torch.logsumexp(inner, dim=-1).exp()
    mix_s = torch.logsumexp(last_keep - cum_keep + cum_eta, dim=-1).exp()
    return coef_w, coef_s, last_keep.squeeze(-1).exp(), last_eta.squeeze(-1).exp(), mix_s


def memory_step_reference(
    weights: Weights,
    momentum: Weights,
    k: torch.Tensor,
    v: torch.Tensor,
    coef_w: torch.Tensor,
    coef_s: torch.Tensor,
    decay_w: torch.Tensor,
    decay_s: torch.Tensor,
    mix_s: torch.Tensor,
) -> tuple[Weights, Weights]:
    """One chunk update of all ``(batch, head)`` memories (gradients at the chunk's starting weights).

    Args:
        weights, momentum: ``W`` and ``S``, tuples of ``[batch, heads, ...]`` (see :func:`memory_mlp`).
        k, v: ``[batch, heads, c, d]`` keys and values of the chunk.
        coef_w, coef_s: ``[batch, heads, c]``; decay_w, decay_s, mix_s: ``[batch, heads]`` from
            :func:`chunk_coefficients`.

    Returns:
        ``(new_weights, new_momentum)``.
    """
    grads_w, grads_s = weighted_memory_grads(weights, k, v, torch.stack((coef_w, coef_s)))
    dw, ds, mx = (x[..., None, None] for x in (decay_w, decay_s, mix_s))
    new_s = tuple(ds * s - g for s, g in zip(momentum, grads_s))
    new_w = tuple(dw * w + mx * s - g for w, s, g in zip(weights, momentum, grads_w))
    return new_w, new_s


def naive_recurrent_titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    log_eta: torch.Tensor,
    log_keep: torch.Tensor,
    weights: Weights,
    momentum: Weights | None = None,
    chunk_size: int = 1,
) -> tuple[torch.Tensor, Weights, Weights]:
    """Per-token recurrent specification (loops over tokens; gradients by autograd, differentiable).

    Args:
        q, k, v: ``[batch, heads, T, d]``.
        lr, log_eta, log_keep: ``[batch, heads, T]``.
        weights: initial ``W`` (tuple of ``[batch, heads, ...]``); momentum: initial ``S`` (zeros if ``None``).
        chunk_size: gradients of token ``t`` are taken at the weights of the start of its chunk; weights become
            readable at chunk ends. Only complete chunks update the memory.

    Returns:
        ``(out [batch, heads, T, d], W, S)`` with ``W``, ``S`` after the last complete chunk.
    """
    T = k.shape[2]
    if momentum is None:
        momentum = tuple(torch.zeros_like(w) for w in weights)
    readable, chunk_start = tuple(weights), tuple(weights)
    w_cur, s_cur = tuple(weights), tuple(momentum)
    outs = []
    for t in range(T):
        if (t // chunk_size + 1) * chunk_size <= T:  # token of a complete chunk: update
            with torch.enable_grad():
                params = [w.detach().requires_grad_(True) if not w.requires_grad else w for w in chunk_start]
                pred = memory_mlp(k[:, :, t : t + 1], tuple(params))
                loss = 0.5 * (pred - v[:, :, t : t + 1]).pow(2).sum()
                grads = torch.autograd.grad(loss, params, create_graph=torch.is_grad_enabled())
            eta, keep = log_eta[:, :, t, None, None].exp(), log_keep[:, :, t, None, None].exp()
            theta = lr[:, :, t, None, None]
            s_cur = tuple(eta * s - theta * g for s, g in zip(s_cur, grads))
            w_cur = tuple(keep * w + s for w, s in zip(w_cur, s_cur))
            if (t + 1) % chunk_size == 0:
                readable = chunk_start = w_cur
        outs.append(memory_mlp(q[:, :, t : t + 1], readable))
    return torch.cat(outs, dim=2), w_cur if T >= chunk_size else tuple(weights), s_cur
