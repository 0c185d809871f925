"""Gated delta rule (Gated DeltaNet / MoM memories): torch reference, chunked torch path, Triton kernels.

Public ops (``backend="torch"|"triton"|None``; ``None`` = Triton on CUDA when triton is installed, else torch):

* :func:`chunk_gated_delta_rule` — training / prefill, forward and backward, linear in length: chunk-parallel in
  torch; on CUDA the chunked WY Triton kernel (:mod:`~hf_longmem.kernels.gated_delta.triton_chunk`: within a chunk
  every product is a ``tl.dot``, the state is carried across chunks in registers; hand-written backward);
* :func:`fused_recurrent_gated_delta_rule` — decode and short sequences, one pass over the tokens;
* :func:`fused_recurrent_mom_gated_delta_rule` — MoM decode: ``M`` memories per row, a token updates only the
  memories it is routed to and the output mixes their reads by the routing weights (routing fused in the kernel);
* :mod:`~hf_longmem.kernels.gated_delta.routing` — packing routed tokens into per-memory streams and back.

All tensors are head-major: ``q, k [batch, heads, seq, K]``, ``v [batch, heads, seq, V]``, ``g, beta
[batch, heads, seq]``, states ``[batch, heads, K, V]`` (float32). The naive recurrent forms in
:mod:`~hf_longmem.kernels.gated_delta.reference` are the specification.
"""

from __future__ import annotations

import torch

from hf_longmem.kernels.utils import resolve_backend

from .reference import (
    chunk_gated_delta_rule_torch,
    l2norm,
    naive_recurrent_gated_delta_rule,
    naive_recurrent_mom_gated_delta_rule,
)
from .routing import RoutingPlan, dense_routing, pack_streams, plan_routing, unpack_mix

__all__ = [
    "RoutingPlan",
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_torch",
    "dense_routing",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_mom_gated_delta_rule",
    "l2norm",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_mom_gated_delta_rule",
    "pack_streams",
    "plan_routing",
    "unpack_mix",
]

# Below this many tokens the torch path of the recurrent ops loops over tokens instead of padding a chunk.
_TORCH_LOOP_MAX = 16


def _check_inputs(q, k, v, g, beta, initial_state, lead: int) -> None:
    """``lead`` leading axes before ``(heads, seq)``: 1 for ``[batch, ...]``, 2 for ``[batch, M, ...]``."""
    names = ("q", "k", "v")
    for name, tensor in zip(names, (q, k, v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != lead + 3 or not tensor.is_floating_point():
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"`{name}` must be a floating {lead + 3}-D tensor [..., heads, seq, dim], got {got}")
    if k.shape != q.shape:
        raise ValueError(f"`k` {tuple(k.shape)} must have the shape of `q` {tuple(q.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"`v` {tuple(v.shape)} must match `q` {tuple(q.shape)} except in the last axis")
    for name, tensor in (("g", g), ("beta", beta)):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(q.shape[:-1]):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"`{name}` must be {tuple(q.shape[:-1])} (q without its last axis), got {got}")
    for name, tensor in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if tensor.device != q.device:
            raise ValueError(f"`{name}` is on {tensor.device}, `q` on {q.device}")
    if initial_state is not None:
        expected = (*q.shape[:-2], q.shape[-1], v.shape[-1])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            raise ValueError(f"`initial_state` must be {expected} ([..., heads, K, V]), got {got}")


def _check_scale(scale, key_dim: int) -> float:
    if scale is None:
        return key_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"`scale` must be a positive float or None (K ** -0.5), got {scale!r}")
    return float(scale)


def _torch_single_step(q, k, v, g, beta, scale, initial_state, output_final_state):
    """One token (decoding): the naive recurrence's step with broadcasts instead of einsums (fewer small ops)."""
    qf, kf, vf = q[:, :, 0].float(), k[:, :, 0].float(), v[:, :, 0].float()
    state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1], dtype=torch.float32)
    if initial_state is not None:
        state = state + initial_state.float()
    state = state * g[:, :, 0, None, None].float().exp()
    error = vf - (state * kf[..., None]).sum(-2)
    state = state + kf[..., None] * (beta[:, :, 0, None].float() * error)[..., None, :]
    o = (state * qf[..., None]).sum(-2) * scale
    return o[:, :, None].to(v.dtype), (state if output_final_state else None)


@torch.compiler.disable
def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk-parallel gated delta rule (training and prefill), forward and backward.

    Args:
        q, k: ``[batch, heads, seq, K]`` (keys normally L2-normalised).
        v: ``[batch, heads, seq, V]``.
        g: ``[batch, heads, seq]`` log-decay ``<= 0``.
        beta: ``[batch, heads, seq]`` writing strength.
        scale: output scale, default ``K ** -0.5``.
        initial_state: ``[batch, heads, K, V]`` or ``None``.
        output_final_state: also return the final state.
        chunk_size: tokens per chunk. The Triton kernel takes the largest power of two ``<= chunk_size`` clamped
            to ``[16, 64]`` (:func:`_triton_chunk_size`) and lowers it further to fit shared memory (32 when
            training or ``K > 64``, 16 when ``K > 128``; see ``triton_chunk._tiles``); the torch path takes it as
            given. The result does not depend on it beyond rounding.
        backend: ``"torch"``, ``"triton"`` or ``None``.

    Returns:
        ``o [batch, heads, seq, V]`` (``v``'s dtype) and the final state ``[batch, heads, K, V]`` float32 or None.

    Examples::

        >>> q, k = l2norm(torch.randn(2, 4, 100, 32)), l2norm(torch.randn(2, 4, 100, 32))
        >>> v, g, beta = torch.randn(2, 4, 100, 16), -torch.rand(2, 4, 100), torch.rand(2, 4, 100)
        >>> o, state = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        >>> ref, ref_state = naive_recurrent_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        >>> torch.allclose(o, ref, atol=1e-5) and torch.allclose(state, ref_state, atol=1e-5)
        True
    """
    _check_inputs(q, k, v, g, beta, initial_state, lead=1)
    scale = _check_scale(scale, q.shape[-1])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
    if resolve_backend(backend, q, k, v, g, beta) == "torch":
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    from .triton_chunk import triton_chunk_gated_delta_rule

    return triton_chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, _triton_chunk_size(chunk_size)
    )


def _triton_chunk_size(chunk_size: int) -> int:
    """Chunk length of the Triton kernel for a requested ``chunk_size``: the largest power of two ``<= chunk_size``,
    clamped to ``[16, 64]`` (``tl.dot`` needs 16 rows; past 64 the ``BT x BT`` tiles cost more than they save)."""
    return min(64, max(16, 1 << (chunk_size.bit_length() - 1)))


@torch.compiler.disable
def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent gated delta rule in one pass (decode, short sequences); same arguments as
    :func:`chunk_gated_delta_rule`. The Triton kernel keeps the ``[K, V]`` state tile in registers over the tokens;
    it is differentiable (checkpointed backward kernel).
    """
    _check_inputs(q, k, v, g, beta, initial_state, lead=1)
    scale = _check_scale(scale, q.shape[-1])
    if resolve_backend(backend, q, k, v, g, beta) == "torch":
        if q.shape[2] == 1:
            return _torch_single_step(q, k, v, g, beta, scale, initial_state, output_final_state)
        if q.shape[2] <= _TORCH_LOOP_MAX:
            return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state)
    from .triton import triton_fused_recurrent_gated_delta_rule

    return triton_fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)


@torch.compiler.disable
def fused_recurrent_mom_gated_delta_rule(
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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mixture-of-memories gated delta rule, recurrent, with the routing fused (MoM decode).

    Token ``t`` updates memory ``m`` only where ``routing_mask[b, t, m]``; the output is the routing-weighted sum
    of the routed memories' reads (see :func:`naive_recurrent_mom_gated_delta_rule`, the specification).

    Args:
        q, k: ``[batch, M, heads, seq, K]``; v: ``[batch, M, heads, seq, V]``; g, beta: ``[batch, M, heads, seq]``.
        routing_weights: ``[batch, seq, M]``; routing_mask: ``[batch, seq, M]`` bool.
        initial_state: ``[batch, M, heads, K, V]`` or ``None``.

    Returns:
        ``o [batch, heads, seq, V]`` and the final states ``[batch, M, heads, K, V]`` float32 (or None).
    """
    _check_inputs(q, k, v, g, beta, initial_state, lead=2)
    scale = _check_scale(scale, q.shape[-1])
    batch, memories, heads, seq = q.shape[:4]
    expected = (batch, seq, memories)
    if not isinstance(routing_weights, torch.Tensor) or tuple(routing_weights.shape) != expected:
        raise ValueError(f"`routing_weights` must be [batch, seq, M] = {expected}, got {tuple(routing_weights.shape)}")
    if not isinstance(routing_mask, torch.Tensor) or routing_mask.dtype != torch.bool:
        raise ValueError("`routing_mask` must be a bool tensor [batch, seq, M]")
    if tuple(routing_mask.shape) != expected:
        raise ValueError(f"`routing_mask` must be [batch, seq, M] = {expected}, got {tuple(routing_mask.shape)}")
    if resolve_backend(backend, q, k, v, g, beta) == "torch":
        mask = routing_mask.permute(0, 2, 1)[:, :, None, :]  # [b, M, 1, seq]
        g_masked = torch.where(mask, g, torch.zeros_like(g))
        beta_masked = torch.where(mask, beta, torch.zeros_like(beta))
        flat = [x.flatten(0, 1) for x in (q, k, v, g_masked, beta_masked)]
        state = None if initial_state is None else initial_state.flatten(0, 1)
        reads, final = fused_recurrent_gated_delta_rule(*flat, scale, state, output_final_state, backend="torch")
        reads = reads.unflatten(0, (batch, memories))  # [b, M, H, seq, V]
        weights = torch.where(routing_mask, routing_weights, torch.zeros_like(routing_weights)).to(reads.dtype)
        o = torch.einsum("btm,bmhtv->bhtv", weights, reads)
        return o, (final.unflatten(0, (batch, memories)) if final is not None else None)
    from .triton import triton_fused_recurrent_mom_gated_delta_rule

    return triton_fused_recurrent_mom_gated_delta_rule(
        q, k, v, g, beta, routing_weights, routing_mask, scale, initial_state, output_final_state
    )
