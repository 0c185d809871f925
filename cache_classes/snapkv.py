"""SnapKV (Li et al., 2024) and PyramidKV (Cai et al., 2024): prompt compression from an observation window.

At prefill, the last ``window_size`` queries vote for the prompt tokens: their attention, summed over the window and
pooled along the sequence (``kernel_size``), ranks the earlier tokens; each KV head keeps its top
``budget - window_size`` plus the window itself. Decoded tokens are appended uncompressed (as in the paper), so
the cache grows by one token per generated token. PyramidKV gives lower layers more of the budget, decreasing
linearly, with the same average.

Deviations from the official code, on purpose:

* decisions per KV head (query heads of a GQA group averaged), not per query head after ``repeat_kv`` — the
  official layout stores ``num_attention_heads`` heads and throws away GQA's saving (SnapKV#29);
* kept tokens stay in position order (the official gather leaves them in score order);
* PyramidKV budgets are clamped to at least one non-window token per layer and a 1-layer model is supported
  (the official formula underflows to 0 and divides by ``num_layers - 1``; kvpress#265/#266);
* a chunked prefill compresses after every chunk with that chunk's last queries as the window.
"""

from __future__ import annotations

import torch

from hf_longmem.memory.padding import PAD_POSITION
from hf_longmem.memory.scoring import pool_scores
from hf_longmem.registry import register_cache
from hf_longmem.validation import check_choice, check_int

from .base import LongMemCache, SlidingWindowScoring
from .scored import ScoredLayer
from .static import AppendSlots, append_static_options, check_static_layers

POOLINGS = ("avg", "max")


def pyramid_budgets(budget: int, window_size: int, num_layers: int, prompt_length: int, beta: int) -> list[int]:
    """PyramidKV's per-layer budgets (window included), decreasing with depth, averaging ``budget``.

    Args:
        budget: the average tokens per layer, window included.
        window_size: observation window (always kept).
        num_layers: decoder layers.
        prompt_length: tokens being compressed.
        beta: ratio between the largest and smallest non-window budgets (paper: 20).
    """
    if num_layers == 1:
        return [budget]  # a one-layer pyramid is the mean budget (the formula would divide by zero)
    mean = budget - window_size
    smallest = mean // beta
    largest = 2 * mean - smallest
    if largest >= prompt_length - window_size:
        largest = prompt_length - window_size
        smallest = 2 * mean - largest
    step = (largest - smallest) // (num_layers - 1)
    return [max(1, largest - layer * step) + window_size for layer in range(num_layers)]


class SnapKVLayer(SlidingWindowScoring, ScoredLayer):
    """SnapKV layer (see module docstring). ``layer_budget`` maps the prompt length to this layer's budget."""

    batch_state = (*ScoredLayer.batch_state,)

    def __init__(self, budget: int, window_size: int, kernel_size: int, pooling: str, layer_budget=None):
        super().__init__()
        self.budget, self.window_size, self.kernel_size, self.pooling = budget, window_size, kernel_size, pooling
        self.layer_budget = layer_budget
        self._scores: torch.Tensor | None = None
        self._num_new = 0

    def wants_scores(self, num_new: int) -> bool:
        self._num_new = num_new
        self._scores = None
        return num_new > 1  # decoding: SnapKV leaves generated tokens alone

    def observe(self, query, keys, attention_mask, scaling):
        num_new = query.shape[-2]
        window = min(self.window_size, num_new)
        attention_mask = self.scoring_mask(attention_mask, num_new)
        window_mask = None if attention_mask is None else attention_mask[..., -window:, :]
        scores = self.received_attention(query[:, :, -window:], keys, window_mask, scaling)
        real = self.positions[:, 0] != PAD_POSITION if self.has_pad_slots() else None  # [b, n]
        self._scores = pool_scores(scores, self.kernel_size, self.pooling, real=real)

    def compresses_now(self) -> bool:
        # only a scored (prefill) step selects; generated tokens are appended (on a sliding-window layer, until the
        # window is full: then the tokens that left it are dropped)
        return self._scores is not None or (
            self.sliding_window is not None and self.keys.shape[-2] >= self.sliding_window
        )

    def compress(self, keys, values, positions):
        if self._scores is None:  # decoding (or deferred): SnapKV keeps every generated token
            if self.sliding_window is not None and not self._deferring and keys.shape[-2] >= self.sliding_window:
                return self.drop_stale(keys, values, positions)
            return keys, values, positions
        stored = super().compress(keys, values, positions)
        self._scores = None  # [b, h, n] scores are only needed for this step's selection
        return stored

    def target_length(self, num_tokens: int) -> int | torch.Tensor:
        if self._scores is None:
            return num_tokens
        if self.layer_budget is None:
            return self.budget
        # PyramidKV's budgets depend on the prompt length: each row's own (real tokens), as it would be alone.
        real = (self.positions[:, 0] != PAD_POSITION).sum(-1)
        return torch.tensor([self.layer_budget(int(r)) for r in real.tolist()], device=real.device)

    def priority(self, keys, values, positions):
        """Pooled window votes; the observation window itself is always kept."""
        n = keys.shape[-2]
        window = min(self.window_size, self._num_new)
        return self._scores.masked_fill(torch.arange(n, device=keys.device) >= n - window, float("inf"))


class StaticSnapKVLayer(AppendSlots, SnapKVLayer):
    """:class:`SnapKVLayer` with a static layout (``static=True``, :class:`~hf_longmem.cache_classes.static.AppendSlots`)."""


class SnapKVCache(LongMemCache):
    """SnapKV: keep the prompt tokens the last queries attend to.

    Args:
        budget: prompt tokens kept per layer and KV head (window included). Generated tokens are added on top.
        window_size: observation window: the last queries that score the prompt, always kept (code default 32).
        kernel_size: pooling width along the sequence (code default 5; the LongBench configs use 7).
        pooling: ``"avg"`` (code default) or ``"max"``.
        config: the model config (layer layout).
        static: after the prefill, hold the compressed prompt plus ``max_new_tokens`` fixed slots written in place
            (:mod:`~hf_longmem.cache_classes.static`): ``is_compileable``, the same attention as ``static=False``
            (float rounding aside); full-attention models, the prompt prefilled in one forward.
        max_new_tokens: slots reserved for generated tokens (``static=True`` only); generating more raises.

    Example::

        cache = hf_longmem.make_cache("snapkv", model, budget=256)
        model.generate(input_ids, cache=cache, max_new_tokens=32)
    """

    compresses_sliding_layers = True  # on an all-sliding model, a budget below the window compresses them
    #: What the budget bounds: the prompt (generated tokens are appended; architecture matrix, check (b)).
    memory_saving = "prompt"

    def __init__(
        self,
        budget: int = 256,
        window_size: int = 32,
        kernel_size: int = 5,
        pooling: str = "avg",
        config=None,
        static: bool = False,
        max_new_tokens: int | None = None,
    ):
        _check_snapkv(budget, window_size, kernel_size, pooling)
        self.budget, self.window_size = budget, window_size
        self.static = append_static_options(static, max_new_tokens)

        def factory(layer_idx: int) -> SnapKVLayer:
            if self.static:
                return StaticSnapKVLayer(budget, window_size, kernel_size, pooling, max_new_tokens=max_new_tokens)
            return SnapKVLayer(budget, window_size, kernel_size, pooling)

        super().__init__(factory, config=config)
        check_static_layers(self, self.static)


class PyramidKVCache(LongMemCache):
    """PyramidKV: SnapKV scoring with per-layer budgets decreasing linearly with depth (same mean ``budget``).

    Args:
        budget: mean prompt tokens kept per layer (window included).
        window_size, kernel_size, pooling: as in :class:`SnapKVCache`.
        beta: ratio between the top and bottom layer's non-window budgets (paper: 20).
        config: the model config (required: the number of layers sets the pyramid).
        static, max_new_tokens: as in :class:`SnapKVCache` (each layer's capacity is its own compressed prompt
            plus ``max_new_tokens``).
    """

    compresses_sliding_layers = True  # on an all-sliding model, a budget below the window compresses them
    #: What the budget bounds: the prompt (generated tokens are appended; architecture matrix, check (b)).
    memory_saving = "prompt"

    def __init__(
        self,
        budget: int = 256,
        window_size: int = 32,
        kernel_size: int = 5,
        pooling: str = "avg",
        beta: int = 20,
        config=None,
        static: bool = False,
        max_new_tokens: int | None = None,
    ):
        _check_snapkv(budget, window_size, kernel_size, pooling)
        if not isinstance(beta, int) or beta < 1:
            raise ValueError(f"`beta` must be a positive int, got {beta!r}")
        if config is None:
            raise ValueError(
                "PyramidKVCache needs `config=` (the number of layers sets the pyramid); or use make_cache"
            )
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        self.budget, self.window_size, self.beta = budget, window_size, beta
        self.static = append_static_options(static, max_new_tokens)

        def factory(layer_idx: int) -> SnapKVLayer:
            def layer_budget(prompt_length: int) -> int:
                return pyramid_budgets(budget, window_size, num_layers, prompt_length, beta)[layer_idx]

            if self.static:
                return StaticSnapKVLayer(
                    budget, window_size, kernel_size, pooling, layer_budget, max_new_tokens=max_new_tokens
                )
            return SnapKVLayer(budget, window_size, kernel_size, pooling, layer_budget)

        super().__init__(factory, config=config)
        check_static_layers(self, self.static)


def _check_snapkv(budget, window_size, kernel_size, pooling) -> None:
    check_int("window_size", window_size, low=1)
    check_int("budget", budget, low=window_size + 1, hint=f"larger than window_size={window_size}")
    if check_int("kernel_size", kernel_size, low=1, hint="odd") % 2 == 0:
        raise ValueError(f"`kernel_size` must be a positive odd integer, got {kernel_size!r}")
    check_choice("pooling", pooling, POOLINGS)


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache(
    "snapkv", SnapKVCache, needs_attention=True, summary="SnapKV: prompt tokens voted by an observation window"
)
register_cache(
    "pyramidkv", PyramidKVCache, needs_attention=True, summary="PyramidKV: SnapKV with budgets decreasing by layer"
)
