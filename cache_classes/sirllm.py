"""SirLLM (Yao et al., 2024): streaming multi-turn dialogue with token-entropy memory and decay.

Each token's score is its self-information ``-log p(x_i | x_<i)`` under the model's own next-token distribution
(the paper's "token entropy"); the first token of a turn gets the turn's largest score, as in the official code.
Before a new turn of ``n`` tokens, if the cache would exceed ``capacity = start_size + recent_size + entropy_size``,
it keeps the ``start_size`` first tokens, the ``entropy_size - n`` highest-scoring tokens, and fills the remaining
room with the most recent ones, down to ``capacity - n``. Then every kept score is multiplied by ``decay_ratio``
(once per turn: memory decay) and the new turn's scores are appended. The same tokens are kept in every layer and
head. Decoding steps inside a turn do not evict (the paper's evaluation scores choices, it never generates long).

Positions follow the paper (pos-shift, ``position_mode="shift"``): the kept keys are re-rotated to contiguous
positions inside the cache; ``"true"`` keeps original positions. Keys are cached post-RoPE by HF models, so the
shift is an extra rotation by the position delta (exact up to float rounding), derived per layer from the model's own
RoPE (:class:`~hf_longmem.memory.rope.ModelRotary`: any layout, per-layer-type frequencies, none on NoPE layers);
models whose RoPE cannot be re-rotated exactly are refused when the cache is built (use ``"true"`` there).

Hybrid models (Gemma-2/3, GPT-OSS, EXAONE-4): sliding-window layers stay transformers' sliding layers (true positions,
their own window); the full-attention layers evict and shift. Pads and scores are read from the first SirLLM layer,
wherever it is (layer 0 may be sliding).

The scores need the model's logits over each new input, which ``generate`` does not compute (it keeps only the
last position). :meth:`SirLLMCache.from_model` (used by ``make_cache``) therefore attaches a forward hook to the
decoder that projects its last hidden states with the model's LM head; the hook ignores forwards that use another
cache and is removed by :meth:`SirLLMCache.close` or when the cache is garbage-collected.

``static=True`` (with ``max_new_tokens``) decodes into fixed buffers (:mod:`~hf_longmem.cache_classes.static`): after
a turn's prefill each layer holds the kept tokens plus ``max_new_tokens`` slots, written in place in decoding order,
and the scores sit in slots of the same buffers, so the decode step is ``torch.compile``-able (``fullgraph=True``) and
attends to the same tokens at the same (shifted) positions as ``static=False``. The next turn thaws the layers (eager)
and evicts as above.

Deviations from the official code: per-row scores for batches (the official code is batch-1); a turn longer than
``entropy_size`` keeps only start + recent tokens instead of tripping an assertion; a turn longer than the whole
capacity keeps the start tokens.
"""

from __future__ import annotations

import weakref

import torch

from hf_longmem.memory.accounting import RESIDENT, MemoryParts, tensor_bytes
from hf_longmem.memory.output_hook import attach_output_hook
from hf_longmem.memory.padding import PAD_POSITION
from hf_longmem.memory.rope import LayerRotation, ModelRotary
from hf_longmem.registry import register_cache
from hf_longmem.validation import check_int, check_ratio

from .base import LongMemCache, gather_slots, keep_plan
from .hooked import ModelHookedCache
from .rotation import ShiftedLayer, layer_rotation, shift_rotary
from .static import AppendSlots, append_static_options, check_static_layers


class SirLLMLayer(ShiftedLayer):
    """One layer of a :class:`SirLLMCache`; the eviction plan is shared by all layers and made by the cache."""

    def __init__(self, owner: SirLLMCache, rotary: LayerRotation | None):
        super().__init__(rotary)
        self._owner = weakref.ref(owner)

    @property
    def owner(self) -> SirLLMCache:
        owner = self._owner()
        if owner is None:
            raise RuntimeError("SirLLMLayer outlived its SirLLMCache")
        return owner

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.eviction_plan(self.cumulative_length, key_states.shape[-2], self.positions)
        if plan is not None:
            index, filler = plan
            self.keys, self.values, self.positions = gather_slots(self.keys, self.values, self.positions, index)
            if filler is not None:
                self.positions = self.positions.masked_fill(filler, PAD_POSITION)
            self._evicted = True
        return super().update(key_states, value_states, *args, **kwargs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.get_stored_length()
        if self.is_initialized:
            plan = self.owner.eviction_plan(self.cumulative_length, query_length, self.positions)
            if plan is not None:
                stored = plan[0].shape[-1]
        return stored + query_length, self.cumulative_length - stored

    def target_length(self, num_tokens: int) -> int:
        return num_tokens  # eviction happens before a turn, in update()


class StaticSirLLMLayer(AppendSlots, SirLLMLayer):
    """:class:`SirLLMLayer` with a static layout (``static=True``): the tokens kept after a turn's prefill plus
    ``max_new_tokens`` slots, filled in decoding order (slot ``stored + t`` for the ``t``-th decoded token, in every
    row: left-pad slots are never reused), so slots stay in position order as in the dynamic layer and the position
    shift is the same formula."""

    freezes_in_update = True  # SirLLM evicts in update(), before a turn; the attention is the model's own

    def freeze_state(self, stored: int, capacity: int) -> None:
        # the next free slot, the same in every row (a device counter: no host sync while decoding)
        self._tail = torch.full((1,), stored, dtype=torch.long, device=self.device)
        torch._dynamo.mark_static_address(self._tail)

    def next_slot(self, positions: torch.Tensor) -> torch.Tensor:
        torch._assert_async(
            self._tail < positions.shape[-1],
            "SirLLMCache (static=True): capacity exceeded, more tokens generated than max_new_tokens",
        )
        return self._tail.view(1, 1, 1).expand(positions.shape[0], positions.shape[1], 1)

    def on_write(self, slot: torch.Tensor) -> None:
        self._tail.add_(1)

    def attention_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Position shift (after an eviction): slot ``j`` before the new token's slot ``k`` moves to
        ``real_before - k + j``, as the dynamic layer moves slot ``j`` of ``k`` stored ones; the new token and free
        slots are not moved."""
        if self.rotary is None or not self._evicted:
            return keys
        row = self._positions[:, :1]  # [b, 1, capacity], the same slots in every head
        new_slot = self._tail - 1  # on_write already advanced it
        real_before = (self.real_seen - 1)[:, None, None]
        target = real_before - new_slot + torch.arange(row.shape[-1], device=keys.device)
        delta = torch.where(row < 0, torch.zeros_like(target), target - row.long())
        return self.rotary.rotate(keys, delta)

    def thaw(self) -> None:
        # the shared scores follow the slots (the same in every layer); the first layer to thaw moves them
        self.owner.thaw_scores(self._positions[:, :1])
        super().thaw()


def _record_turn(cache: SirLLMCache, input_ids: torch.Tensor, hidden: torch.Tensor, lm_head) -> None:
    cache.record_turn(input_ids, torch.log_softmax(lm_head(hidden).float(), dim=-1))


class SirLLMCache(ModelHookedCache, LongMemCache):
    """SirLLM: keep start tokens, high self-information tokens (decaying per turn) and recent tokens.

    Args:
        entropy_size: slots for high-score tokens (official DailyDialog 508, Grocery 1020).
        start_size: first tokens always kept (official 4).
        recent_size: slots reserved for the most recent tokens (official 0; recency still fills spare room).
        decay_ratio: per-turn multiplier of the kept scores (official 0.7 DailyDialog, 0.9 RPS, 1.0 Grocery).
        position_mode: ``"shift"`` (paper) or ``"true"``.
        config: the model config (layer layout, RoPE for ``"shift"``).
        rotary: the model's rotations, a :class:`~hf_longmem.memory.rope.ModelRotary` (``from_model`` derives it
            from the model) or one :class:`~hf_longmem.memory.rope.LayerRotation` for every layer.
        static: after each turn's prefill, hold the kept tokens plus ``max_new_tokens`` fixed slots written in place
            (:mod:`~hf_longmem.cache_classes.static`): ``is_compileable``, the same attention as ``static=False``
            (float rounding aside); full-attention models.
        max_new_tokens: slots reserved for the tokens decoded in a turn (``static=True`` only); more raises.

    Build it with ``make_cache("sirllm", model, ...)`` (or :meth:`from_model`), which attaches the scoring hook.

    SirLLM evicts only *between* turns: within one prompt (and its answer) it holds every token, so a single-turn
    benchmark row of it holds what the full cache holds (:attr:`memory_note`, shown by ``hf-longmem bench``).
    """

    #: Why this cache may hold as much as the full cache (shown next to benchmark rows where it does).
    memory_note = "evicts between turns only; one prompt and its answer are held whole"
    #: What the budget bounds: the tokens kept once the next turn arrives (see the architecture matrix, check (b)).
    memory_saving = "between_turns"
    hook_attributes = ("_hook",)

    def __init__(
        self,
        entropy_size: int = 1020,
        start_size: int = 4,
        recent_size: int = 0,
        decay_ratio: float = 1.0,
        position_mode: str = "shift",
        config=None,
        rotary: LayerRotation | ModelRotary | None = None,
        static: bool = False,
        max_new_tokens: int | None = None,
    ):
        check_int("entropy_size", entropy_size, low=1)
        check_int("start_size", start_size, low=0)
        check_int("recent_size", recent_size, low=0)
        check_ratio("decay_ratio", decay_ratio, include_one=True)
        self.static = append_static_options(static, max_new_tokens)
        self.max_new_tokens = max_new_tokens
        shift = shift_rotary(position_mode, rotary, config)
        self.entropy_size, self.start_size, self.recent_size = entropy_size, start_size, recent_size
        self.capacity = start_size + recent_size + entropy_size
        self.decay_ratio, self.position_mode = decay_ratio, position_mode
        self.scores: torch.Tensor | None = None  # [batch, stored] self-information of each kept slot
        self._last_logprobs: torch.Tensor | None = None  # [batch, vocab] of the last position seen
        self._plan_key: tuple[int, int] | None = None
        self._plan = None
        self._hook = None
        self._shift = shift
        self._static_scores = False  # scores held in the static layers' slots (see thaw_scores)
        super().__init__(self._new_layer, config=config)
        check_static_layers(self, self.static)

    def _new_layer(self, layer_idx: int) -> SirLLMLayer:
        # a bound method, not a closure: a deep copy builds its later layers for itself (cache_classes/hooked.py)
        rotation = layer_rotation(self._shift, layer_idx)
        if self.static:
            return StaticSirLLMLayer(self, rotation, max_new_tokens=self.max_new_tokens)
        return SirLLMLayer(self, rotation)

    @classmethod
    def options_for_budget(cls, budget: int) -> dict:
        """Options holding ``budget`` tokens before a turn: 4 start tokens (fewer for tiny budgets), the rest by score."""
        start = min(4, max(0, budget - 1))
        return {"start_size": start, "entropy_size": max(1, budget - start)}

    # ----------------------------------------------------------------------------------------------- model hook
    @classmethod
    def from_model(cls, model, **kwargs) -> SirLLMCache:
        if kwargs.get("position_mode", "shift") == "shift" and "rotary" not in kwargs:
            kwargs["rotary"] = shift_rotary("shift", None, model=model)
        cache = cls(config=model.config, **kwargs)
        cache.attach(model)
        return cache

    def attach(self, model) -> None:
        """Scores every forward of ``model`` that uses this cache (hook on the decoder's last hidden states)."""
        self.close()
        self._hook = attach_output_hook(model, self, _record_turn, "SirLLM")
        self.remember_model(model)

    def close(self) -> None:
        """Removes the scoring hook from the model."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------------------------------------- scores
    def record_turn(self, input_ids: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Appends the self-information of ``input_ids`` ``[batch, q]`` given ``logprobs`` ``[batch, q, vocab]``."""
        batch, num_new = input_ids.shape
        ids = input_ids.to(logprobs.device)
        if self._static_scores:  # a static decoding step: the token's score goes to the slot its layers wrote
            layer = next(layer for layer in self.layers if isinstance(layer, StaticSirLLMLayer))
            self.scores.index_copy_(1, layer._tail - 1, -self._last_logprobs.gather(-1, ids))
            self._last_logprobs.copy_(logprobs[:, -1])
            return
        if num_new == 1 and self._last_logprobs is not None:
            new_scores = -self._last_logprobs.gather(-1, ids)  # a decoded token: its own probability
        else:
            within = -logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [b, q-1]: token i from logits i-1
            if num_new > 1:
                first = within.max(dim=-1, keepdim=True).values  # official: the turn's max
            else:
                first = logprobs.new_zeros(batch, 1)
            new_scores = torch.cat((first, within), dim=-1)
        # pads from the first SirLLM layer: transformers' sliding layers (e.g. layer 0 of Gemma-2/3) keep no positions
        layer = next((layer for layer in self.layers if isinstance(layer, SirLLMLayer) and layer.is_initialized), None)
        if layer is not None and layer.has_pad_slots():  # no pad slot: none of the new tokens is a pad
            # a layer that froze in this forward holds the new tokens right before its free slots
            end = int(layer._tail) if getattr(layer, "_frozen", False) else layer.positions.shape[-1]
            pad = layer.positions[:, 0, end - num_new : end] == PAD_POSITION
            new_scores = new_scores.masked_fill(pad, float("-inf"))
        self.scores = new_scores if self.scores is None else torch.cat((self.scores, new_scores), dim=-1)
        self._last_logprobs = logprobs[:, -1]
        frozen = next((layer for layer in self.layers if getattr(layer, "_frozen", False)), None)
        if frozen is not None:  # the layers froze in this forward: the scores move into slots of their buffers
            free = frozen.keys.shape[-2] - self.scores.shape[-1]
            self.scores = torch.nn.functional.pad(self.scores, (0, free), value=float("-inf"))
            self._last_logprobs = self._last_logprobs.clone()
            for tensor in (self.scores, self._last_logprobs):
                torch._dynamo.mark_static_address(tensor)
            self._static_scores = True

    def thaw_scores(self, positions: torch.Tensor) -> None:
        """Back to one score per stored slot, in the order :meth:`StaticSlots.thaw` gives the slots
        (``positions`` ``[batch, 1, capacity]`` of a static layer; a no-op once done)."""
        if not self._static_scores:
            return
        order = positions[:, 0].sort(dim=-1, stable=True).indices  # pads and free slots first, then by position
        common = int((positions[:, 0] == PAD_POSITION).sum(-1).min())
        self.scores = self.scores.gather(1, order[:, common:])
        self._static_scores = False

    def eviction_plan(self, seen: int, num_new: int, positions: torch.Tensor):
        """The slots every layer keeps before a forward of ``num_new`` tokens (memoised per forward)."""
        key = (seen, num_new)
        if self._plan_key == key:
            return self._plan
        plan = None
        stored = positions.shape[-1]
        if num_new > 1 and self.scores is not None:  # a new turn
            if stored + num_new > self.capacity:
                plan = self._plan_eviction(positions, num_new)
                if plan is not None:
                    self.scores = self.scores.gather(1, plan[0][:, 0])
                    if plan[1] is not None:
                        self.scores = self.scores.masked_fill(plan[1][:, 0], float("-inf"))
            self.scores = self.scores * self.decay_ratio
        self._plan_key, self._plan = key, plan
        return plan

    def _plan_eviction(self, positions: torch.Tensor, num_new: int):
        if self.scores.shape[-1] != positions.shape[-1]:
            raise RuntimeError(
                "SirLLM has no scores for some cached tokens: build the cache with make_cache('sirllm', model) "
                "(or SirLLMCache.from_model) so that every forward is scored"
            )
        n = positions.shape[-1]
        target = max(self.capacity - num_new, self.start_size)
        real = positions[:, 0] != PAD_POSITION  # [b, n]
        first_real = (~real).sum(-1, keepdim=True)
        cols = torch.arange(n, device=positions.device).expand_as(real)
        is_start = (cols >= first_real) & (cols < first_real + self.start_size)
        top = max(0, self.entropy_size - num_new)
        in_top = torch.zeros_like(real)
        if top > 0:
            ranked = self.scores.masked_fill(~real, float("-inf")).topk(min(top, n), dim=-1).indices
            in_top.scatter_(1, ranked, True)
        # start tokens first, then the top scores, then recency fills the room
        priority = cols.float() + in_top.float() * (n + 1)
        priority = priority.masked_fill(is_start, float("inf"))
        return keep_plan(positions, target, lambda: priority[:, None, :])

    def reset(self):
        super().reset()
        self.scores = self._last_logprobs = self._plan_key = self._plan = None
        self._static_scores = False

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._reorder_own(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._reorder_own(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._reorder_own(lambda t: t[indices])

    def _reorder_own(self, fn) -> None:
        if self.scores is not None:
            self.scores = fn(self.scores)
        if self._last_logprobs is not None:
            self._last_logprobs = fn(self._last_logprobs)

    def extra_memory_parts(self) -> MemoryParts:
        """``scores``: the per-token entropy scores shared by every layer."""
        return {"scores": (RESIDENT, tensor_bytes(self.scores))}


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache("sirllm", SirLLMCache, summary="SirLLM: start + high token-entropy + recent tokens, decaying per turn")
