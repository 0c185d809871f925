"""LongGen sparse attention (attention sinks + window, or block-sparse strided): Triton kernel, torch reference."""

from __future__ import annotations

import torch

from hf_longmem.kernels.utils import check_query_keys_values, check_scaling, resolve_backend

from .reference import KINDS, SparsePattern, naive_sparse_attention

__all__ = ["KINDS", "SparsePattern", "naive_sparse_attention", "sparse_attention"]


def _check_positions(name: str, positions, batch: int, length: int, device) -> None:
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`{name}` must be an int32/int64 tensor, got {getattr(positions, 'dtype', positions)!r}")
    if tuple(positions.shape) != (batch, length):
        raise ValueError(f"`{name}` must be [batch, {length}] = {(batch, length)}, got {tuple(positions.shape)}")
    if positions.device != torch.device(device):
        raise ValueError(f"`{name}` is on {positions.device}, the attention inputs on {device}")


@torch.compiler.disable
def sparse_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    pattern: SparsePattern,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sparse attention whose mask is a function of the tokens' positions (GQA-aware, keys not repeated).

    Args:
        query: ``[b, Hq, q, d]``.
        keys: ``[b, Hkv, n, d]``; values ``[b, Hkv, n, dv]``.
        query_positions: ``[b, q]`` int, each query's index among its row's real tokens (``< 0``: pad query).
        key_positions: ``[b, n]`` int, the same for each key slot (``< 0``: pad or empty slot).
        scaling: logit scale, usually ``d ** -0.5``.
        pattern: which keys a query reads (:class:`SparsePattern`).
        backend: ``"torch"``, ``"triton"`` or ``None`` (Triton on CUDA when triton is installed, else torch).

    Returns:
        ``out [b, Hq, q, dv]`` (query dtype) and ``lse [b, Hq, q]`` float32; a query that reads nothing gets zeros and
        ``lse = -inf``. Both backends are differentiable in ``query``, ``keys`` and ``values``.

    Example::

        >>> pattern = SparsePattern("sink_window", sink_size=4, window=64)
        >>> q, k, v = torch.randn(1, 4, 128, 32), torch.randn(1, 2, 128, 32), torch.randn(1, 2, 128, 32)
        >>> pos = torch.arange(128)[None]
        >>> out, lse = sparse_attention(q, k, v, pos, pos, 32**-0.5, pattern)
    """
    batch, _, _, num_q, num_keys = check_query_keys_values(query, keys, values)
    scaling = check_scaling(scaling)
    if not isinstance(pattern, SparsePattern):
        raise ValueError(f"`pattern` must be a SparsePattern, got {type(pattern).__name__}")
    _check_positions("query_positions", query_positions, batch, num_q, query.device)
    _check_positions("key_positions", key_positions, batch, num_keys, query.device)
    if resolve_backend(backend, query, keys, values) == "torch":
        out, lse, _ = naive_sparse_attention(query, keys, values, query_positions, key_positions, scaling, pattern)
        return out, lse
    from .triton import triton_sparse_attention

    return triton_sparse_attention(query, keys, values, query_positions, key_positions, scaling, pattern)
