"""Torch reference (the spec) for the attention each key receives (H2O/SnapKV scores), GQA-reduced."""

from __future__ import annotations

import torch

from hf_longmem.kernels.decode_attention.reference import allowed_slots, grouped_logits

#: Queries scored at once; bounds the ``[b, Hq, chunk, n]`` float32 probability block of long prefills.
QUERY_CHUNK = 512


def naive_attention_column_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    causal_new: bool = True,
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Column sums of the softmax attention matrix, summed over queries and averaged over each GQA group.

    Args:
        query: ``[b, Hq, q, d]``.
        keys: ``[b, Hkv, n, d]`` (not repeated).
        scaling: logit scale, usually ``d ** -0.5``.
        valid: ``[b, n]`` or ``[b, Hkv, n]`` bool, False for pad slots (they get no attention).
        causal_new: the queries are the last ``q`` slots: query ``i`` sees slots ``<= n - q + i``.
        query_valid: ``[b, q]`` bool, False for pad queries (they contribute nothing).

    Returns:
        ``[b, Hkv, n]`` float32: ``sum_i mean_{h in group} softmax(s_h)[i, j]``.
    """
    batch, q_heads, num_q, _ = query.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    valid = valid[:, None] if valid is not None and valid.dim() == 2 else valid
    allowed = allowed_slots(valid, num_q, num_keys, num_keys - num_q if causal_new else None, query.device)
    if query_valid is not None:
        allowed = allowed & query_valid[:, None, None, :, None]
    total = torch.zeros(batch, kv_heads, num_keys, dtype=torch.float32, device=query.device)
    for start in range(0, num_q, QUERY_CHUNK):  # chunks of queries, not tokens one by one
        stop = min(start + QUERY_CHUNK, num_q)
        logits = grouped_logits(query[:, :, start:stop], keys, scaling)  # [b, Hkv, group, chunk, n]
        logits = logits.masked_fill(~allowed[..., start:stop, :], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True).nan_to_num(neginf=0.0)
        total += torch.exp(logits - lse).sum(dim=3).mean(dim=2)  # fully masked rows: exp(-inf) = 0
    return total
