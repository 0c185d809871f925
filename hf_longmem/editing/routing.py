"""WISE routing: activation scores of side memories against the main memory, and the per-sequence route.

The score of a side memory ``W'`` for one token with FFN activation ``x`` (the input of the duplicated output
projection ``W``) is

- ``"easyedit"``: ``|| act_fn(W' x + b) - act_fn(W x + b) ||_2`` (EasyEdit's ``euc``; ``act_fn`` is the model's
  ``hidden_act``);
- ``"paper"``: ``|| (W' - W) x ||_2``, the paper's ``|| A(x) (W'_v - W_v) ||_2``.

A sequence's score is the mean of its token scores over its valid (non-padding) tokens, or the max when it has
more than ``max_pool_above`` valid tokens at inference (EasyEdit's rule for long inputs).

Route: a memory is *eligible* for a sequence when its score reaches its threshold (``act_ratio`` times the smallest
score its edits had after being written). The sequence goes through the eligible memory with the largest score,
or through the main memory when none is eligible (:func:`choose_routes`).

Deviations from EasyEdit, all deliberate:

- decisions are per sequence (EasyEdit makes one per forward: ``.item()`` fails for batch > 1 in merge mode and
  retrieve mode averages the batch), and padding tokens are excluded from the means;
- WISE-Retrieve takes the top-1 eligible memory; EasyEdit's loop only switches to a stored memory whose score also
  beats the current shard's score, even when the current shard is below its own threshold, which can leave a query
  on the main memory although a stored memory is eligible.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MAIN", "RouteContext", "activation_scores", "choose_routes", "token_scores"]

#: Route index of the main memory.
MAIN = -1


def token_scores(
    main_out: torch.Tensor,
    side_out: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Per-token activation scores.

    Args:
        main_out: ``(B, T, D)`` output of the main memory.
        side_out: ``(B, T, D)`` output of a side memory on the same input.
        act_fn: applied to both outputs before the difference (``"easyedit"`` scores), or ``None`` (``"paper"``).

    Returns:
        ``(B, T)`` float32 L2 norms.
    """
    if act_fn is not None:
        diff = act_fn(side_out.float()) - act_fn(main_out.float())
    else:
        diff = side_out.float() - main_out.float()
    return torch.linalg.vector_norm(diff, dim=-1)


def activation_scores(
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    max_pool_above: int | None = None,
) -> torch.Tensor:
    """Reduce per-token scores to one score per sequence.

    Args:
        scores: ``(B, T)`` per-token scores (:func:`token_scores`).
        mask: ``(B, T)`` 1 for valid tokens, 0 for padding; ``None``: all valid.
        max_pool_above: sequences with more valid tokens than this use the max instead of the mean.

    Returns:
        ``(B,)`` float32 scores (0 for a sequence without valid tokens).
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.to(device=scores.device, dtype=torch.bool)
    count = mask.sum(-1)
    mean = (scores * mask).sum(-1) / count.clamp(min=1)
    if max_pool_above is None:
        return mean
    peak = scores.masked_fill(~mask, float("-inf")).amax(-1).clamp(min=0.0)
    return torch.where(count > max_pool_above, peak, mean)


def choose_routes(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Top-1 eligible memory per sequence.

    Args:
        scores: ``(K, B)`` score of each of ``K`` side memories for each sequence.
        thresholds: ``(K,)`` threshold of each memory.

    Returns:
        ``(B,)`` long: index in ``[0, K)`` of the chosen memory, or :data:`MAIN` (-1).
    """
    if scores.numel() == 0 or scores.shape[0] == 0:
        return torch.full((scores.shape[-1],), MAIN, dtype=torch.long, device=scores.device)
    thresholds = thresholds.to(device=scores.device, dtype=scores.dtype).view(-1, 1)
    eligible = scores >= thresholds
    masked = scores.masked_fill(~eligible, float("-inf"))
    best, index = masked.max(0)
    return torch.where(torch.isfinite(best), index, torch.full_like(index, MAIN))


@dataclass
class RouteContext:
    """What a WISE layer knows about the forward it runs in; set by a pre-hook on the model.

    Attributes:
        attention_mask: ``(B, S)`` 2D mask of the forward (``S`` = cached + new tokens), or ``None``.
        continuation: True when the forward extends a non-empty cache (a decode step).
        cache_ref: weak reference to the cache object of the forward, if any.
    """

    attention_mask: torch.Tensor | None = None
    continuation: bool = False
    cache_ref: Any = None

    def cache(self) -> Any:
        return self.cache_ref() if self.cache_ref is not None else None


@dataclass
class RouteMemo:
    """The route decided on a prompt, kept for the decode steps that extend the same cache."""

    routes: torch.Tensor | None = None
    cache_ref: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def matches(self, context: RouteContext, batch: int) -> bool:
        if self.routes is None or self.cache_ref is None or not context.continuation:
            return False
        cache = context.cache()
        return cache is not None and cache is self.cache_ref() and self.routes.shape[0] == batch

    def clear(self) -> None:
        self.routes = None
        self.cache_ref = None


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    getter = getattr(cache, "get_seq_length", None)
    if callable(getter):
        try:
            return int(getter())
        except Exception:  # noqa: BLE001 - an exotic cache: treat as empty
            return 0
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])
    return 0


def context_from_call(names: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> RouteContext:
    """Build a :class:`RouteContext` from a model forward's arguments.

    Args:
        names: parameter names of the forward, in order (to map positional arguments).
        args, kwargs: the call's arguments.
    """
    bound = dict(zip(names, args))
    bound.update(kwargs)
    mask = bound.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        mask = None
    cache = bound.get("cache")
    if cache is None:
        cache = bound.get("past_key_values")
    ref = None
    if cache is not None:
        try:
            ref = weakref.ref(cache)
        except TypeError:  # legacy tuple caches cannot be weakly referenced
            ref = None
    return RouteContext(attention_mask=mask, continuation=_cache_length(cache) > 0, cache_ref=ref)
