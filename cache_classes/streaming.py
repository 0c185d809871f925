"""StreamingLLM (Xiao et al., 2023): attention sinks + a recent window.

Keeps the first ``sink_size`` real tokens of each row (the "attention sinks") and the most recent
``budget - sink_size`` tokens; everything in between is evicted. One decision for all layers and heads.

Positions. ``position_mode="true"`` (default) keeps every token at its original RoPE position, which needs no
knowledge of the model's RoPE and makes a full budget identical to ``DynamicCache``. ``position_mode="shift"`` is
the paper's scheme: positions are those *inside the cache*, so the kept tokens sit at contiguous positions right
before the query, and no relative distance ever exceeds the budget — what lets a model run past its training
length. The paper caches keys before RoPE and rotates them at every step; HF models hand the cache post-RoPE keys,
so we re-rotate them by the position delta instead (RoPE rotations compose, the result is the same up to float
rounding). Until the first eviction the deltas are zero and both modes are bit-identical.

Budget semantics: between steps each layer stores at most ``budget`` tokens; a step attends to those plus its new
tokens (a long prompt is prefilled with exact attention, then compressed), as transformers' sliding-window layer
does. The paper's ``evict_for_space`` keeps ``budget`` including the new token; ours keeps one more during a decode
step, which is what makes ``budget >= length`` exactly the full cache.
"""

from __future__ import annotations

import torch

from hf_longmem.memory.padding import PAD_POSITION
from hf_longmem.memory.rope import LayerRotation, ModelRotary
from hf_longmem.registry import register_cache
from hf_longmem.validation import check_choice, check_int

from .base import CompressedLayer, LongMemCache
from .rotation import ShiftedLayer, layer_rotation, shift_rotary
from .static import KEEP, StaticSlots, check_static_layers


class StreamingLayer(ShiftedLayer):
    """Sinks + recent-window layer. See :class:`StreamingCache`."""

    def __init__(self, budget: int, sink_size: int = 4, rotary: LayerRotation | None = None):
        super().__init__(rotary)
        self.budget = budget
        self.sink_size = sink_size
        self._kept_slots: torch.Tensor | None = None  # [budget] slots decode_step keeps out of budget + 1

    # Decoding steps of the fast path (:meth:`decode_step`) drop the oldest recent slot and append the new token
    # without touching ``positions``: ``_evictions`` such steps since, the first of them at each row's position
    # ``_evict_start`` ``[batch]``. Reading ``positions`` applies them (the new positions are consecutive and real).
    @property
    def positions(self) -> torch.Tensor | None:
        if getattr(self, "_evictions", 0):
            count, start = self._evictions, self._evict_start
            stored = CompressedLayer.positions.fget(self)  # [b, h, budget]: sinks, then the recent window
            heads, recent = stored.shape[1], stored.shape[-1] - self.sink_size
            tail = (start[:, None] + torch.arange(count, device=start.device)).to(torch.int32)  # [b, count]
            window = torch.cat((stored[..., self.sink_size :], tail[:, None, :].expand(-1, heads, -1)), dim=-1)
            self.positions = torch.cat((stored[..., : self.sink_size], window[..., -recent:]), dim=-1)
            self._no_pads = True  # only pad-free steps take the fast path
        return CompressedLayer.positions.fget(self)

    @positions.setter
    def positions(self, value: torch.Tensor | None) -> None:
        self._evictions, self._evict_start = 0, None
        CompressedLayer.positions.fset(self, value)

    def decode_step(self, key_states, value_states, real_before):
        """Steady decoding in true positions: sinks + the recent window without the oldest slot + the new token, as
        :meth:`compress` keeps them, with the positions kept lazily (no per-step position tensors)."""
        if self.rotary is not None or self.keys.shape[-2] < self.budget:
            return None
        keys = torch.cat((self.keys, key_states), dim=-2)  # [b, h, budget + 1, d]: what this step attends to
        values = torch.cat((self.values, value_states), dim=-2)
        kept = self._kept_slots
        if kept is None or kept.device != keys.device or kept.shape[0] != self.budget:
            # every slot but the oldest of the recent window (one gather per tensor instead of two slices and a cat)
            slots = torch.arange(self.budget + 1, device=keys.device)
            kept = self._kept_slots = slots[slots != self.sink_size]
        self.keys, self.values = keys.index_select(2, kept), values.index_select(2, kept)
        if not self._evictions:
            self._evict_start = real_before
        self._evictions += 1
        self._evicted = True
        self._steady_appends = 0
        self._drop_stale_buffers()
        return keys, values

    def target_length(self, num_tokens: int) -> int:
        return min(self.budget, num_tokens)

    def compress(self, keys, values, positions):
        n, target = keys.shape[-2], self.target_length(keys.shape[-2])
        no_pads = self._step_no_pads  # known while decoding real tokens: no scan, no device sync
        if target < n and (no_pads or (no_pads is None and bool((positions[:, 0, 0] != PAD_POSITION).all()))):
            # No row has pads: sinks + recent window are two slices (the decode hot path, no top-k or gather).
            recent = target - self.sink_size
            self._evicted = True
            self._kept_no_pads = True
            return tuple(
                torch.cat((t[..., : self.sink_size, :], t[..., n - recent :, :]), dim=-2) for t in (keys, values)
            ) + (torch.cat((positions[..., : self.sink_size], positions[..., n - recent :]), dim=-1),)
        return super().compress(keys, values, positions)

    def priority(self, keys, values, positions):
        """Sinks first (``inf``), then recency: the ``sink_size`` oldest real tokens and the newest ones win."""
        n = keys.shape[-2]
        first_real = (positions[:, :1] == PAD_POSITION).sum(-1, keepdim=True)  # [b, 1, 1]
        cols = torch.arange(n, device=keys.device, dtype=torch.float32).expand(positions.shape[0], 1, n)
        self._evicted = True
        return cols.masked_fill(cols < first_real + self.sink_size, float("inf"))


class StaticStreamingLayer(StaticSlots, StreamingLayer):
    """:class:`StreamingLayer` with a static layout (``static=True``): ``budget + 1`` slots, a ring over the window.

    A step overwrites the oldest non-sink token (what the dynamic layer dropped after the previous step), or a free
    slot while fewer than ``budget + 1`` tokens were seen. Sinks are the row's first ``sink_size`` real positions.
    """

    def capacity(self, stored: int) -> int:
        return self.budget + 1

    def slot_priority(self, positions: torch.Tensor) -> torch.Tensor:
        """Recency (the true position); sinks are never overwritten. ``[batch, 1, capacity]`` int64."""
        row = positions[:, :1].long()  # the same slots in every head
        return row.masked_fill((row >= 0) & (row < self.sink_size), KEEP)

    def thaw(self) -> None:
        super().thaw()
        self._evicted = True  # static steps may have evicted: the dynamic layer must shift (zero deltas otherwise)

    def attention_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Position shift: the recent window already ends right before the query; only the sinks move, forward by
        the number of tokens evicted (the real tokens seen minus those held)."""
        if self.rotary is None:
            return keys
        row = self._positions[:, :1]  # [b, 1, capacity]
        held = (row != PAD_POSITION).sum(-1, keepdim=True)  # this step's token included
        evicted = self.real_seen[:, None, None] - held
        sink = (row >= 0) & (row < self.sink_size)
        return self.rotary.rotate(keys, torch.where(sink, evicted, torch.zeros_like(evicted)).squeeze(1))


class StreamingCache(LongMemCache):
    """StreamingLLM cache: ``sink_size`` attention sinks + the most recent tokens, ``budget`` tokens in all.

    Args:
        budget: tokens stored per layer between steps (sinks included). Must exceed ``sink_size``.
        sink_size: number of initial tokens kept as attention sinks (paper default 4).
        position_mode: ``"true"`` (original positions) or ``"shift"`` (the paper's positions inside the cache;
            needs ``rotary``, or a ``config`` from which the model's RoPE is derived).
        config: the model config; lays out sliding-window layers and provides RoPE for ``"shift"``.
        rotary: the model's rotations, a :class:`~hf_longmem.memory.rope.ModelRotary` (``make_cache`` derives it
            from the model) or one :class:`~hf_longmem.memory.rope.LayerRotation` for every layer.
        static: decode into ``budget + 1`` fixed slots overwritten in place (:mod:`~hf_longmem.cache_classes.static`):
            ``is_compileable``, so ``torch.compile(model.forward, fullgraph=True)`` or ``generate(...,
            compile_config=...)`` can compile the decode step. Same tokens attended as ``static=False`` (float
            rounding aside); the prompt is prefilled in one forward, then one token per step.

    Example::

        cache = StreamingCache(budget=256, sink_size=4)
        model.generate(input_ids, cache=cache, max_new_tokens=64)
    """

    def __init__(
        self,
        budget: int = 256,
        sink_size: int = 4,
        position_mode: str = "true",
        config=None,
        rotary: LayerRotation | ModelRotary | None = None,
        static: bool = False,
    ):
        check_int("sink_size", sink_size, low=0)
        check_int(
            "budget", budget, low=sink_size + 1, hint=f"larger than sink_size={sink_size}: room for a recent window"
        )
        shift = shift_rotary(position_mode, rotary, config)
        self.budget, self.sink_size, self.position_mode = budget, sink_size, position_mode
        self.static = check_choice("static", static, (False, True))
        layer_cls = StaticStreamingLayer if self.static else StreamingLayer
        super().__init__(
            lambda layer_idx: layer_cls(budget, sink_size, layer_rotation(shift, layer_idx)), config=config
        )
        check_static_layers(self, self.static)

    @classmethod
    def from_model(cls, model, **kwargs) -> StreamingCache:
        if kwargs.get("position_mode") == "shift" and "rotary" not in kwargs:
            kwargs["rotary"] = shift_rotary("shift", None, model=model)
        return cls(config=model.config, **kwargs)


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache("streaming", StreamingCache, summary="StreamingLLM: attention sinks + recent window")
