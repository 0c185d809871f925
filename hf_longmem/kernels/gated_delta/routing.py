"""Top-k routing of tokens to memories as packed per-memory streams (MoM's permute / unpermute), in torch.

MoM updates memory ``m`` only with the tokens routed to it, in their order. The chunked path therefore packs, for
each ``(batch row, memory)``, the routed tokens into one left-aligned stream of length ``L = max count`` (pad slots
at the end), runs the batched chunked gated delta rule over the ``batch * M`` streams, and gathers every token's
``k`` outputs back, weighted by its routing weights. This is fla's ``transform``/``reconstruct`` pair rebuilt
without a sort (a cumulative sum gives each token its slot in each stream) and without its bugs (see
``docs/mom.md``): pad tokens of a left-padded batch go to no stream, and empty streams keep their state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingPlan:
    """Where each routed token sits in the packed per-memory streams.

    Attributes:
        memory_index: ``[batch, seq, slots]`` long, the memory of each routing slot (top-k, then the shared memory).
        weights: ``[batch, seq, slots]`` mixing weights, zero for pad tokens.
        routed: ``[batch, seq, M]`` bool, token routed to memory (pad tokens: nowhere).
        token_index: ``[batch, M, L]`` long, the token position at each stream slot (0 at pad slots).
        stream_mask: ``[batch, M, L]`` bool, real stream slots.
        lengths: ``[batch, M]`` long, tokens per stream.
        slot_position: ``[batch, seq, slots]`` long, position of the token in the stream of its slot's memory.
    """

    memory_index: torch.Tensor
    weights: torch.Tensor
    routed: torch.Tensor
    token_index: torch.Tensor
    stream_mask: torch.Tensor
    lengths: torch.Tensor
    slot_position: torch.Tensor

    @property
    def max_length(self) -> int:
        return self.token_index.shape[-1]


def plan_routing(
    memory_index: torch.Tensor, weights: torch.Tensor, num_memories: int, valid: torch.Tensor | None = None
) -> RoutingPlan:
    """Build the packed-stream layout for ``memory_index``.

    Args:
        memory_index: ``[batch, seq, slots]`` long, distinct memories per token, each in ``[0, num_memories)``.
        weights: ``[batch, seq, slots]`` mixing weights.
        num_memories: ``M`` (routed memories plus the shared one, if any).
        valid: ``[batch, seq]`` bool (False = pad token) or ``None``.

    Returns:
        the :class:`RoutingPlan`.
    """
    if memory_index.dim() != 3 or memory_index.shape != weights.shape:
        raise ValueError(
            f"`memory_index` and `weights` must both be [batch, seq, slots], got {tuple(memory_index.shape)} and "
            f"{tuple(weights.shape)}"
        )
    batch, seq, _ = memory_index.shape
    routed = torch.zeros(batch, seq, num_memories, dtype=torch.bool, device=memory_index.device)
    routed.scatter_(2, memory_index, True)
    if valid is not None:
        routed &= valid[:, :, None]
        weights = weights * valid[:, :, None].to(weights.dtype)
    position = routed.long().cumsum(1) - 1  # [b, seq, M]: slot of token t in stream m (if routed)
    lengths = routed.sum(1)  # [b, M]
    max_length = max(1, int(lengths.max()) if lengths.numel() else 0)  # >= 1: an all-pad batch keeps a masked slot
    token_index = torch.zeros(batch, num_memories, max_length, dtype=torch.long, device=memory_index.device)
    b, t, m = routed.nonzero(as_tuple=True)
    token_index[b, m, position[b, t, m]] = t
    stream_mask = torch.arange(max_length, device=memory_index.device) < lengths[..., None]
    slot_position = position.gather(2, memory_index).clamp_min(0)
    return RoutingPlan(memory_index, weights, routed, token_index, stream_mask, lengths, slot_position)


def pack_streams(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Gather token features into the per-memory streams.

    Args:
        x: ``[batch, seq, ...]``.

    Returns:
        ``[batch, M, L, ...]`` (pad slots hold token 0's features; mask them with ``plan.stream_mask``).
    """
    batch, num_memories, length = plan.token_index.shape
    flat = plan.token_index.reshape(batch, num_memories * length)
    index = flat.reshape(batch, -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index).reshape(batch, num_memories, length, *x.shape[2:])


def unpack_mix(streams: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Weighted sum of each token's slot outputs: ``o[b, t] = sum_s w[b, t, s] * streams[b, m_s, pos_s]``.

    Args:
        streams: ``[batch, M, L, ...]`` per-stream outputs.

    Returns:
        ``[batch, seq, ...]`` (zeros for pad tokens).
    """
    batch, num_memories, length = streams.shape[:3]
    tail = streams.shape[3:]
    seq, slots = plan.memory_index.shape[1:]
    flat_slot = (plan.memory_index * length + plan.slot_position).reshape(batch, seq * slots)
    index = flat_slot.reshape(batch, -1, *([1] * len(tail))).expand(-1, -1, *tail)
    picked = streams.reshape(batch, num_memories * length, *tail).gather(1, index)
    picked = picked.reshape(batch, seq, slots, *tail)
    w = plan.weights.to(picked.dtype).reshape(batch, seq, slots, *([1] * len(tail)))
    return (picked * w).sum(2)


def dense_routing(plan: RoutingPlan, num_memories: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [batch, seq, M], mask [batch, seq, M])``: the plan's routing as dense per-memory tensors."""
    dense = torch.zeros(
        *plan.memory_index.shape[:2], num_memories, dtype=plan.weights.dtype, device=plan.weights.device
    )
    dense = dense.scatter(2, plan.memory_index, plan.weights)
    return dense, plan.routed
