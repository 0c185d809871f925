"""Torch reference (the spec) for attention over channel-pruned keys (ThinK), optionally with a full-width tail."""

from __future__ import annotations

import torch

from hf_longmem.kernels.decode_attention.reference import allowed_slots, grouped_logits, softcap_logits, softmax_attend


def gather_query_channels(query: torch.Tensor, channel_index: torch.Tensor) -> torch.Tensor:
    """``[b, Hq, q, d]`` -> ``[b, Hkv, group, q, d_keep]``: each GQA group reads its KV head's kept channels."""
    batch, q_heads, num_q, head_dim = query.shape
    kv_heads, d_keep = channel_index.shape[1], channel_index.shape[2]
    grouped = query.view(batch, kv_heads, q_heads // kv_heads, num_q, head_dim)
    index = channel_index.long()[:, :, None, None, :].expand(-1, -1, grouped.shape[2], num_q, d_keep)
    return grouped.gather(-1, index)


def _slot_mask(valid: torch.Tensor | None, batch: int, kv_heads: int, num_keys: int, device) -> torch.Tensor:
    if valid is None:
        return torch.ones(batch, kv_heads, num_keys, dtype=torch.bool, device=device)
    valid = valid[:, None] if valid.dim() == 2 else valid
    return valid.expand(batch, kv_heads, num_keys)


def naive_channel_attention(
    query: torch.Tensor,
    keys_pruned: torch.Tensor,
    channel_index: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    causal_new: bool = True,
    keys_full: torch.Tensor | None = None,
    values_full: torch.Tensor | None = None,
    valid_full: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over ``n`` channel-pruned slots followed by ``r`` full-width slots, one softmax.

    Args:
        query: ``[b, Hq, q, d]``.
        keys_pruned: ``[b, Hkv, n, d_keep]``, the kept channels of each KV head's keys.
        channel_index: ``[b, Hkv, d_keep]`` integer, which of the ``d`` channels ``keys_pruned`` holds.
        values: ``[b, Hkv, n, dv]``.
        scaling: the ORIGINAL logit scale ``d ** -0.5`` (not ``d_keep ** -0.5``).
        valid: ``[b, n]`` or ``[b, Hkv, n]`` bool for the pruned slots (False = pad).
        causal_new: the queries are the last ``q`` slots of the union ``[pruned; full]``.
        keys_full, values_full: ``[b, Hkv, r, d]`` / ``[b, Hkv, r, dv]`` full-width slots after the pruned ones.
        valid_full: ``[b, r]`` or ``[b, Hkv, r]`` bool for the full-width slots.
        softcap: ``tanh(logits / softcap) * softcap`` on the scaled logits (Gemma-2), or ``None``.

    Returns:
        ``out [b, Hq, q, dv]`` (query dtype) and ``lse [b, Hq, q]`` float32.
    """
    batch, kv_heads = keys_pruned.shape[:2]
    num_q = query.shape[-2]
    q_kept = gather_query_channels(query.float(), channel_index)
    logits = softcap_logits(torch.einsum("bhgqc,bhnc->bhgqn", q_kept, keys_pruned.float()) * scaling, softcap)
    slots = _slot_mask(valid, batch, kv_heads, keys_pruned.shape[-2], query.device)
    if keys_full is not None:
        logits = torch.cat((logits, grouped_logits(query, keys_full, scaling, softcap)), dim=-1)
        values = torch.cat((values, values_full), dim=-2)
        slots = torch.cat((slots, _slot_mask(valid_full, batch, kv_heads, keys_full.shape[-2], query.device)), -1)
    total = logits.shape[-1]
    allowed = allowed_slots(slots, num_q, total, total - num_q if causal_new else None, query.device)
    return softmax_attend(logits, allowed, values, query.dtype)
