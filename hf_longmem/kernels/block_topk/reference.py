"""Torch reference (the spec) for InfLLM/EM-LLM block retrieval: block scores and top-k selection."""

from __future__ import annotations

import torch


def naive_block_scores(
    query: torch.Tensor, reprs: torch.Tensor, num_blocks: torch.Tensor | None = None
) -> torch.Tensor:
    """Score of every memory block: the dot product of the query with the block's representative key.

    Args:
        query: ``[b, D]`` float, the (chunk-mean) query with all heads concatenated (``D = heads * head_dim``).
        reprs: ``[b, n, D]`` block representatives (same head layout).
        num_blocks: ``[b]`` integer, how many of the first blocks of each row are real (the rest score ``-inf``);
            ``None``: all ``n``.

    Returns:
        ``[b, n]`` float32 scores, ``-inf`` for the blocks beyond ``num_blocks``.
    """
    scores = torch.bmm(query.float()[:, None], reprs.float().transpose(1, 2))[:, 0]  # einsum's plan, fewer ops
    if num_blocks is not None:
        beyond = torch.arange(reprs.shape[1], device=reprs.device)[None, :] >= num_blocks[:, None]
        scores = scores.masked_fill(beyond, float("-inf"))
    return scores


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[b, n]`` scores -> ``[b, k]`` int64 indices by descending score, ``-1`` where a row has fewer real blocks.

    ``k`` may exceed ``n`` (the missing columns are ``-1``).
    """
    batch, n = scores.shape
    take = min(k, n)
    top = scores.topk(take, dim=-1) if take > 0 else None
    if top is None:
        return torch.full((batch, k), -1, dtype=torch.long, device=scores.device)
    index = torch.where(torch.isneginf(top.values), -1, top.indices)
    if take < k:
        index = torch.cat((index, index.new_full((batch, k - take), -1)), dim=-1)
    return index


def naive_block_topk(
    query: torch.Tensor, reprs: torch.Tensor, k: int, num_blocks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` blocks by :func:`naive_block_scores`: ``(indices [b, k] int64, scores [b, n] float32)``."""
    scores = naive_block_scores(query, reprs, num_blocks)
    return select_topk(scores, k), scores
