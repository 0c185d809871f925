"""Attention each key receives (column sums of softmax attention), without materialising ``[q, n]``."""

from __future__ import annotations

import torch

from hf_longmem.kernels.utils import (
    check_4d,
    check_causal,
    check_same,
    check_scaling,
    check_valid,
    resolve_backend,
)

from .reference import naive_attention_column_scores

__all__ = ["attention_column_scores", "naive_attention_column_scores"]


@torch.compiler.disable
def attention_column_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    causal_new: bool = True,
    query_valid: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention summed over the queries, averaged over each GQA group's query heads, per key.

    The H2O / SnapKV token score. Equals :func:`hf_longmem.memory.scoring.column_scores` given the mask
    ``causal & valid & query_valid``. The Triton path makes two passes (row log-sum-exp, then column sums of
    ``exp(s - lse)``), so memory stays ``O(b * Hq * q + b * Hkv * n)`` whatever ``q``.

    Args:
        query: ``[b, Hq, q, d]``.
        keys: ``[b, Hkv, n, d]`` (not repeated for GQA).
        scaling: logit scale, usually ``d ** -0.5``.
        valid: ``[b, n]`` or ``[b, Hkv, n]`` bool, False for pad slots (they score 0).
        causal_new: the queries are the last ``q`` slots: query ``i`` sees slots ``<= n - q + i``.
        query_valid: ``[b, q]`` bool, False for pad queries, which contribute nothing.
        backend: ``"torch"``, ``"triton"`` or ``None`` (Triton on CUDA when triton is installed, else torch).

    Returns:
        ``[b, Hkv, n]`` float32.

    Examples::

        >>> q, k = torch.randn(1, 8, 32, 64), torch.randn(1, 2, 500, 64)  # SnapKV window of 32 queries
        >>> scores = attention_column_scores(q, k, 64**-0.5)
        >>> scores.shape, round(scores.sum().item())  # each query row sums to 1
        (torch.Size([1, 2, 500]), 64)
    """
    check_4d("query", query, "[batch, q_heads, q, head_dim]")
    check_4d("keys", keys, "[batch, kv_heads, n, head_dim]")
    batch, q_heads, num_q, head_dim = query.shape
    kv_heads, num_keys = keys.shape[1], keys.shape[2]
    if keys.shape[0] != batch:
        raise ValueError(f"batch sizes differ: query {batch}, keys {keys.shape[0]}")
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}) of `keys`")
    if keys.shape[-1] != head_dim:
        raise ValueError(f"`keys` head_dim {keys.shape[-1]} must be the query's {head_dim}")
    check_same("keys", keys, query)
    if num_q < 1:
        raise ValueError("`query` must hold at least one query (q >= 1)")
    scaling = check_scaling(scaling)
    valid = check_valid(valid, batch, kv_heads, num_keys, device=query.device)
    if query_valid is not None and (
        not isinstance(query_valid, torch.Tensor)
        or query_valid.dtype != torch.bool
        or tuple(query_valid.shape) != (batch, num_q)
        or query_valid.device != query.device
    ):
        got = (query_valid.dtype, tuple(query_valid.shape)) if isinstance(query_valid, torch.Tensor) else query_valid
        raise ValueError(
            f"`query_valid` must be a bool tensor [batch, q] = {(batch, num_q)} on {query.device}, got {got}"
        )
    check_causal(causal_new, num_q, num_keys)
    if resolve_backend(backend, query, keys) == "torch":
        return naive_attention_column_scores(query, keys, scaling, valid, causal_new, query_valid)
    from .triton import triton_attention_column_scores

    return triton_attention_column_scores(query, keys, scaling, valid, causal_new, query_valid)
