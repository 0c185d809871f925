"""D2O (Wan et al., ICLR 2025): dynamic layer budgets, H2O eviction, and merging of evicted KVs.

Faithful to the official code (AIoT-MLSys-Lab/d2o ``12c99d8``, ``modeling_llama3_7b_13b_d2o.py`` and
``modeling_llama3_new.py``):

* **Layer level.** From each layer's prefill attention ``A [q_heads, q, k]``: column sums over the queries, their
  (unbiased) variance over the keys per head, min-max normalised over the heads and averaged: ``v_l``. The layer
  ratios are ``clamp(softmax(-v)_l * L * rho, 0.01, 1)`` (softmax over the ``L`` layers), so denser (lower-variance)
  layers keep more. A layer keeps ``int(N ratio_l (1 - recent_ratio))`` heavy hitters and
  ``int(N ratio_l recent_ratio)`` recent tokens, with ``N`` the tokens held at the first decoding step (prompt + 1).
  Layers 0, 1 and ``L - 1`` are never compressed.
* **Token level.** Nothing is evicted during the prefill. From the first decoding step on, every step accumulates
  H2O scores (prefill column sums + each new query's attention) and keeps the top heavy hitters, the recent window
  and the first ``num_sink`` tokens (forced, as the official ``+inf`` scores).
* **Merging.** Each evicted token ``e`` finds its most cosine-similar kept key ``c`` (``s_e``); the threshold is an
  EMA, ``tau = mean(s)`` the first time, then ``tau <- alpha tau + beta mean(s)`` (means over every evicted token and
  head of the step), and ``e`` is merged into ``c`` if ``s_e >= tau``; keys and values both use the key similarity.
  Merged slots keep their own position (merged keys mix post-RoPE keys of different positions, as in the paper).

``budget`` is the average tokens kept per layer, in tokens: at the first decoding step it becomes the paper's ratio
``rho = budget / N`` of each row's length.

``first_eviction="prefill"`` fixes the budgets (with the same ``N`` = prompt + 1) and makes the first eviction when the
prefill ends, from the prefill scores alone, so the first decoded token attends to the compressed cache; the static,
compileable layout (``static=True``, :class:`StaticD2OLayer`) needs it, since nothing may be sized while the compiled
decoding steps run.

Deviations from the official code, on purpose:

* merge weights sum to one: ``x_c <- (x_c + sum_e s_e x_e) / (1 + sum_e s_e)``. The official
  ``scatter_reduce(mean, include_self=True)`` of ``s_e x_e`` divides by ``1 + n_c`` instead, which shrinks merged
  keys and values whenever ``s_e < 1`` (a merged copy of a key is not even that key);
* the merge decision is per (head, evicted token). The official code averages ``s`` over the heads at the same *rank*
  of each head's evicted list, which are different tokens once heads keep different tokens; the EMA statistic
  ``mean(s)`` is the official one (over all heads and evicted tokens). Only ``s_e > 0`` merges, so a negative
  threshold never produces negative (non-convex) weights;
* any head count, head size and batch size (the official code hard-codes 32 heads, 128 dims, batch 1); decisions
  per KV head (the query heads of a GQA group averaged, as in our H2O) instead of per query head after
  ``repeat_kv``; the layer statistic ``v_l`` is still computed per query head, as in the paper;
* per row: each row of a batch has its own statistic ``v`` (over its real tokens), ratios, sizes (from its own real
  length), H2O scores and threshold, so a left-padded batch gives what each row gives alone. The official code is
  batch-1 only (``squeeze``); its formulas would average ``v`` over the batch and sum the scores over it;
* a layer whose ratio reaches 1 keeps every token (in the official code such a layer is never compressed again
  after the first step either, up to an off-by-one rounding), every other layer keeps its fixed size at every step
  and at every later forward (the official code only compresses while the cache is shorter than the prompt);
  at least ``num_sink`` heavy and 1 recent slot are kept;
* the prefill statistic is exact under chunked prefill (column sums are accumulated over the chunks; the official
  code keeps the last chunk's); ``uncompressed_layers`` (default: 0, 1 and ``L - 1``) can be changed, e.g. for
  2-layer test models; ``L`` counts the full-attention layers (sliding-window layers keep transformers' own layer).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from hf_longmem.memory.merging import _EPS as MERGE_EPS
from hf_longmem.memory.merging import cosine_best_match, weighted_merge_into
from hf_longmem.memory.padding import PAD_POSITION, tensor_version
from hf_longmem.memory.scoring import QUERY_CHUNK, allowed_mask, attention_probs, causal_head_column_sums
from hf_longmem.registry import register_cache
from hf_longmem.validation import check_choice, check_int, check_ratio, check_real

from .base import LongMemCache, gather_slots, keep_plan
from .h2o import H2OLayer
from .scored import ScoredLayer, static_step_column_scores
from .static import StaticSlots, append_static_options, check_static_layers, lowest_priority_slot

#: The least positive float32 (a subnormal): ``s > 0`` iff ``s >= SMALLEST_POSITIVE``.
SMALLEST_POSITIVE = 2.0**-149
#: ``layer_budget`` of a row that keeps every token.
UNLIMITED = torch.iinfo(torch.int64).max
MIN_RATIO, MAX_RATIO = 0.01, 1.0


def query_head_column_sums(
    query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention each key receives from the queries, per query head (D2O's layer statistic).

    Args:
        query: ``[batch, q_heads, q, head_dim]``.
        keys: ``[batch, kv_heads, n, head_dim]`` (not repeated for GQA).
        attention_mask: ``[batch, 1, q, n]`` mask of these queries, or ``None`` (causal).

    Returns:
        ``[batch, q_heads, n]`` float32.
    """
    batch, q_heads, num_q, _ = query.shape
    num_k = keys.shape[-2]
    allowed = allowed_mask(attention_mask, num_q, num_k, query.device)
    total = query.new_zeros(batch, q_heads, num_k, dtype=torch.float32)
    for start in range(0, num_q, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_q)
        probs = attention_probs(query[:, :, start:stop], keys, allowed[:, :, start:stop], scaling)
        total += probs.sum(dim=3).reshape(batch, q_heads, num_k)
    return total


def attention_density(column_sums: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """D2O's layer statistic ``v`` (lower = denser attention = larger budget).

    Per head, the unbiased variance of the column sums over the row's real keys; min-max normalised over the heads
    (``(v - min) / (max - min + 1e-6)``, as the official code) and averaged over them.

    Args:
        column_sums: ``[batch, heads, n]`` prefill attention received by each key.
        real: ``[batch, n]`` bool, False for pad keys.

    Returns:
        ``[batch]`` float64 in ``[0, 1)``.
    """
    x = column_sums.double()
    weight = real[:, None, :].double()
    count = weight.sum(-1)  # [b, 1]
    mean = (x * weight).sum(-1) / count.clamp(min=1)
    var = ((x - mean[..., None]).square() * weight).sum(-1) / (count - 1).clamp(min=1)  # [b, h]
    low, high = var.amin(-1, keepdim=True), var.amax(-1, keepdim=True)
    return ((var - low) / (high - low + 1e-6)).mean(-1)


def layer_ratios(density: torch.Tensor, rho: torch.Tensor | float) -> torch.Tensor:
    """D2O's layer ratios ``clamp(softmax(-v) * L * rho, 0.01, 1)``.

    Args:
        density: ``[..., L]`` the statistic ``v`` of every layer.
        rho: ``[...]`` (or a float) the average ratio of tokens kept.

    Returns:
        ``[..., L]`` float64 ratios of the tokens held at the first decoding step.
    """
    density = density.double()
    rho = torch.as_tensor(rho, dtype=torch.float64, device=density.device)
    weights = torch.softmax(-density, dim=-1)
    return (weights * density.shape[-1] * rho[..., None]).clamp(MIN_RATIO, MAX_RATIO)


def d2o_merge(
    kept_keys: torch.Tensor,
    kept_values: torch.Tensor,
    kept_valid: torch.Tensor,
    evicted_keys: torch.Tensor,
    evicted_values: torch.Tensor,
    evicted_valid: torch.Tensor,
    tau: torch.Tensor,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One D2O merge step: EMA threshold, then evicted KVs merged into their most similar kept KV.

    Args:
        kept_keys, kept_values: ``[batch, heads, S, d]`` the slots kept this step.
        kept_valid: ``[batch, 1 or heads, S]`` bool, False for pad slots (they receive nothing).
        evicted_keys, evicted_values: ``[batch, heads, E, d]`` the slots evicted this step.
        evicted_valid: ``[batch, heads, E]`` bool, False for padding of the evicted list.
        tau: ``[batch]`` float32 threshold of each row, NaN before its first eviction.
        alpha, beta: EMA weights, ``tau <- alpha tau + beta mean(s)``.

    Returns:
        ``(keys, values, tau, merged)``: the kept slots after merging, the updated ``[batch]`` threshold (rows that
        evicted nothing keep theirs) and ``merged`` ``[batch, heads, E]`` bool.
    """
    sim, match = cosine_best_match(evicted_keys, kept_keys, kept_valid)
    valid = evicted_valid & torch.isfinite(sim)
    s = torch.where(valid, sim, torch.zeros_like(sim))
    count = valid.sum(dim=(1, 2))
    mean = s.sum(dim=(1, 2)) / count.clamp(min=1)
    updated = torch.where(torch.isnan(tau), mean, alpha * tau + beta * mean)
    tau = torch.where(count > 0, updated, tau)
    merged = valid & (sim >= tau[:, None, None]) & (sim > 0)
    weights = torch.where(merged, sim, torch.zeros_like(sim))
    keys = weighted_merge_into(kept_keys, evicted_keys, match, weights)
    values = weighted_merge_into(kept_values, evicted_values, match, weights)
    return keys, values, tau, merged


def merge_one(
    kept_keys: torch.Tensor,
    kept_values: torch.Tensor,
    evicted_keys: torch.Tensor,
    evicted_values: torch.Tensor,
    tau: torch.Tensor,
    alpha: float,
    beta: float,
    tau_set: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`d2o_merge` of exactly one evicted KV per (row, head) into pad-free kept slots (a decoding step).

    The same float32 arithmetic as :func:`d2o_merge` for finite keys (every evicted token valid, every kept slot a
    target), without its masks and scatters: the best match of each evicted key is updated in place,
    ``x_c <- (x_c + w x_e) / (1 + w)`` (``w = 0`` leaves it as it is).

    Args:
        kept_keys, kept_values: ``[batch, heads, S, d]``, modified in place (fresh tensors of this step).
        evicted_keys, evicted_values: ``[batch, heads, 1, d]``.
        tau: ``[batch]`` float32 threshold, NaN before a row's first eviction.
        tau_set: ``tau`` is known to be set in every row (no NaN): its EMA needs no NaN test.

    Returns:
        ``(keys, values, tau)``.
    """
    batch, heads, num_kept, head_dim = kept_keys.shape
    targets = _unit(kept_keys.view(batch * heads, num_kept, head_dim))
    sources = _unit(evicted_keys.view(batch * heads, 1, head_dim))
    # the bmm that cosine_best_match's broadcast matmul runs, on the 3-D views it would make
    sim, match = torch.bmm(sources, targets.transpose(1, 2)).clamp(-1.0, 1.0).max(dim=-1)  # [b * h, 1]
    sim = sim.view(batch, heads, 1, 1)
    mean = sim.sum(dim=(1, 2, 3)) / heads
    updated = alpha * tau + beta * mean
    tau = updated if tau_set else torch.where(torch.isnan(tau), mean, updated)
    # sim where it merges (sim >= tau and sim > 0, i.e. sim >= max(tau, the least positive float32)), else 0; keys
    # are finite, so is sim
    weight = sim * (sim >= tau.clamp(min=SMALLEST_POSITIVE).view(batch, 1, 1, 1))  # [b, h, 1, 1]
    _merge_into_match(kept_keys, kept_values, evicted_keys, evicted_values, match.view(batch, heads, 1, 1), weight)
    return kept_keys, kept_values, tau


def _merge_into_match(
    keys: torch.Tensor,
    values: torch.Tensor,
    evicted_keys: torch.Tensor,
    evicted_values: torch.Tensor,
    match: torch.Tensor,
    weight: torch.Tensor,
) -> None:
    """``x_c <- (x_c + w x_e) / (1 + w)`` in place at slot ``c = match`` of each (row, head), in float32.

    Args:
        keys, values: ``[batch, heads, S, d]``, modified in place.
        evicted_keys, evicted_values: ``[batch, heads, 1, d]``.
        match: ``[batch, heads, 1, 1]`` slot index; weight: ``[batch, heads, 1, 1]`` (``0`` leaves the slot as it is).
    """
    head_dim = keys.shape[-1]
    total = 1.0 + weight
    index = match.expand(-1, -1, -1, head_dim)
    merged = (keys.gather(2, index).float() + evicted_keys.float() * weight) / total
    keys.scatter_(2, index, merged.to(keys.dtype))
    if values.shape[-1] != head_dim:
        index = match.expand(-1, -1, -1, values.shape[-1])
    merged = (values.gather(2, index).float() + evicted_values.float() * weight) / total
    values.scatter_(2, index, merged.to(values.dtype))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x.float(), dim=-1)`` with the eps of :func:`cosine_best_match` (the same arithmetic, without
    the ``expand``)."""
    x = x.float()
    return x / x.norm(2, -1, keepdim=True).clamp_min(MERGE_EPS)


class _D2OGroup:
    """Cache-level state: the D2O layers (in order) and the options every layer needs to size itself."""

    def __init__(
        self,
        budget: int,
        recent_ratio: float,
        num_sink: int,
        alpha: float,
        beta: float,
        first_eviction: str = "decode",
    ):
        self.budget, self.recent_ratio, self.num_sink = budget, recent_ratio, num_sink
        self.alpha, self.beta, self.first_eviction = alpha, beta, first_eviction
        self.layers: list[D2OLayer] = []

    def evict_after_prefill(self) -> None:
        """``first_eviction="prefill"``: once the last layer has its prefill statistic, every layer fixes its budget
        (``N`` = prompt + 1, as at the first decoding step) and evicts and merges down to it from the prefill scores."""
        for layer in self.layers:
            layer.fix_budget(extra=1)
            if layer.compresses():
                current = (layer.keys, layer.values, layer.positions)
                layer._kept_no_pads = None
                stored = layer.compress(*current)
                if any(new is not old for new, old in zip(stored, current)):
                    layer.store(*stored, no_pads=layer._kept_no_pads)


class D2OLayer(H2OLayer):
    """One D2O layer.

    Per-row state (reordered with the batch):

    * ``scores`` ``[batch, kv_heads, stored]``: accumulated attention (from the first decoding step on);
    * ``prefill_sums`` ``[batch, q_heads, n]``: prefill column sums per query head (freed at the first decoding
      step), ``density`` ``[batch]``: the layer statistic ``v``;
    * ``ratio`` ``[batch]`` float64, ``layer_budget`` ``[batch]`` int64 (heavy + recent slots, ``UNLIMITED`` if the
      row keeps everything), ``recent_budget`` ``[batch]``: fixed at the first decoding step;
    * ``tau`` ``[batch]``: the merge threshold (NaN before the first eviction).

    A decoding step that holds one token over the budget in every row and head (pad-free slots, the same budget in
    every row: batch-1 decoding) evicts and merges on a fast path (:meth:`_evict_and_merge_one`, :func:`merge_one`):
    an argmin instead of the ranking, one in-place merge per (row, head) instead of scatters over every slot; it
    keeps and merges what the general path does (tested against it, ties included).
    """

    batch_state = (
        *ScoredLayer.batch_state,
        "scores",
        "prefill_sums",
        "density",
        "ratio",
        "layer_budget",
        "recent_budget",
        "tau",
    )
    slot_state = ("scores",)

    def __init__(self, group: _D2OGroup, layer_idx: int, uncompressed: bool):
        super().__init__(budget=group.budget, recent_size=0)
        self.group, self.layer_idx, self.uncompressed = group, layer_idx, uncompressed
        self.group_index = len(group.layers)
        group.layers.append(self)
        self._clear_state()

    def _clear_state(self) -> None:
        self.scores = self.prefill_sums = self.density = None
        self.ratio = self.layer_budget = self.recent_budget = self.tau = None
        self._compresses: tuple[torch.Tensor, int | None, bool] | None = None  # (layer_budget, its version, the answer)
        # (layer_budget, recent_budget, their versions, (budget, recent) shared by every row or None)
        self._uniform: tuple | None = None
        self._tau_set: torch.Tensor | None = None  # the tau the fast path set last (any other: NaN-tested again)
        self._steady_slots: torch.Tensor | None = None  # arange(n - 1) of a steady step (cached)
        self._recent_mask: tuple | None = None  # ((n, recent, device), [n] bool recent window of a steady step)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.tau = torch.full((key_states.shape[0],), float("nan"), device=key_states.device)

    # ------------------------------------------------------------------------------------------- statistics
    def wants_scores(self, num_new: int) -> bool:
        """Prefill statistics, the first decoding step, then only while some row of this layer evicts."""
        return self.layer_budget is None or self.compresses()

    def compresses_now(self) -> bool:
        """Only where some row evicts (not at the prefill, nor ever in a layer that keeps every token): the others
        need not materialise their positions every step."""
        return self.compresses()

    def observe(self, query, keys, attention_mask, scaling):
        num_new, num_keys = query.shape[-2], keys.shape[-2]
        if self.layer_budget is None:
            if num_new > 1 or num_keys == num_new:  # prefill (or a chunk of it): statistics only
                if self.scoring_is_causal():  # the flash-style sums, no mask tensor
                    sums = causal_head_column_sums(query, keys, scaling, self._lse)
                else:
                    sums = query_head_column_sums(query, keys, attention_mask, scaling)
                previous = self.prefill_sums if self.prefill_sums is not None else sums.new_zeros(*sums.shape[:2], 0)
                self.prefill_sums = F.pad(previous, (0, num_keys - previous.shape[-1])) + sums
                return
            self.fix_budget()
        if not self.compresses():
            self.scores = None
            return
        received = self.received_attention(query, keys, attention_mask, scaling)  # [b, hkv, n]
        self.scores = F.pad(self.scores, (0, num_keys - self.scores.shape[-1])) + received

    def prefill_density(self) -> torch.Tensor:
        """``[batch]`` statistic ``v`` of this layer's prefill (computed once, when first asked)."""
        if self.density is None:
            if self.prefill_sums is None:
                raise RuntimeError(f"D2O layer {self.layer_idx} has no prefill statistics yet")
            real = self.positions[:, 0, : self.prefill_sums.shape[-1]] != PAD_POSITION
            self.density = attention_density(self.prefill_sums, real)
        return self.density

    def fix_budget(self, extra: int = 0) -> None:
        """Sizes this layer at the first decoding step (or at the end of the prefill, counting ``extra`` more tokens),
        from every layer's prefill statistic."""
        group = self.group
        density = torch.stack([layer.prefill_density().to(self.device) for layer in group.layers], dim=-1)
        held = self.real_seen.double() + extra  # [b] tokens at the first decoding step (prompt + 1), the official N
        ratio = layer_ratios(density, group.budget / held.clamp(min=1))[:, self.group_index]
        heavy = torch.floor(held * ratio * (1 - group.recent_ratio)).long().clamp(min=group.num_sink)
        recent = torch.floor(held * ratio * group.recent_ratio).long().clamp(min=1)
        keeps_all = (ratio >= MAX_RATIO) | self.uncompressed
        self.ratio = ratio
        self.layer_budget = torch.where(keeps_all, torch.full_like(heavy, UNLIMITED), heavy + recent)
        self.recent_budget = recent
        if self.compresses():
            batch, q_heads, prefill = self.prefill_sums.shape
            kv_heads = self.keys.shape[1]
            self.scores = self.prefill_sums.view(batch, kv_heads, q_heads // kv_heads, prefill).mean(2)
        self.prefill_sums = None

    def compresses(self) -> bool:
        """Whether some row of this layer evicts (budgets fixed, not an uncompressed layer, a ratio below 1)."""
        budget = self.layer_budget
        if budget is None:
            return False
        # asked several times a step: one device sync per budget tensor (fixed once set; a batch reorder replaces it)
        version = tensor_version(budget)
        if self._compresses is None or self._compresses[0] is not budget or self._compresses[1] != version:
            self._compresses = (budget, version, bool((budget != UNLIMITED).any()))
        return self._compresses[2]

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        prefill = self.layer_budget is None
        output = super().attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        group = self.group
        if prefill and group.first_eviction == "prefill" and self is group.layers[-1]:
            group.evict_after_prefill()
        return output

    # ------------------------------------------------------------------------------------------ compression
    def target_length(self, num_tokens: int) -> int | torch.Tensor:
        if self.layer_budget is None:
            return num_tokens
        return self.layer_budget.clamp(max=num_tokens)

    def priority(self, keys, values, positions):
        """Accumulated attention; each row's recent window and the first ``num_sink`` tokens are forced."""
        n = keys.shape[-2]
        recent = torch.arange(n, device=keys.device) >= n - self.recent_budget[:, None]  # [b, n]
        sink = (positions >= 0) & (positions < self.group.num_sink)
        return self.scores.masked_fill(recent[:, None, :] | sink, float("inf"))

    def compress(self, keys, values, positions):
        """H2O selection to each row's budget, then the evicted KVs are merged into the kept ones.

        Args:
            keys, values: ``[batch, kv_heads, n, head_dim]``; positions: ``[batch, kv_heads, n]``.
        """
        if self._deferring or self.scores is None or not self.compresses():
            return keys, values, positions
        if self._steady(keys.shape[-2]):
            self._kept_no_pads = True  # pad-free slots, one slot out of each row and head: still pad-free
            return self._evict_and_merge_one(keys, values, positions)
        plan = keep_plan(positions, self.target_length(keys.shape[-2]), lambda: self.priority(keys, values, positions))
        if plan is None:
            return keys, values, positions
        index, filler = plan
        kept_slot = torch.ones_like(index, dtype=torch.long) if filler is None else (~filler).long()
        hit = torch.zeros_like(positions, dtype=torch.long).scatter_add_(2, index, kept_slot)
        evicted = (positions != PAD_POSITION) & (hit == 0)  # [b, h, n]
        self.scores = self.scores.gather(2, index)
        kept_keys, kept_values, kept_positions = gather_slots(keys, values, positions, index)
        if filler is not None:
            kept_positions = kept_positions.masked_fill(filler, PAD_POSITION)
        num_evicted = int(evicted.sum(-1).max())
        if num_evicted:
            # the evicted slots of each (row, head), compacted to the front in slot order
            order = torch.sort(evicted.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :num_evicted]
            evicted_keys, evicted_values, _ = gather_slots(keys, values, positions, order)
            kept_keys, kept_values, self.tau, _ = d2o_merge(
                kept_keys,
                kept_values,
                kept_positions != PAD_POSITION,
                evicted_keys,
                evicted_values,
                evicted.gather(2, order),
                self.tau,
                self.group.alpha,
                self.group.beta,
            )
        return kept_keys, kept_values, kept_positions

    # ------------------------------------------------------------------------------------ the decoding fast path
    def uniform_budgets(self) -> tuple[int, int] | None:
        """``(layer_budget, recent_budget)`` as ints when every row has the same ones and evicts, else ``None``.

        One device sync per budget tensor (fixed once set; a batch reorder replaces it), like :meth:`compresses`.
        """
        budget, recent = self.layer_budget, self.recent_budget
        if budget is None:
            return None
        key = (budget, recent, tensor_version(budget), tensor_version(recent))
        cached = self._uniform
        if cached is None or any(a is not b if i < 2 else a != b for i, (a, b) in enumerate(zip(cached[0], key))):
            first, first_recent = int(budget[0]), int(recent[0])
            same = bool((budget == first).all()) and bool((recent == first_recent).all())
            self._uniform = cached = (key, (first, first_recent) if same and first != UNLIMITED else None)
        return cached[1]

    def _steady(self, n: int) -> bool:
        """Whether this step drops exactly one slot of every row and head, from pad-free slots: every row holds one
        token over its budget (:meth:`_evict_and_merge_one` then gives what the general path gives)."""
        if not self._no_pads or self.scores is None or self.scores.shape[-1] != n or self.sliding_window is not None:
            return False
        budgets = self.uniform_budgets()
        return budgets is not None and n == budgets[0] + 1

    def _evict_and_merge_one(self, keys, values, positions):
        """:meth:`compress` of a steady decoding step: every row and head drops one slot and merges it.

        The dropped slot is the lowest accumulated score outside the sinks and the recent window, the latest of
        equal ones (what :func:`keep_plan`'s stable ranking drops); kept slots are gathered in order, and the
        dropped KV is merged as :func:`d2o_merge` merges one evicted token per (row, head) into pad-free slots
        (the same float32 arithmetic on the one slot it changes; equal to the general path for finite keys).

        Args:
            keys, values: ``[batch, kv_heads, n, head_dim]``; positions: ``[batch, kv_heads, n]``, no pad.
        """
        n = keys.shape[-2]
        recent = self.uniform_budgets()[1]
        cached = self._recent_mask
        if cached is None or cached[0] != (n, recent, keys.device):
            cached = self._recent_mask = ((n, recent, keys.device), torch.arange(n, device=keys.device) >= n - recent)
        mask = cached[1]
        # sinks are forced by position (no pad: every position is >= 0), the recent window by slot
        priority = self.scores.masked_fill((positions < self.group.num_sink) | mask, float("inf"))
        dropped = (n - 1) - priority.flip(-1).argmin(dim=-1, keepdim=True)  # [b, h, 1]
        slots = self._steady_slots
        if slots is None or slots.shape[0] != n - 1 or slots.device != keys.device:
            slots = self._steady_slots = torch.arange(n - 1, device=keys.device)
        index = slots + (slots >= dropped)  # [b, h, n - 1] kept slots in order
        self.scores = self.scores.gather(2, index)
        kept_keys, kept_values, kept_positions = gather_slots(keys, values, positions, index)
        evicted = dropped[..., None].expand(-1, -1, -1, keys.shape[-1])
        evicted_keys = keys.gather(2, evicted)
        if values.shape[-1] != keys.shape[-1]:
            evicted = dropped[..., None].expand(-1, -1, -1, values.shape[-1])
        evicted_values = values.gather(2, evicted)
        group = self.group
        # the threshold this path set last step (finite keys: every row's, no NaN left) needs no NaN test
        tau_set = self._tau_set is self.tau
        kept_keys, kept_values, self.tau = merge_one(
            kept_keys, kept_values, evicted_keys, evicted_values, self.tau, group.alpha, group.beta, tau_set
        )
        self._tau_set = self.tau
        return kept_keys, kept_values, kept_positions

    def reset(self) -> None:
        super().reset()
        self._clear_state()


class StaticD2OLayer(StaticSlots, D2OLayer):
    """:class:`D2OLayer` with a static layout (``static=True``, which needs ``first_eviction="prefill"``).

    The layers freeze together once the last one has evicted after the prefill (:meth:`_D2OGroup.evict_after_prefill`).
    A layer that evicts holds ``max(budget) + 1`` slots (each row its own budget; ``stored + max_new_tokens`` where
    some row keeps every token), a layer that keeps every token ``stored + max_new_tokens``. A step of a row holding
    ``budget + 1`` tokens overwrites, per KV head, the lowest accumulated score outside the sinks and the recent window
    (the slot the dynamic layer evicted after the previous step, ties to the latest position as there), after merging
    its KV into the most similar other slot with the EMA threshold of :func:`merge_one`; a row below its budget takes a
    free slot. The same tokens, merges and thresholds as the dynamic layer (float rounding aside).
    """

    freezes_in_update = False  # D2O compresses in the attention call

    def __init__(self, *args, max_new_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_new_tokens = max_new_tokens
        self._evicting = False  # fixed at the freeze: whether some row of this layer evicts

    def freeze(self) -> None:
        """All layers together, once the budgets are fixed (after the last layer's prefill); a layer thawed for a
        multi-token step freezes again after its attention."""
        if self.layer_budget is None:
            return
        for layer in self.group.layers:
            if not layer._frozen:
                StaticSlots.freeze(layer)

    def capacity(self, stored: int) -> int:
        if not self.compresses():
            return stored + self.max_new_tokens
        budget = self.layer_budget
        finite = budget[budget != UNLIMITED]
        capacity = int(finite.max()) + 1
        if finite.numel() < budget.numel():  # rows that keep every token append
            capacity = max(capacity, stored + self.max_new_tokens)
        return capacity

    def freeze_state(self, stored: int, capacity: int) -> None:
        self._evicting = self.evicts = self.compresses()  # a layer that keeps every token appends (StaticSlots)
        if self._evicting:
            self.scores = F.pad(self.scores, (0, capacity - stored))
            self.tau = self.tau.clone()
            for tensor in (self.scores, self.tau):
                torch._dynamo.mark_static_address(tensor)
        else:
            self.scores = None
        self._must_evict: torch.Tensor | None = None

    def next_slot(self, positions: torch.Tensor) -> torch.Tensor:
        """``[batch, heads, 1]``: the lowest score outside sinks and recent window in a row holding ``budget + 1``
        tokens, else a free slot (a layer that keeps every token: ``StaticSlots.static_update`` checks there is one)."""
        free = positions == PAD_POSITION
        if not self._evicting:
            return lowest_priority_slot(free.logical_not().long(), positions)[..., None]
        held = (~free[:, :1]).sum(-1, keepdim=True)  # [b, 1, 1]
        must = held > self.layer_budget[:, None, None]  # [b, 1, 1]
        recent = positions >= (self.real_seen - self.recent_budget)[:, None, None]
        sink = (positions >= 0) & (positions < self.group.num_sink)
        priority = self.scores.masked_fill(recent | sink, float("inf"))
        # a row at its budget must evict: its free slots (rows keeping every token) are never chosen then
        priority = torch.where(free, torch.where(must, float("inf"), float("-inf")), priority)
        self._must_evict = must
        return lowest_priority_slot(priority, positions)[..., None]

    def static_update(self, key_states, value_states, attn_kwargs):
        if self._evicting:  # rows that keep every token need a free slot
            free = (self._positions[:, :1] == PAD_POSITION).any(dim=-1)
            torch._assert_async((free | (self.layer_budget[:, None] != UNLIMITED)).all(), CAPACITY_EXCEEDED)
        return super().static_update(key_states, value_states, attn_kwargs)

    def before_write(self, slot: torch.Tensor) -> None:
        """Merges the KV of the slot evicted in rows that must evict into its most similar other slot (see
        :func:`merge_one`: the same arithmetic on the slots of the static buffers)."""
        if not self._evicting:
            return
        keys, values, positions = self.keys, self.values, self._positions
        head_dim = keys.shape[-1]
        evicted_keys = keys.gather(2, slot[..., None].expand(-1, -1, 1, head_dim))  # [b, h, 1, d]
        value_index = slot[..., None].expand(-1, -1, 1, values.shape[-1])
        evicted_values = values.gather(2, value_index)
        sim = (_unit(evicted_keys) @ _unit(keys).transpose(-1, -2)).clamp(-1.0, 1.0)[..., 0, :]  # [b, h, capacity]
        others = positions != PAD_POSITION
        others = others.scatter(2, slot, False)
        sim, match = sim.masked_fill(~others, float("-inf")).max(dim=-1, keepdim=True)  # [b, h, 1]
        must = self._must_evict  # [b, 1, 1]
        batch, heads = slot.shape[:2]
        mean = sim.sum(dim=(1, 2)) / heads  # [b]
        tau = torch.where(torch.isnan(self.tau), mean, self.group.alpha * self.tau + self.group.beta * mean)
        tau = torch.where(must.view(batch), tau, self.tau)
        self.tau.copy_(tau)
        merges = must & (sim >= tau.clamp(min=SMALLEST_POSITIVE).view(batch, 1, 1))
        weight = torch.where(merges, sim, torch.zeros_like(sim))[..., None]  # [b, h, 1, 1]
        _merge_into_match(keys, values, evicted_keys, evicted_values, match[..., None], weight)

    def on_write(self, slot: torch.Tensor) -> None:
        if self._evicting:
            self.scores.scatter_(2, slot, 0.0)

    def after_attention(self, query, key, valid, call) -> None:
        if self._evicting:
            self.scores.add_(static_step_column_scores(query, key, valid, call))

    def thaw(self) -> None:
        # the eviction the dynamic layer made after the previous step merges first (StaticSlots.thaw drops the slot)
        if self._evicting:
            self.before_write(self.next_slot(self._positions))
        super().thaw()


CAPACITY_EXCEEDED = "D2OCache (static=True): capacity exceeded, more tokens generated than max_new_tokens"


class D2OCache(LongMemCache):
    """D2O: per-layer budgets from prefill attention density, H2O eviction, merging of evicted KVs.

    Args:
        budget: average tokens kept per layer (heavy hitters + recent window + sinks); becomes the paper's ratio
            ``rho = budget / N`` of each row's length ``N`` at the first decoding step. Layers get
            ``clamp(softmax(-v)_l * L * rho, 0.01, 1) * N`` tokens.
        recent_ratio: share of each layer's budget given to the recent window (paper: ``hh_ratio = recent_ratio``,
            i.e. 0.5).
        alpha, beta: EMA of the merge threshold, ``tau <- alpha tau + beta mean(s)`` (paper: 0.5, 0.5).
        num_sink: first tokens always kept (official: 4).
        uncompressed_layers: decoder layer indices that keep every token (negative indices count from the end);
            ``None`` = the paper's ``(0, 1, L - 1)``; ``"auto"`` = the paper's unless that leaves no full-attention
            layer to compress (models of at most 3 layers), then none (what :meth:`options_for_budget` gives). A
            setting that leaves nothing to compress warns: the cache then holds every token, whatever the budget.
        first_eviction: ``"decode"`` (the paper): budgets are fixed and the cache first evicts at the first decoding
            step, after it attended to the whole prompt; ``"prefill"``: at the end of the prefill, from the prefill
            scores alone (the first decoded token attends to the compressed cache; a chunked prefill fixes the
            budgets after its first chunk). ``None``: ``"prefill"`` with ``static=True``, else ``"decode"``.
        static: decode into fixed slots overwritten in place (:class:`StaticD2OLayer`,
            :mod:`~hf_longmem.cache_classes.static`): ``is_compileable``, the same tokens and merges as
            ``static=False`` with ``first_eviction="prefill"`` (float rounding aside), which it needs: the budgets
            and the first eviction must be fixed before the compiled decoding steps. Full-attention models.
        max_new_tokens: slots reserved for generated tokens in the layers (and rows) that keep every token
            (``static=True`` only); more raises.
        config: the model config (required: every layer's statistic enters every layer's budget).

    Example::

        cache = hf_longmem.make_cache("d2o", model, budget=512)
        model.generate(input_ids, cache=cache, max_new_tokens=64)
    """

    #: Why this cache may hold more than its budget (shown next to benchmark rows).
    memory_note = "keeps layers 0, 1 and L-1 whole (the paper's setting); the budget is the mean of the other layers"

    compresses_sliding_layers = False  # an all-sliding model is refused below its window (build_layers)

    def __init__(
        self,
        budget: int = 256,
        recent_ratio: float = 0.5,
        alpha: float = 0.5,
        beta: float = 0.5,
        num_sink: int = 4,
        uncompressed_layers: Iterable[int] | str | None = None,
        first_eviction: str | None = None,
        static: bool = False,
        max_new_tokens: int | None = None,
        config=None,
    ):
        self.static = append_static_options(static, max_new_tokens)
        if first_eviction is None:
            first_eviction = "prefill" if self.static else "decode"
        first_eviction = check_choice("first_eviction", first_eviction, ("decode", "prefill"))
        if self.static and first_eviction != "prefill":
            raise ValueError(
                "D2OCache(static=True) needs first_eviction='prefill' (the budgets and the first eviction are fixed "
                "before the compiled decoding steps); the paper's first_eviction='decode' needs static=False"
            )
        check_int("num_sink", num_sink, low=0)
        if check_int("budget", budget, low=1) <= num_sink:
            raise ValueError(f"`budget` must be an int larger than num_sink={num_sink}, got {budget!r}")
        check_ratio("recent_ratio", recent_ratio)
        check_ratio("alpha", alpha, include_zero=True, include_one=True)
        check_real("beta", beta, low=0.0)
        if config is None:
            raise ValueError(
                "D2OCache needs `config=` (every layer's statistic sets every layer's budget); or use make_cache"
            )
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        full_layers = _full_attention_layers(config)
        if uncompressed_layers == "auto":
            paper = _uncompressed_layers(None, num_layers)
            uncompressed = paper if full_layers - paper else frozenset()
        else:
            uncompressed = _uncompressed_layers(uncompressed_layers, num_layers)
        if full_layers and full_layers <= uncompressed:
            warnings.warn(
                f"D2OCache compresses nothing on this model: its full-attention layers {sorted(full_layers)} are all "
                f"in uncompressed_layers={sorted(uncompressed)} (the paper's default keeps layers 0, 1 and L - 1 "
                f"whole), so the cache holds every token, not a budget of {budget}; pass uncompressed_layers=[] "
                "or 'auto' (hf_longmem.get_cache_spec('d2o').options_for_budget does)",
                stacklevel=2,
            )
        self.budget, self.recent_ratio, self.num_sink = budget, recent_ratio, num_sink
        self.alpha, self.beta, self.uncompressed_layers = alpha, beta, uncompressed
        self.first_eviction, self.max_new_tokens = first_eviction, max_new_tokens
        group = _D2OGroup(budget, float(recent_ratio), num_sink, float(alpha), float(beta), first_eviction)

        def layer(layer_idx: int) -> D2OLayer:
            if self.static:
                return StaticD2OLayer(group, layer_idx, layer_idx in uncompressed, max_new_tokens=max_new_tokens)
            return D2OLayer(group, layer_idx, layer_idx in uncompressed)

        super().__init__(layer, config=config)
        check_static_layers(self, self.static)

    @classmethod
    def options_for_budget(cls, budget: int) -> dict:
        """``budget`` plus ``uncompressed_layers="auto"``: the paper's uncompressed layers where that leaves layers
        to compress, none on models of at most 3 layers (where the paper's default compresses nothing)."""
        return {"budget": budget, "uncompressed_layers": "auto"}


def _full_attention_layers(config) -> frozenset[int]:
    """Indices of the decoder layers that get a D2O layer (sliding-window layers keep transformers' own)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return frozenset(i for i, layer_type in enumerate(layer_types) if layer_type == "full_attention")


def _uncompressed_layers(layers: Iterable[int] | None, num_layers: int) -> frozenset[int]:
    if layers is None:
        return frozenset({0, 1, num_layers - 1})
    try:
        items = list(layers)
    except TypeError:
        raise ValueError(f"`uncompressed_layers` must be a list of layer indices, got {layers!r}") from None
    for idx in items:
        if not isinstance(idx, int) or isinstance(idx, bool) or not -num_layers <= idx < num_layers:
            raise ValueError(
                f"`uncompressed_layers` must hold layer indices in [-{num_layers}, {num_layers}), got {layers!r}"
            )
    return frozenset(idx % num_layers for idx in items)


__all__ = [
    "D2OCache",
    "D2OLayer",
    "StaticD2OLayer",
    "attention_density",
    "d2o_merge",
    "layer_ratios",
    "query_head_column_sums",
]


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache(
    "d2o",
    D2OCache,
    needs_attention=True,
    summary="D2O: layer budgets from attention density, H2O eviction, evicted KVs merged into similar kept ones",
)
