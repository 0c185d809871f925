"""KVMerger (Wang et al., 2024, arXiv 2407.08454): merge sets of consecutive, similar KVs into one KV each.

There is no official code. What the paper states: key states of neighbouring tokens are highly cosine-similar;
merging sets are found by a greedy constrained clustering in which every set is a run of **consecutive** tokens
whose keys are similar above a threshold ``epsilon``; recent (and important) tokens are kept unmerged so that the
KV budget is met; each set is merged into one KV with Gaussian-kernel weights around the pivot, the set's token with
the highest aggregated attention, ``w_i ∝ exp(-||k_p - k_i||^2 / (2 sigma^2))``, keys and values with the same
weights. The compression runs on the prompt (prefill); generated tokens are appended.

**Reconstructed here** (each part is our reading, not the authors' code):

* *Set identification* (:func:`~hf_longmem.memory.merging.consecutive_merge_sets`): scanning from the newest
  non-window token towards the oldest, a set starts at an anchor and absorbs the next (older) tokens while their
  key's cosine similarity with the **anchor's** key is ``> sim_threshold``; the first token that fails starts the
  next set. Sets never cross the recent window, and are capped at ``max_set_size`` tokens (our addition, it bounds
  the cost at ``n * max_set_size`` similarities; ``None`` removes the cap).
* *Meeting the budget exactly*: the window (the last ``window_size`` tokens) stays unmerged. If merging every set
  leaves fewer than ``budget`` slots, the most important tokens are kept unmerged: links between neighbours of the
  same set are cut in decreasing order of ``max(score of its two tokens)`` until there are exactly ``budget`` slots
  (cutting both links of a token keeps it alone; every piece stays a consecutive run). If merging every set still
  leaves more than ``budget`` slots, the merged slots with the least attention (summed over their members) are
  dropped, SnapKV-style. So the budget covers the whole sequence -> nothing happens (``DynamicCache``), and a
  threshold above 1 merges nothing (window-voted eviction).
* *Importance / pivot*: a token's score is the attention it receives from the observation window (the last
  ``window_size`` queries, summed; averaged over a GQA group), as in SnapKV; the pivot of a set is its top-scored
  token (the oldest on ties).
* *sigma*: ``sigma^2`` is the mean of ``||k_p - k_i||^2`` over the set's other members (a typical member weighs
  ``exp(-1/2)`` of the pivot); a set of identical keys gets uniform weights. The merged KV is written as
  ``x_p + sum_i w_i (x_i - x_p)`` so identical states merge exactly into themselves.
* The merged slot keeps the **pivot's position**; merged keys mix post-RoPE keys of neighbouring positions (a
  small RoPE drift, inherent to the method).

Also ours: decisions per KV head (the paper's Llama-2 models are MHA), per row (a left-padded batch gives what each
row gives alone), and a chunked prefill or a later multi-token turn compresses again after each forward, with that
forward's last queries as the window (stored merged slots may merge again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_longmem.memory.merging import consecutive_merge_sets, merge_runs
from hf_longmem.memory.padding import PAD_POSITION
from hf_longmem.registry import register_cache
from hf_longmem.validation import check_int, check_optional_int, check_real

from .base import LongMemCache
from .scored import ScoredLayer
from .static import AppendSlots, append_static_options, check_static_layers


def _ranks(priority: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last axis in decreasing priority (0 = highest; ties by index)."""
    order = priority.sort(dim=-1, descending=True, stable=True).indices
    arange = torch.arange(priority.shape[-1], device=priority.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, arange)


def kvmerger_compress(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor,
    budget: int,
    window: int,
    sim_threshold: float,
    max_set_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Compresses every row holding more than ``budget`` real tokens to exactly ``budget`` slots per KV head.

    Args:
        keys: ``[batch, kv_heads, n, head_dim]``; values: ``[batch, kv_heads, n, v_dim]``.
        positions: ``[batch, kv_heads, n]``, ``PAD_POSITION`` for pads (left of the reals, the same in every head).
        scores: ``[batch, kv_heads, n]`` importance of each slot (observation-window attention).
        budget: slots kept per row and head (``> window``).
        window: the last ``window`` slots, kept unmerged.
        sim_threshold, max_set_size: see :func:`~hf_longmem.memory.merging.consecutive_merge_sets`.

    Returns:
        ``None`` if no row exceeds the budget, else the stored ``(keys, values, positions)``
        ``[batch, kv_heads, budget, ...]``. A row with at most ``budget`` real tokens keeps its last ``budget``
        slots unchanged (pads included, as :meth:`CompressedLayer.compress`).
    """
    batch, heads, n, _ = keys.shape
    device = keys.device
    real = positions != PAD_POSITION  # [b, h, n]
    compressing = real[:, 0].sum(-1) > budget  # [b]
    if not bool(compressing.any()):
        return None
    slots = torch.arange(n, device=device)
    rows = compressing[:, None, None]
    candidates = real & rows & (slots < n - window)
    present = real | (~rows & (slots >= n - budget))  # every slot that ends up in (or merged into) a stored slot
    set_id = consecutive_merge_sets(keys, candidates, sim_threshold, max_set_size)
    link = (set_id >= 0) & (set_id == F.pad(set_id[..., :-1], (1, 0), value=-1))  # slot i merges with slot i - 1
    runs = (present & ~link).sum(-1)  # [b, h] slots if every set is merged
    # Too few slots: keep the most important tokens unmerged by cutting links, highest max(score) first.
    score = scores.float()
    link_priority = torch.maximum(score, F.pad(score[..., :-1], (1, 0))).masked_fill(~link, float("-inf"))
    cut = link & (_ranks(link_priority) < (budget - runs).clamp(min=0)[..., None])
    start = present & ~(link & ~cut)
    run_id = start.long().cumsum(-1) - 1
    num_runs = start.sum(-1)  # [b, h], == budget unless merging everything still leaves more
    # Too many slots: drop the merged slots with the least attention (the window's slots are always kept).
    most = int(num_runs.max())
    run_id = torch.where(present, run_id, most)
    run_score = torch.zeros(batch, heads, most + 1, device=device).scatter_add_(-1, run_id, score * present)
    run_index = torch.arange(most, device=device)
    exists = run_index < num_runs[..., None]
    in_window = run_index >= num_runs[..., None] - window
    priority = run_score[..., :most].masked_fill(in_window, float("inf")).masked_fill(~exists, float("-inf"))
    keep = exists & (_ranks(priority) < budget)
    new_id = keep.long().cumsum(-1) - 1
    keep = F.pad(keep, (0, 1))  # the last entry stands for slots that are not present
    final = torch.where(keep.gather(-1, run_id), new_id.gather(-1, run_id.clamp(max=most - 1)), budget)
    merged_keys, merged_values, merged_positions, _ = merge_runs(keys, values, positions, scores, final, budget)
    return merged_keys, merged_values, merged_positions


class KVMergerLayer(ScoredLayer):
    """KVMerger layer: compresses after each multi-token forward (see module docstring)."""

    def __init__(self, budget: int, sim_threshold: float, window_size: int, max_set_size: int | None):
        super().__init__()
        self.budget, self.sim_threshold = budget, sim_threshold
        self.window_size, self.max_set_size = window_size, max_set_size
        self._scores: torch.Tensor | None = None
        self._window = 0

    def wants_scores(self, num_new: int) -> bool:
        """Multi-token forwards only: generated tokens are appended."""
        return num_new > 1

    def observe(self, query, keys, attention_mask, scaling):
        num_new = query.shape[-2]
        self._scores = None
        if num_new == 1:  # decoding: generated tokens are appended
            return
        if int((self.positions[:, 0] != PAD_POSITION).sum(-1).max()) <= self.budget:
            return  # nothing to compress
        self._window = min(self.window_size, num_new)
        queries = query[:, :, -self._window :]
        window_mask = None if attention_mask is None else attention_mask[..., -self._window :, :]
        self._scores = self.received_attention(queries, keys, window_mask, scaling)

    def compresses_now(self) -> bool:
        return self._scores is not None  # only a scored forward that exceeds the budget merges

    def compress(self, keys, values, positions):
        if self._deferring or self._scores is None:
            return keys, values, positions
        scores, self._scores = self._scores, None
        out = kvmerger_compress(
            keys, values, positions, scores, self.budget, self._window, self.sim_threshold, self.max_set_size
        )
        return (keys, values, positions) if out is None else out

    def reset(self) -> None:
        super().reset()
        self._scores = None


class StaticKVMergerLayer(AppendSlots, KVMergerLayer):
    """:class:`KVMergerLayer` with a static layout (``static=True``, :class:`~hf_longmem.cache_classes.static.AppendSlots`)."""


class KVMergerCache(LongMemCache):
    """KVMerger: merge runs of consecutive, similar prompt KVs into one KV each (reconstructed, see module doc).

    Args:
        budget: prompt slots kept per layer and KV head (window included). Generated tokens are added on top.
        sim_threshold: cosine similarity (``>``) a token's key needs with its set's anchor to merge; above 1 nothing
            merges (then the budget is met by window-voted eviction).
        window_size: the recent tokens kept unmerged, and the observation window whose attention picks the pivots
            and the tokens kept unmerged.
        max_set_size: the largest merging set (bounds the cost; ``None`` = unbounded).
        config: the model config (layer layout).
        static, max_new_tokens: after the prefill, hold the merged prompt plus ``max_new_tokens`` fixed slots
            written in place (``is_compileable``; see :class:`~hf_longmem.cache_classes.snapkv.SnapKVCache`).

    Example::

        cache = hf_longmem.make_cache("kvmerger", model, budget=512, sim_threshold=0.8)
        model.generate(input_ids, cache=cache, max_new_tokens=64)
    """

    compresses_sliding_layers = False  # an all-sliding model is refused below its window (build_layers)

    def __init__(
        self,
        budget: int = 256,
        sim_threshold: float = 0.8,
        window_size: int = 32,
        max_set_size: int | None = 64,
        config=None,
        static: bool = False,
        max_new_tokens: int | None = None,
    ):
        check_int("window_size", window_size, low=1)
        check_int("budget", budget, low=window_size + 1, hint=f"larger than window_size={window_size}")
        check_real("sim_threshold", sim_threshold, finite=False, hint="cosine similarity; > 1 disables merging")
        check_optional_int("max_set_size", max_set_size, low=1)
        self.budget, self.sim_threshold = budget, float(sim_threshold)
        self.window_size, self.max_set_size = window_size, max_set_size
        self.static = append_static_options(static, max_new_tokens)

        def factory(layer_idx: int) -> KVMergerLayer:
            args = (budget, float(sim_threshold), window_size, max_set_size)
            if self.static:
                return StaticKVMergerLayer(*args, max_new_tokens=max_new_tokens)
            return KVMergerLayer(*args)

        super().__init__(factory, config=config)
        check_static_layers(self, self.static)


__all__ = ["KVMergerCache", "KVMergerLayer", "kvmerger_compress"]


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache(
    "kvmerger",
    KVMergerCache,
    needs_attention=True,
    summary="KVMerger: runs of consecutive similar prompt KVs merged with Gaussian-kernel weights",
)
