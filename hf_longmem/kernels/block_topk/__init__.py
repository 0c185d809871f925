"""InfLLM/EM-LLM retrieval: score memory blocks against a chunk's mean query and keep the top ``k``."""

from __future__ import annotations

import torch

from hf_longmem.kernels.utils import resolve_backend

from .reference import naive_block_scores, naive_block_topk, select_topk

__all__ = ["block_topk", "naive_block_scores", "naive_block_topk", "select_topk"]


def _flatten(name: str, tensor, lead: int) -> torch.Tensor:
    """``tensor`` with its trailing dims after ``lead`` leading ones flattened (``[.., H, d] -> [.., H*d]``)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (lead + 1, lead + 2):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        layout = "[b, D] or [b, H, d]" if lead == 1 else "[b, n, D] or [b, n, H, d]"
        raise ValueError(f"`{name}` must be {layout}, got {shape}")
    if not tensor.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {tensor.dtype}")
    return tensor if tensor.dim() == lead + 1 else tensor.flatten(lead)


@torch.compiler.disable
def block_topk(
    query: torch.Tensor,
    reprs: torch.Tensor,
    k: int,
    num_blocks: torch.Tensor | None = None,
    backend: str | None = None,
    return_scores: bool = False,
):
    """Indices of the ``k`` memory blocks whose representative keys best match the query.

    InfLLM scores block ``b`` by ``q_mean . r_b`` with all heads concatenated (one choice per layer, shared by its
    heads); per-head inputs ``[.., H, d]`` are flattened to ``H * d``, which is the same dot product.

    Args:
        query: ``[b, H*d]`` or ``[b, H, d]``: the mean query of a chunk (rotated as the memory is).
        reprs: ``[b, n, H*d]`` or ``[b, n, H, d]``: block representatives.
        k: how many blocks to return (``>= 1``; may exceed ``n``).
        num_blocks: ``[b]`` integer count of real blocks per row (the first ones); ``None``: all ``n``.
        backend: ``"torch"``, ``"triton"`` or ``None`` (Triton on CUDA when triton is installed, else torch).
        return_scores: also return the ``[b, n]`` float32 scores.

    Returns:
        ``[b, k]`` int64 block indices by descending score, ``-1`` where a row has fewer than ``k`` real blocks
        (and ``scores`` if ``return_scores``).

    Examples::

        >>> q, r = torch.randn(1, 4, 16), torch.randn(1, 10, 4, 16)
        >>> block_topk(q, r, 3).shape
        torch.Size([1, 3])
    """
    query = _flatten("query", query, 1)
    reprs = _flatten("reprs", reprs, 2)
    batch, dim = query.shape
    if reprs.shape[0] != batch or reprs.shape[2] != dim:
        raise ValueError(f"`reprs` {tuple(reprs.shape)} must be [b, n, D] with b = {batch} and D = {dim} of `query`")
    if reprs.device != query.device:
        raise ValueError(f"`reprs` is on {reprs.device}, `query` on {query.device}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an int >= 1, got {k!r}")
    if num_blocks is not None and (
        not isinstance(num_blocks, torch.Tensor)
        or num_blocks.dtype.is_floating_point
        or num_blocks.dtype == torch.bool
        or tuple(num_blocks.shape) != (batch,)
    ):
        got = (num_blocks.dtype, tuple(num_blocks.shape)) if isinstance(num_blocks, torch.Tensor) else num_blocks
        raise ValueError(f"`num_blocks` must be an integer tensor [b] = ({batch},), got {got}")
    if num_blocks is not None:
        num_blocks = num_blocks.to(reprs.device)
    if resolve_backend(backend, query, reprs) == "torch":
        index, scores = naive_block_topk(query, reprs, k, num_blocks)
    else:
        from .triton import triton_block_topk

        index, scores = triton_block_topk(query, reprs, k, num_blocks)
    return (index, scores) if return_scores else index
