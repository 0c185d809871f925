"""Static-capacity decoding for the bounded caches: fixed shapes, in-place slot writes, ``torch.compile``-able.

A layer built with ``static=True`` prefills as usual (eager, the method's own compression), then *freezes*: its
stored keys, values and positions move into buffers of a fixed number of slots (:meth:`StaticSlots.capacity`), and
every later step writes its token into one slot in place (``scatter_``), with no reallocation, no
data-dependent Python branch and no host sync. Which slot a step overwrites is the method's eviction rule
expressed as a priority per slot (:meth:`StaticSlots.slot_priority`): the lowest-priority slot is the one the
dynamic layout would have dropped after the previous step, and a free slot (``PAD_POSITION``) is taken first. The
attention mask comes from slot validity (positions), so the layer takes the attention call itself (hf_longmem
attention, as ``make_cache`` sets up) and transformers' mask is not used for it.

Why the results equal the dynamic layout's: a decode step attends to the same set of tokens (the ``budget`` kept
ones plus the new one); slots are in ring order instead of position order, which only changes the order of the
softmax sums (float rounding). Evicting lazily, at the next step, chooses with the same information as evicting
right after the attention (the scores of the previous step).

A later multi-token step (a new turn, a prefill chunk) *thaws* the layer back to the dynamic layout (eager, with a
host sync), runs the method's own step and freezes again. Limits, checked up front: full-attention layers only (a
sliding-window layer would need the window in the slot mask), and models that pass their attention kwargs to
``Cache.update`` (Llama and most others).
"""

from __future__ import annotations

import torch

from hf_longmem.attention import EAGER_ATTENTION_NAME, LAYER_KWARG, fallback_attention
from hf_longmem.memory.padding import PAD_POSITION
from hf_longmem.validation import check_choice, check_optional_int

from .base import gather_slots

#: Priority of a slot that must never be overwritten (a kept sink, a token of a method that never evicts).
KEEP = torch.iinfo(torch.int64).max

NOT_ROUTED = (
    "{name} (static=True) takes the attention call to mask its slots: enable hf_longmem attention "
    "(hf_longmem.make_cache(name, model, ...) does it, or hf_longmem.enable_longmem_attention(model))"
)


def finish_freeze(layer, buffers) -> None:
    """The end of every freeze: the row counters become device tensors (no host sync while decoding), the fixed
    ``buffers`` and the counters get static addresses (CUDA graphs), and ``layer`` decodes in the static layout."""
    layer.real_seen = layer.real_seen.clone()
    layer.cumulative_length = torch.tensor(int(layer.cumulative_length), device=layer.real_seen.device)
    for tensor in (*buffers, layer.real_seen, layer.cumulative_length):
        torch._dynamo.mark_static_address(tensor)
    layer._frozen = True


def check_static_step(layer, num_new: int | None, attn_kwargs: dict | None, pending: bool) -> None:
    """Refuses a static decode step the layout cannot take: more than one new token (``num_new``; ``None``: the
    layer thaws for those itself), a model whose attention passes no kwargs, or an attention call not routed to us."""
    name = type(layer).__name__
    if num_new is not None and num_new != 1:
        raise ValueError(
            f"{name} (static=True) decodes one token per step after the prefill; got a step of "
            f"{num_new} tokens (prefill the whole prompt in one forward, or use static=False)"
        )
    if attn_kwargs is None:
        raise ValueError(f"unsupported model for {name} (static=True): its attention passes no kwargs")
    if pending:
        raise RuntimeError(NOT_ROUTED.format(name=name))


def lowest_priority_slot(priority: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Index of the slot to overwrite, ``[batch, heads]``: the lowest priority, ties to the latest position.

    The dynamic layout ranks slots in position order with a stable sort (an earlier slot wins a tie), so among
    equal priorities the one it drops is the latest; the ring order of static slots must not change that.

    Args:
        priority: ``[batch, heads, capacity]`` (free slots must already be lowest).
        positions: ``[batch, heads, capacity]``.
    """
    lowest = priority.min(dim=-1, keepdim=True).values
    candidates = torch.where(priority == lowest, positions.long(), torch.full_like(positions, -2, dtype=torch.long))
    return candidates.argmax(dim=-1)


class StaticSlots:
    """Mixin placed before a :class:`~hf_longmem.cache_classes.base.CompressedLayer` subclass (see module doc).

    Subclasses define :meth:`capacity` and :meth:`slot_priority`; ``evicts`` says whether a full layer may
    overwrite a kept slot (``False``: SnapKV's appended tokens; exceeding the capacity then raises).
    """

    is_compileable = True
    #: Built on sliding-window layers as the dynamic layer is, so that :func:`check_static_layers` refuses them
    #: with its own message.
    supports_sliding_window = True
    #: Whether the layer compresses in ``update`` (freeze there) or in the attention call (scored layers).
    freezes_in_update = True
    evicts = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._frozen = False
        self._static_pending = False

    # ----------------------------------------------------------------------------------------------- interface
    def capacity(self, stored: int) -> int:
        """Slots of the frozen buffers, given the ``stored`` slots after the prefill."""
        raise NotImplementedError

    def slot_priority(self, positions: torch.Tensor) -> torch.Tensor:
        """``[batch, 1 or heads, capacity]`` int64 or float keep-priority of the slots before a step writes.

        ``positions`` ``[batch, heads, capacity]``. Free slots are ranked lowest by the caller.
        """
        raise NotImplementedError

    def before_write(self, slot: torch.Tensor) -> None:
        """Reads the slots ``[batch, heads, 1]`` a step is about to overwrite (D2O merges the evicted KV)."""

    def on_write(self, slot: torch.Tensor) -> None:
        """Resets per-slot state of the slots ``[batch, heads, 1]`` a step overwrites (H2O's scores)."""

    def after_attention(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, call: tuple) -> None:
        """Reads this step's attention (H2O accumulates scores).

        Args:
            query: ``[batch, q_heads, 1, head_dim]``; key: ``[batch, kv_heads, capacity, head_dim]`` (attended).
            valid: ``[batch, 1, 1, capacity]`` bool, the slots attended.
            call: ``(module, scaling, dropout, kwargs)`` of the attention call.
        """

    def freeze_state(self, stored: int, capacity: int) -> None:
        """Moves per-slot state other than keys/values/positions into ``capacity`` slots."""

    # --------------------------------------------------------------------------------------------- freezing
    def freeze(self) -> None:
        """Moves the stored state into fixed buffers (eager, once, after the prefill)."""
        if self.sliding_window is not None:
            raise ValueError(
                f"{type(self).__name__} (static=True) supports full-attention layers only; this model's layers use "
                "a sliding window"
            )
        keys, values, positions = self.keys, self.values, self.positions
        batch, heads, stored, _ = keys.shape
        capacity = self.capacity(stored)
        if capacity < stored + 1:
            raise ValueError(f"static capacity {capacity} leaves no slot to decode into ({stored} stored)")
        new_keys = keys.new_zeros(batch, heads, capacity, keys.shape[-1])
        new_values = values.new_zeros(batch, values.shape[1], capacity, values.shape[-1])
        new_positions = positions.new_full((batch, heads, capacity), PAD_POSITION)
        new_keys[:, :, :stored] = keys
        new_values[:, :, :stored] = values
        new_positions[:, :, :stored] = positions
        self.freeze_state(stored, capacity)
        self._append_buffers.clear()
        self.store(new_keys, new_values, new_positions, no_pads=False)
        finish_freeze(self, (self.keys, self.values, self._positions))

    def next_slot(self, positions: torch.Tensor) -> torch.Tensor:
        """``[batch, heads, 1]``: the slot the next token goes to, a free one first, else the lowest priority."""
        priority = self.slot_priority(positions).expand_as(positions)
        low = torch.finfo(priority.dtype).min if priority.is_floating_point() else PAD_POSITION - 1
        return lowest_priority_slot(priority.masked_fill(positions == PAD_POSITION, low), positions)[..., None]

    # ------------------------------------------------------------------------------------------- contract
    def thaw(self) -> None:
        """Back to the dynamic layout (eager; before a multi-token step: a new turn, a prefill chunk).

        First the eviction the next decode step would make (the slot the dynamic layout dropped after the previous
        step), then the slots in position order with pads first, less the columns that are free in every row.
        """
        positions = self._positions.clone()
        if self.evicts:
            positions.scatter_(2, self.next_slot(positions), PAD_POSITION)
        order = positions.sort(dim=-1, stable=True).indices  # PAD_POSITION (-1) first, then by position
        common = int((positions == PAD_POSITION).sum(-1).min())
        order = order[..., common:]
        for name in self.slot_state:
            if getattr(self, name) is not None:  # D2O's layers that keep every token keep no scores
                setattr(self, name, getattr(self, name).gather(2, order))
        keys, values, positions = gather_slots(self.keys, self.values, positions, order)
        self.store(keys, values, positions)
        self.real_seen = self.real_seen.clone()
        self.cumulative_length = int(self.cumulative_length)
        self._frozen = False

    def update(self, key_states, value_states, *args, **kwargs):
        if self._frozen and key_states.shape[-2] > 1:
            self.thaw()
        if not self._frozen:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            if self.freezes_in_update:
                self.freeze()
            return keys, values
        return self.static_update(key_states, value_states, kwargs.get("kwargs"))

    def static_update(self, key_states: torch.Tensor, value_states: torch.Tensor, attn_kwargs: dict | None):
        """Writes one new token ``[batch, kv_heads, 1, head_dim]`` into its slot; returns the whole buffers."""
        name = type(self).__name__
        check_static_step(self, None, attn_kwargs, self._static_pending)
        batch, heads, _, head_dim = key_states.shape
        positions = self._positions
        if not self.evicts:
            torch._assert_async(
                (positions == PAD_POSITION).any(dim=-1).all(),
                f"{name} (static=True): capacity exceeded, more tokens generated than max_new_tokens",
            )
        slot = self.next_slot(positions)  # [b, h, 1]
        self.before_write(slot)
        self.keys.scatter_(2, slot[..., None].expand(-1, -1, 1, head_dim), key_states)
        self.values.scatter_(2, slot[..., None].expand(-1, -1, 1, value_states.shape[-1]), value_states)
        new_position = self.real_seen.to(positions.dtype)[:, None, None].expand(batch, heads, 1)
        positions.scatter_(2, slot, new_position)
        self.on_write(slot)
        self.real_seen.add_(1)
        self.cumulative_length.add_(1)
        attn_kwargs[LAYER_KWARG] = self
        self._static_pending = True
        return self.attention_keys(self.keys), self.values

    def attention_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """The keys the step attends to (re-rotated by position-shift layers)."""
        return keys

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if not self._frozen:
            output = super().attend(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
            if not self.freezes_in_update:
                self.freeze()
            return output
        self._static_pending = False
        implementation = module.config._attn_implementation
        valid = (self._positions[:, :1] != PAD_POSITION)[:, :, None, :]  # [b, 1, 1, capacity]
        if implementation == EAGER_ATTENTION_NAME:
            mask = torch.zeros_like(valid, dtype=query.dtype).masked_fill(~valid, torch.finfo(query.dtype).min)
        else:
            mask = valid
        output = fallback_attention(module, implementation)(
            module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs
        )
        self.after_attention(query, key, valid, (module, scaling, dropout, kwargs))
        return output

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self._frozen and query_length > 1:  # transformers sizes the mask of a new turn before the update
            self.thaw()
        if not self._frozen:
            return super().get_mask_sizes(query_length)
        # unused by this layer (it masks its own slots); sized so transformers' mask matches the K/V length
        return self.keys.shape[-2], 0

    def get_max_length(self) -> int:
        return self.keys.shape[-2] if self._frozen else -1

    def reset(self) -> None:
        super().reset()
        self._frozen = False
        self._static_pending = False


class AppendSlots(StaticSlots):
    """Static layout of a method that compresses the prompt, then appends every generated token (SnapKV, PyramidKV,
    KVMerger): the compressed prompt plus ``max_new_tokens`` slots, filled in place; nothing is evicted, and
    generating more than ``max_new_tokens`` raises."""

    freezes_in_update = False  # these methods compress in the attention call
    evicts = False

    def __init__(self, *args, max_new_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_new_tokens = max_new_tokens

    def capacity(self, stored: int) -> int:
        return stored + self.max_new_tokens

    def slot_priority(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.full_like(positions[:, :1], KEEP, dtype=torch.long)


def append_static_options(static, max_new_tokens) -> bool:
    """Validates ``static`` / ``max_new_tokens`` of an :class:`AppendSlots` method; returns ``static``."""
    static = check_choice("static", static, (False, True))
    max_new_tokens = check_optional_int("max_new_tokens", max_new_tokens, low=1)
    if static and max_new_tokens is None:
        raise ValueError("static=True needs `max_new_tokens` (the slots reserved for generated tokens)")
    if not static and max_new_tokens is not None:
        raise ValueError("`max_new_tokens` sizes the static layout: pass static=True with it, or leave it out")
    return static


def check_static_layers(cache, static: bool, layer_cls: type = StaticSlots) -> None:
    """Raises ``ValueError`` when ``static=True`` but some layer of ``cache`` is not a static one (a hybrid model's
    sliding-window layers stay transformers' dynamic layers) or replaces a sliding-window layer (all-sliding models:
    the slot mask applies no window)."""
    if not static:
        return
    others = sorted({type(layer).__name__ for layer in cache.layers if not isinstance(layer, layer_cls)})
    if others:
        raise ValueError(
            f"static=True needs every attention layer to be a static hf_longmem layer; this model keeps {others} "
            "(sliding-window layers of a hybrid model): use static=False"
        )
    if any(getattr(layer, "sliding_window", None) is not None for layer in cache.layers):
        raise ValueError(
            "static=True supports full-attention layers only; this model's layers use a sliding window smaller "
            "than the budget would need (use static=False)"
        )
