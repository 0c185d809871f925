"""H2O (Zhang et al., 2023): heavy hitters + a recent window, scored by accumulated attention.

Every key accumulates the attention it receives from every query, at prefill and at each decoding step. After each
forward, a layer holding more than ``budget`` tokens keeps its ``budget - recent`` heaviest hitters plus the
``recent`` newest tokens; scores of evicted tokens are dropped. The step itself still attends to everything held
before eviction (as in the official ``utils_real_drop``).

Deviations from the official code: scores are per row (the official code sums them over the batch) and per KV head
(query heads of a GQA group averaged; the official code is MHA-only); the budget is given in tokens, not as ratios
of the prompt length.
"""

from __future__ import annotations

import torch

from hf_longmem.registry import register_cache
from hf_longmem.validation import check_choice, check_int, check_ratio

from .base import LongMemCache, SlidingWindowScoring
from .scored import ScoredLayer, static_step_column_scores
from .static import StaticSlots, check_static_layers


class H2OLayer(SlidingWindowScoring, ScoredLayer):
    """H2O layer; ``scores`` ``[batch, kv_heads, stored]`` is the accumulated attention of each kept token."""

    batch_state = (*ScoredLayer.batch_state, "scores")
    slot_state = ("scores",)
    scores_every_query = True  # a float32 CPU prefill scores from SDPA's log-sum-exp

    def __init__(self, budget: int, recent_size: int):
        super().__init__()
        self.budget, self.recent_size = budget, recent_size
        self.scores: torch.Tensor | None = None
        # ((n, heavy, device), arange(n - 1), heavy - 1 - arange(n - 1)), cached for _evict_one
        self._slots: tuple | None = None

    def observe(self, query, keys, attention_mask, scaling):
        num_keys = keys.shape[-2]
        attention_mask = self.scoring_mask(attention_mask, query.shape[-2])
        received = self.received_attention(query, keys, attention_mask, scaling)  # [b, hkv, n]
        previous = self.scores if self.scores is not None else received.new_zeros(*received.shape[:2], 0)
        padded = torch.nn.functional.pad(previous, (0, num_keys - previous.shape[-1]))
        self.scores = padded + received

    def target_length(self, num_tokens: int) -> int:
        return min(self.budget, num_tokens)

    def compress(self, keys, values, positions):
        n = keys.shape[-2]
        steady = n == self.budget + 1 and self.recent_size < n and self.sliding_window is None
        if steady and not self._deferring and self._no_pads and self.scores is not None and self.scores.shape[-1] == n:
            self._kept_no_pads = True  # pad-free slots, one slot out of each row and head: still pad-free
            return self.apply_plan((self._evict_one(n), None), keys, values, positions)
        return super().compress(keys, values, positions)

    def _evict_one(self, n: int) -> torch.Tensor:
        """Decoding past the budget without pads: every row and head drops exactly one slot, the lowest-scored one
        outside the recent window, the latest of equal ones (what :func:`keep_plan`'s stable ranking drops).

        Returns the kept slots ``[batch, kv_heads, n - 1]`` in order (a top-k and two sorts replaced by an argmin).
        """
        heavy = n - self.recent_size
        # distance of the dropped slot from slot heavy - 1: the last minimum is the first one of the flipped scores
        back = self.scores[..., :heavy].flip(-1).argmin(dim=-1, keepdim=True)  # [b, h, 1]
        cached = self._slots
        if cached is None or cached[0] != (n, heavy, self.scores.device):
            slots = torch.arange(n - 1, device=self.scores.device)
            cached = self._slots = ((n, heavy, self.scores.device), slots, (heavy - 1) - slots)
        _, slots, distance = cached
        return slots + (distance <= back)  # slots at or past the dropped one shift by one

    def priority(self, keys, values, positions):
        """Accumulated attention; the ``recent_size`` newest slots are always kept."""
        n = keys.shape[-2]
        return self.scores.masked_fill(torch.arange(n, device=keys.device) >= n - self.recent_size, float("inf"))

    def reset(self) -> None:
        super().reset()
        self.scores = None


class StaticH2OLayer(StaticSlots, H2OLayer):
    """:class:`H2OLayer` with a static layout (``static=True``): ``budget + 1`` slots per KV head.

    A step overwrites, per KV head, the lowest accumulated score outside the recent window (the slot the dynamic
    layer evicted after the previous step, ties to the latest position as there), and its score restarts at zero.
    Scores come from the torch reference (:func:`~hf_longmem.memory.scoring.column_scores`) on every device.
    """

    freezes_in_update = False  # H2O compresses in the attention call

    def capacity(self, stored: int) -> int:
        return self.budget + 1

    def freeze_state(self, stored: int, capacity: int) -> None:
        self.scores = torch.nn.functional.pad(self.scores, (0, capacity - stored))
        torch._dynamo.mark_static_address(self.scores)

    def slot_priority(self, positions: torch.Tensor) -> torch.Tensor:
        """Accumulated attention; the ``recent_size`` newest positions are never overwritten. ``[b, h, capacity]``."""
        recent = positions >= (self.real_seen - self.recent_size)[:, None, None]
        return self.scores.masked_fill(recent, float("inf"))

    def on_write(self, slot: torch.Tensor) -> None:
        self.scores.scatter_(2, slot, 0.0)

    def after_attention(self, query, key, valid, call) -> None:
        self.scores.add_(static_step_column_scores(query, key, valid, call))


class H2OCache(LongMemCache):
    """H2O: keep the tokens with the largest accumulated attention, plus a recent window.

    Args:
        budget: tokens kept per layer and KV head between steps.
        recent_ratio: share of the budget given to the most recent tokens (paper: half, ``heavy == recent``).
        config: the model config (layer layout).
        static: decode into ``budget + 1`` fixed slots per KV head overwritten in place
            (:mod:`~hf_longmem.cache_classes.static`): ``is_compileable``, the same tokens kept as ``static=False``
            (float rounding aside); full-attention models, the prompt prefilled in one forward.
    """

    compresses_sliding_layers = True  # on an all-sliding model, a budget below the window compresses them

    def __init__(self, budget: int = 256, recent_ratio: float = 0.5, config=None, static: bool = False):
        check_int("budget", budget, low=2)
        check_ratio("recent_ratio", recent_ratio)
        recent = min(budget - 1, max(1, round(budget * recent_ratio)))
        self.budget, self.recent_size = budget, recent
        self.static = check_choice("static", static, (False, True))
        layer_cls = StaticH2OLayer if self.static else H2OLayer
        super().__init__(lambda layer_idx: layer_cls(budget, recent), config=config)
        check_static_layers(self, self.static)


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache(
    "h2o", H2OCache, needs_attention=True, summary="H2O: heavy hitters by accumulated attention + recent window"
)
