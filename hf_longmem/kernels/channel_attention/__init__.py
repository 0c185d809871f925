"""Attention over channel-pruned keys (ThinK): keys keep ``d_keep`` of their ``d`` channels, queries are gathered."""

from __future__ import annotations

import torch

from hf_longmem.kernels.utils import (
    check_4d,
    check_causal,
    check_query_keys_values,
    check_scaling,
    check_softcap,
    check_valid,
    resolve_backend,
)

from .reference import gather_query_channels, naive_channel_attention

__all__ = ["channel_attention", "gather_query_channels", "naive_channel_attention"]


def _check_channel_index(channel_index, batch: int, kv_heads: int, d_keep: int, head_dim: int, device) -> None:
    if (
        not isinstance(channel_index, torch.Tensor)
        or channel_index.dtype.is_floating_point
        or channel_index.dtype
        in (
            torch.bool,
            torch.uint8,
        )
    ):
        raise ValueError(
            f"`channel_index` must be a signed integer tensor, got {getattr(channel_index, 'dtype', channel_index)!r}"
        )
    if tuple(channel_index.shape) != (batch, kv_heads, d_keep):
        raise ValueError(
            f"`channel_index` must be [batch, kv_heads, d_keep] = {(batch, kv_heads, d_keep)}, got "
            f"{tuple(channel_index.shape)}"
        )
    if d_keep > head_dim:
        raise ValueError(f"`keys_pruned` keeps {d_keep} channels, more than the query's head_dim {head_dim}")
    if channel_index.device != device:
        raise ValueError(f"`channel_index` is on {channel_index.device}, `query` on {device}")


@torch.compiler.disable
def channel_attention(
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
    backend: str | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with ThinK's channel-pruned keys, never re-expanded to full width.

    The logits of a pruned slot are ``scaling * q[channel_index] . k_pruned`` per KV head (GQA-aware, keys not
    repeated). Tokens that arrived after the pruning can be passed full width as ``keys_full``/``values_full``:
    the result is then attention over the union of slots ``[pruned (n); full (r)]`` with ONE softmax, so a ThinK
    layer makes a single call. (Internally: one kernel launch per part, merged exactly by log-sum-exp with
    :func:`~hf_longmem.kernels.merge_attention`; the returned ``lse`` allows further merges the same way.)

    Args:
        query: ``[b, Hq, q, d]``.
        keys_pruned: ``[b, Hkv, n, d_keep]`` kept key channels.
        channel_index: ``[b, Hkv, d_keep]`` signed integer (int16/int32/int64): the query channel each kept key
            channel pairs with; indices outside ``[0, d)`` contribute nothing on the Triton path.
        values: ``[b, Hkv, n, dv]`` (values are not pruned).
        scaling: the ORIGINAL logit scale ``d ** -0.5``.
        valid: ``[b, n]`` or ``[b, Hkv, n]`` bool, False for pad slots among the pruned ones.
        causal_new: the queries are the last ``q`` slots of the union: query ``i`` sees union slots
            ``<= n + r - q + i`` (``r = 0`` without a full-width part).
        keys_full: ``[b, Hkv, r, d]`` full-width keys of the slots after the pruned ones, or ``None``.
        values_full: ``[b, Hkv, r, dv]``, given exactly when ``keys_full`` is.
        valid_full: ``[b, r]`` or ``[b, Hkv, r]`` bool for the full-width slots.
        backend: ``"torch"``, ``"triton"`` or ``None`` (Triton on CUDA when triton is installed, else torch).
        softcap: ``tanh(s / softcap) * softcap`` of the scaled logits ``s`` (Gemma-2), or ``None``. Attention
            sinks are merged from ``lse`` by the caller.

    Returns:
        ``out [b, Hq, q, dv]`` (query dtype) and ``lse [b, Hq, q]`` float32.

    Examples::

        >>> q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
        >>> index = torch.randperm(64)[:38].sort().values.expand(1, 2, 38)  # keep 60% of the channels
        >>> k_pruned = k.gather(-1, index[:, :, None, :].expand(-1, -1, 100, -1))
        >>> out, lse = channel_attention(q, k_pruned[:, :, :90], index, v[:, :, :90], 64**-0.5,
        ...                              keys_full=k[:, :, 90:], values_full=v[:, :, 90:])
    """
    check_4d("keys_pruned", keys_pruned, "[batch, kv_heads, n, d_keep]")
    batch, _, kv_heads, num_q, num_pruned = check_query_keys_values(
        query, keys_pruned, values, keys_name="keys_pruned", key_dim=keys_pruned.shape[-1]
    )
    head_dim = query.shape[-1]
    _check_channel_index(channel_index, batch, kv_heads, keys_pruned.shape[-1], head_dim, query.device)
    scaling = check_scaling(scaling)
    valid = check_valid(valid, batch, kv_heads, num_pruned, device=query.device)
    num_full = 0
    if (keys_full is None) != (values_full is None):
        raise ValueError("`keys_full` and `values_full` must be given together")
    if keys_full is None:
        if valid_full is not None:
            raise ValueError("`valid_full` was given without `keys_full`/`values_full`")
    else:
        _, _, kv_full, _, num_full = check_query_keys_values(
            query, keys_full, values_full, keys_name="keys_full", values_name="values_full"
        )
        if kv_full != kv_heads or values_full.shape[-1] != values.shape[-1]:
            raise ValueError(
                f"`keys_full`/`values_full` {tuple(keys_full.shape)}/{tuple(values_full.shape)} must have the "
                f"kv_heads ({kv_heads}) and v_head_dim ({values.shape[-1]}) of `keys_pruned`/`values`"
            )
        valid_full = check_valid(valid_full, batch, kv_heads, num_full, name="valid_full", device=query.device)
    check_causal(causal_new, num_q, num_pruned + num_full)
    softcap = check_softcap(softcap)
    args = (
        query,
        keys_pruned,
        channel_index,
        values,
        scaling,
        valid,
        causal_new,
        keys_full,
        values_full,
        valid_full,
        softcap,
    )
    tensors = [t for t in (query, keys_pruned, values, keys_full, values_full) if t is not None]
    if resolve_backend(backend, *tensors) == "torch":
        return naive_channel_attention(*args)
    from .triton import triton_channel_attention

    return triton_channel_attention(*args)
