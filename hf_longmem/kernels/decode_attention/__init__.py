"""Decode attention over a (compressed) KV cache: flash-decoding split-K in Triton, torch reference, LSE merge."""

from __future__ import annotations

import torch

from hf_longmem.kernels.utils import (
    check_causal,
    check_query_keys_values,
    check_scaling,
    check_softcap,
    check_valid,
    resolve_backend,
)

from .reference import merge_attention, naive_decode_attention

__all__ = ["decode_attention", "merge_attention", "naive_decode_attention"]


@torch.compiler.disable
def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None = None,
    causal_new: bool = True,
    backend: str | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few new queries over ``n`` cached slots, returning the output and its log-sum-exp.

    GQA-aware: keys and values are NOT repeated; query head ``h`` reads KV head ``h // (Hq // Hkv)``. On CUDA the
    Triton kernel splits the key axis (flash-decoding): each split writes a partial output and LSE, and a second
    kernel merges them exactly.

    Args:
        query: ``[b, Hq, q, d]``, usually ``q`` of 1 to a few tokens.
        keys: ``[b, Hkv, n, d]``.
        values: ``[b, Hkv, n, dv]``.
        scaling: logit scale, usually ``d ** -0.5``.
        valid: ``[b, n]`` or ``[b, Hkv, n]`` bool, False for pad slots to ignore; ``None``: all slots are real.
        causal_new: the ``q`` queries are the last ``q`` slots: query ``i`` sees slots ``<= n - q + i``. With
            ``False`` every (valid) slot is visible to every query.
        backend: ``"torch"``, ``"triton"`` or ``None`` (Triton on CUDA when triton is installed, else torch).
        softcap: logit soft-capping ``tanh(s / softcap) * softcap`` of the scaled logits ``s`` (Gemma-2), or
            ``None``. Attention sinks are not a kernel argument: merge them from ``lse``
            (:meth:`~hf_longmem.memory.attention_features.AttentionFeatures.add_sinks`).

    Returns:
        ``out [b, Hq, q, dv]`` in the query dtype and ``lse [b, Hq, q]`` float32 (natural log). A query that may
        read no slot gets zeros and ``lse = -inf``, so :func:`merge_attention` drops it.

    Examples::

        >>> q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
        >>> out, lse = decode_attention(q, k, v, scaling=64**-0.5)
        >>> # attention over [A; B] == merge of attention over A and over B (B holds the new token)
        >>> a = decode_attention(q, k[:, :, :60], v[:, :, :60], 64**-0.5, causal_new=False)
        >>> b = decode_attention(q, k[:, :, 60:], v[:, :, 60:], 64**-0.5)
        >>> torch.allclose(merge_attention(*a, *b)[0], out, atol=1e-5)
        True
    """
    batch, _, kv_heads, num_q, num_keys = check_query_keys_values(query, keys, values)
    scaling = check_scaling(scaling)
    valid = check_valid(valid, batch, kv_heads, num_keys, device=query.device)
    check_causal(causal_new, num_q, num_keys)
    softcap = check_softcap(softcap)
    if resolve_backend(backend, query, keys, values) == "torch":
        return naive_decode_attention(query, keys, values, scaling, valid, causal_new, softcap)
    from .triton import triton_decode_attention

    return triton_decode_attention(query, keys, values, scaling, valid, causal_new, softcap=softcap)
