"""Torch reference (the spec) for decode attention over a compressed cache, and the exact LSE merge."""

from __future__ import annotations

import torch


def allowed_slots(
    valid: torch.Tensor | None, num_queries: int, num_keys: int, causal_offset: int | None, device
) -> torch.Tensor:
    """``[batch or 1, kv_heads or 1, 1, q, n]`` bool: query ``i`` may read slot ``j``.

    Args:
        valid: ``[batch, 1 or kv_heads, n]`` bool (False = pad slot) or ``None``.
        causal_offset: query ``i`` sees slots ``j <= causal_offset + i``; ``None`` for no causal limit.
    """
    allowed = torch.ones(1, 1, 1, num_queries, num_keys, dtype=torch.bool, device=device)
    if causal_offset is not None:
        query_slot = causal_offset + torch.arange(num_queries, device=device)[:, None]
        allowed = allowed & (torch.arange(num_keys, device=device)[None, :] <= query_slot)
    if valid is not None:
        allowed = allowed & valid[:, :, None, None, :]
    return allowed


def softmax_attend(
    logits: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention from grouped logits.

    Args:
        logits: ``[b, Hkv, group, q, n]`` float32 (already scaled).
        allowed: broadcastable to ``logits``, bool; ``None``: every slot is visible.
        values: ``[b, Hkv, n, dv]``.

    Returns:
        ``out [b, Hq, q, dv]`` in ``out_dtype`` and ``lse [b, Hq, q]`` float32; a query that may read no slot gets a
        zero output and ``lse = -inf`` (so it merges away).
    """
    batch, kv_heads, group, num_q, _ = logits.shape
    if allowed is None:  # nothing masked: every lse is finite
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - lse[..., None])
    else:
        logits = logits.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # -inf for fully masked rows
        probs = torch.exp(logits - lse.nan_to_num(neginf=0.0)[..., None])  # masked -> exp(-inf) = 0
    out = grouped_values(probs, values)  # [b, Hkv, group, q, dv]
    q_heads = kv_heads * group
    return out.reshape(batch, q_heads, num_q, -1).to(out_dtype), lse.reshape(batch, q_heads, num_q)


def grouped_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[b, Hkv, group, q, n] x [b, Hkv, n, dv] -> [b, Hkv, group, q, dv]`` float32 (one batched matmul over the
    ``b * Hkv`` KV heads, the group's queries stacked: what ``einsum`` does, in fewer dispatched ops)."""
    batch, kv_heads, group, num_q, num_keys = probs.shape
    stacked = probs.reshape(batch * kv_heads, group * num_q, num_keys)
    out = torch.bmm(stacked, values.float().reshape(batch * kv_heads, num_keys, -1))
    return out.view(batch, kv_heads, group, num_q, -1)


def softcap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2's logit soft-capping of scaled logits, ``tanh(logits / softcap) * softcap`` (identity for ``None``)."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def grouped_logits(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None = None
) -> torch.Tensor:
    """``[b, Hq, q, d] x [b, Hkv, n, d] -> [b, Hkv, group, q, n]`` float32 scaled (and soft-capped) logits, keys
    not repeated."""
    batch, q_heads, num_q, head_dim = query.shape
    kv_heads = keys.shape[1]
    group, num_keys = q_heads // kv_heads, keys.shape[-2]
    # one batched matmul over the b * Hkv KV heads, the group's queries stacked (einsum's plan, fewer ops)
    stacked = query.float().reshape(batch * kv_heads, group * num_q, head_dim)
    logits = torch.bmm(stacked, keys.float().reshape(batch * kv_heads, num_keys, head_dim).transpose(1, 2))
    return softcap_logits(logits.view(batch, kv_heads, group, num_q, num_keys) * scaling, softcap)


def naive_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    causal_new: bool = True,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` queries over ``n`` cached slots, with its log-sum-exp.

    Args:
        query: ``[b, Hq, q, d]``.
        keys: ``[b, Hkv, n, d]`` (not repeated for GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``).
        values: ``[b, Hkv, n, dv]``.
        scaling: logit scale, usually ``d ** -0.5``.
        valid: ``[b, n]`` or ``[b, Hkv, n]`` bool, False for pad slots; ``None``: every slot is real.
        causal_new: the queries are the last ``q`` slots: query ``i`` sees slots ``<= n - q + i``.
        softcap: ``tanh(logits / softcap) * softcap`` on the scaled logits (Gemma-2), or ``None``.

    Returns:
        ``out [b, Hq, q, dv]`` (query dtype) and ``lse [b, Hq, q]`` float32.
    """
    num_q, num_keys = query.shape[-2], keys.shape[-2]
    valid = valid[:, None] if valid is not None and valid.dim() == 2 else valid
    if valid is None and (not causal_new or num_q == 1):  # every slot visible (a decode step's query): no mask
        allowed = None
    else:
        allowed = allowed_slots(valid, num_q, num_keys, num_keys - num_q if causal_new else None, query.device)
    return softmax_attend(grouped_logits(query, keys, scaling, softcap), allowed, values, query.dtype)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges attention over two disjoint slot sets A and B into attention over ``A ∪ B`` (exact).

    ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``. A side with
    ``lse = -inf`` (nothing visible) contributes nothing; if both are ``-inf`` the result is zero with ``-inf``.

    Args:
        out_a, out_b: ``[..., dv]`` attention outputs.
        lse_a, lse_b: ``[...]`` float32 log-sum-exp of the scaled logits.

    Returns:
        ``out [..., dv]`` (dtype of ``out_a``) and ``lse [...]`` float32.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"merge_attention needs out_a/out_b [..., dv] and lse_a/lse_b [...] of matching shapes, got "
            f"{tuple(out_a.shape)}, {tuple(lse_a.shape)}, {tuple(out_b.shape)}, {tuple(lse_b.shape)}"
        )
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.nan_to_num(neginf=0.0)  # both -inf: weights exp(-inf) = 0
    weight_a = torch.exp(lse_a - safe)[..., None]
    weight_b = torch.exp(lse_b - safe)[..., None]
    out = weight_a * out_a.float() + weight_b * out_b.float()
    return out.to(out_a.dtype), lse
