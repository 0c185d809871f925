"""Shared machinery of the hf_longmem caches.

Every compressing method is a :class:`CompressedLayer` subclass inside a :class:`LongMemCache`. The layer keeps the
transformers 5.x cache contract for caches that hold fewer tokens than they have seen:

* ``get_seq_length()`` is the number of tokens SEEN (pads included, as the attention mask counts them); the stored
  length may be smaller. ``get_mask_sizes(q)`` returns ``(stored + q, seen - stored)``: the stored tokens play the
  role of the last ``stored`` columns of the 2-D attention mask.
* ``update()`` returns the K/V this step attends to (everything stored plus the new tokens, so a step is exact) and
  then compresses only what it stores. RoPE positions stay the true ones (``generate`` derives them from the
  attention mask, not from the cache size) unless a method re-rotates on purpose.
* Left padding is handled row by row: a row never keeps a pad in place of a real token. A row that has fewer real
  tokens than the stored length keeps its last ``stored`` columns unchanged (pads included, and the mask hides
  them); a row with more real tokens is compressed among its real tokens only, so every stored slot of it is real.
  Either way slot ``j`` lines up with mask column ``seen - stored + j``, so HF's own mask stays correct and a row of
  a padded batch gives what the row alone gives.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from hf_longmem.attention import EAGER_ATTENTION_NAME, LAYER_KWARG, fallback_attention
from hf_longmem.memory.accounting import (
    RESIDENT,
    CacheMemoryReport,
    MemoryParts,
    MemoryReport,
    memory_bytes_of,
    tensor_bytes,
)
from hf_longmem.memory.masks import slot_mask
from hf_longmem.memory.padding import PAD_POSITION, advance_seen, slot_positions, tail_positions, zero_seen
from hf_longmem.memory.step_inputs import AttentionHandoff, StepInputs

#: Spare slots allocated behind the stored states once a layer decodes without compressing (1/32 of the stored
#: length, within these bounds): appending then writes in place instead of copying everything stored (``torch.cat``
#: is O(stored) per step, the write O(new)), and a reallocation every ``n / 32`` steps keeps the copies amortised.
APPEND_HEADROOM = (8, 256)


class CompressedLayer(MemoryReport, CacheLayerMixin):
    """One attention layer of a cache that may hold fewer tokens than it has seen.

    Stored state (all per row, so beam search and batch selection keep them aligned):

    * ``keys``/``values``: ``[batch, kv_heads, stored, head_dim]``;
    * ``positions``: ``[batch, kv_heads, stored]`` int32 true position of each slot, ``PAD_POSITION`` for a pad slot
      (per head, since methods may keep different tokens per KV head);
    * ``real_seen``: ``[batch]`` number of real (non-pad) tokens each row has seen.

    Subclasses implement :meth:`select` (which slots to keep) or override :meth:`compress` entirely.
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False
    #: Per-batch tensors that beam search / batch selection must reorder (subclasses extend the tuple).
    batch_state: tuple[str, ...] = ("keys", "values", "positions", "real_seen")
    #: Extra per-slot tensors ``[batch, kv_heads, n]`` that :meth:`compress` gathers along with the keys.
    slot_state: tuple[str, ...] = ()
    #: Decoding appends into spare capacity (:meth:`append_slots`): ``None`` = on CUDA only. On CPU it measured
    #: neutral (SnapKV 1.01x, ThinK 0.99x decode at 2k context): CPU SDPA/matmul copy the strided views back to
    #: contiguous memory, which costs what the saved ``torch.cat`` did.
    append_in_place: bool | None = None

    def __init__(self):
        super().__init__()
        self.cumulative_length = 0  # tokens seen, pads included (name shared with transformers' reset())
        self.positions: torch.Tensor | None = None
        self.real_seen: torch.Tensor | None = None
        # name -> (buffer, the prefix view of it that is stored under that name)
        self._append_buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._steady_appends = 0  # steps in a row that appended without compressing
        #: The model's attention window when this layer replaces a sliding-window layer (``None``: full attention).
        self.sliding_window: int | None = None
        self._attend_positions: torch.Tensor | None = None  # [b, h, n] of the K/V handed to the pending attention
        # during update(): whether the slots handed to compress() hold no pad (None: unknown), and whether its
        # result holds none (set by a compress() that knows; None: rescanned on demand)
        self._step_no_pads: bool | None = None
        self._kept_no_pads: bool | None = None

    # ``positions`` is materialised on read. Decoding steps of a layer that only appends (see :meth:`appends_only`)
    # record the new tokens' positions as a count from ``_tail_start`` (each row's first one, ``[batch]``): their
    # positions are consecutive and real, so nothing per step is needed until something reads them.
    # Also kept: whether any stored slot is a pad, across steps that only append real tokens, so that the decoding
    # hot path needs no O(n) scan and device sync per layer. Assigning ``positions`` forgets it (rescanned on demand).
    @property
    def positions(self) -> torch.Tensor | None:
        if self._tail_count:
            count, start = self._tail_count, self._tail_start
            self._tail_count, self._tail_start = 0, None
            tail = tail_positions(start, count, self._positions.shape[1])  # [b, h, count], once per forward
            self._positions = torch.cat((self._positions, tail), dim=-1)
        return self._positions

    @positions.setter
    def positions(self, value: torch.Tensor | None) -> None:
        self._positions = value
        self._tail_count, self._tail_start = 0, None
        self._no_pads: bool | None = None

    #: On a sliding-window layer, whether :meth:`compress` ranks the slots that left the window below all others
    #: (:meth:`windowed`). Off by default: a method with its own selection rule (StreamingLLM's sinks) keeps
    #: following it (what left the window stays hidden by :meth:`attend`'s mask), the same with or without pads.
    ranks_stale_last = False

    @property
    def supports_sliding_window(self) -> bool:
        """Whether the layer can stand in for a sliding-window attention layer (:func:`build_layers`).

        It must apply the window itself (:meth:`own_mask`): the model's sliding mask works on columns, not on the
        positions the kept slots hold. A layer that does not take the attention call itself gets :meth:`attend`,
        which does; one that computes attention its own way must say so (:class:`SlidingWindowScoring`).
        """
        return type(self).attend is CompressedLayer.attend

    def appends_only(self) -> bool:
        """Whether :meth:`update` never compresses nor re-rotates (compression deferred to the attention call).

        Such a layer keeps decoding positions lazily; a layer that returns ``True`` must read ``self.positions``
        (not ``self._positions``) wherever it needs them.
        """
        return False

    def has_pad_slots(self) -> bool:
        """Whether any stored slot (of any row and head) is a pad."""
        if self._no_pads is None:  # the lazy tail holds no pad: the materialised part decides
            self._no_pads = self._positions is None or not bool((self._positions == PAD_POSITION).any())
        return not self._no_pads

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, *, no_pads: bool | None = None):
        """Sets the stored state; ``no_pads`` is what is known about pads in ``positions`` (``None``: unknown).

        Storing the same ``positions`` object again keeps what was known about it.
        """
        if positions is self._positions and no_pads is None:
            no_pads = self._no_pads
        self.keys, self.values, self.positions = keys, values, positions
        self._no_pads = no_pads
        self._drop_stale_buffers()

    # ------------------------------------------------------------------------------------------------ appending
    def append_slots(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """``torch.cat((self.<name>, new), dim=2)``, written in place into spare capacity when the layer has some.

        A layer that keeps appending without compressing (decoding with SnapKV, ThinK's tail, the retrieval heads of
        DuoAttention, ...) gets a buffer with spare slots (:data:`APPEND_HEADROOM`) on the sequence axis; the stored
        tensor is then a prefix view of it and the next appends only write the new slots. Nothing else references
        the spare slots, and a compressed (gathered) tensor simply stops using the buffer.

        Args:
            name: the stored tensor's attribute (``"keys"``, ``"values"``, ``"positions"``, ...), ``[batch, heads, n, ...]``.
            new: ``[batch, heads, q, ...]`` slots to append.

        Returns:
            ``[batch, heads, n + q, ...]`` (not assigned: the caller stores it).
        """
        current = getattr(self, name)
        n, q = current.shape[2], new.shape[2]
        entry = self._append_buffers.get(name)
        if entry is not None and entry[1] is current and n + q <= entry[0].shape[2]:
            # the stored tensor is the prefix view handed out last time: nothing else sees the spare slots
            buffer = entry[0]
            buffer.narrow(2, n, q).copy_(new)
        else:
            tracked = torch.is_grad_enabled() and (current.requires_grad or new.requires_grad)
            enabled = current.is_cuda if self.append_in_place is None else self.append_in_place
            # compressing every step (H2O, ...), autograd, or switched off: a plain cat
            if not enabled or self._steady_appends < 2 or tracked:
                self._append_buffers.pop(name, None)
                return torch.cat((current, new), dim=2)
            headroom = min(max(APPEND_HEADROOM[0], (n + q) // 32), APPEND_HEADROOM[1])
            buffer = current.new_empty(*current.shape[:2], n + q + headroom, *current.shape[3:])
            buffer.narrow(2, 0, n).copy_(current)
            buffer.narrow(2, n, q).copy_(new)
        view = buffer.narrow(2, 0, n + q)
        self._append_buffers[name] = (buffer, view)
        return view

    def _drop_stale_buffers(self) -> None:
        """Forgets the append buffers whose stored tensor was replaced (compressed, reordered, reset)."""
        for name, (_, view) in list(self._append_buffers.items()):
            if getattr(self, name, None) is not view:
                del self._append_buffers[name]

    # ----------------------------------------------------------------------------------------------- contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.ndim != 4 or value_states.ndim != 4 or key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(
                f"unsupported cache layout: {type(self).__name__} stores per-head keys and values "
                f"[batch, kv_heads, n, head_dim], this model caches {tuple(key_states.shape)} / "
                f"{tuple(value_states.shape)} (latent or fused attention caches are not supported)"
            )
        batch, heads, _, head_dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states.new_zeros(batch, heads, 0, head_dim)
        self.values = value_states.new_zeros(batch, value_states.shape[1], 0, value_states.shape[-1])
        self.positions = torch.zeros(batch, heads, 0, dtype=torch.int32, device=self.device)
        self.real_seen = zero_seen(batch, self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends ``[batch, kv_heads, q, head_dim]`` states, returns what this step attends to, then compresses."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, num_new, _ = key_states.shape
        attn_kwargs = kwargs.get("kwargs") or {}
        real_before = self.real_seen
        new_positions, new_pads, self.real_seen = advance_seen(
            attn_kwargs.get("position_ids"), real_before, num_new, batch
        )
        self.cumulative_length += num_new

        # a sliding-window layer without an attention path of its own: the attention call comes to attend()
        routed = self.sliding_window is not None and type(self).attend is CompressedLayer.attend
        if routed:
            self._route_attention(kwargs.get("kwargs"))
        if num_new == 1 and not new_pads and self._positions is not None and self.appends_only() and not routed:
            # decoding a real token into a layer that does not compress here: position = the row's count, kept lazily
            self.keys = self.append_slots("keys", key_states)
            self.values = self.append_slots("values", value_states)
            if not self._tail_count:
                self._tail_start = real_before
            self._tail_count += 1
            self._steady_appends += 1
            return self.keys, self.values
        if num_new == 1 and not new_pads and self._no_pads and not routed:
            stepped = self.decode_step(key_states, value_states, real_before)
            if stepped is not None:
                return stepped

        keys_view = self.keys_for_attention(self.keys, self.positions, real_before)
        if keys_view is self.keys:
            attend_keys = all_keys = self.append_slots("keys", key_states)
        else:  # re-rotated keys for this step, the stored ones unchanged
            attend_keys = torch.cat((keys_view, key_states), dim=-2)
            all_keys = self.append_slots("keys", key_states)
        all_values = self.append_slots("values", value_states)
        new_positions = slot_positions(new_positions, key_states.shape[1])
        all_positions = self.append_slots("positions", new_positions)
        if routed:
            self._attend_positions = all_positions
        # what is known of pads in all_positions (None: unknown); compress() may say its result has none
        self._step_no_pads, self._kept_no_pads = (False if new_pads else self._no_pads), None
        stored = self.compress(all_keys, all_values, all_positions)
        unchanged = stored[2] is all_positions
        self._steady_appends = self._steady_appends + 1 if unchanged and stored[0] is all_keys else 0
        # appending real tokens to pad-free slots keeps them pad-free; anything compress() changed is rescanned
        no_pads = self._step_no_pads if unchanged else self._kept_no_pads
        self.store(*stored, no_pads=no_pads)
        return attend_keys, all_values

    def decode_step(
        self, key_states: torch.Tensor, value_states: torch.Tensor, real_before: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A layer's own fast path for one real token decoded into pad-free slots (``None``: take the general path).

        Called by :meth:`update` after the counts were advanced; returns what the step attends to, having stored what
        the general path would store. ``key_states``/``value_states`` ``[batch, kv_heads, 1, head_dim]``;
        ``real_before`` ``[batch]``, each row's new position.
        """
        return None

    def _route_attention(self, attn_kwargs: dict | None) -> None:
        """Puts this layer into the attention kwargs, so that :meth:`attend` applies the window on true positions."""
        if self._attend_positions is not None:
            raise ValueError(
                f"{type(self).__name__} replaces a sliding-window layer and must apply the window itself: switch the "
                "model to hf_longmem attention (hf_longmem.enable_longmem_attention(model); make_cache(name, model) "
                "does it)"
            )
        if attn_kwargs is None:
            raise ValueError(
                f"unsupported model: its attention passes no kwargs to Cache.update, so {type(self).__name__} cannot "
                "apply the sliding window to the tokens it keeps"
            )
        attn_kwargs[LAYER_KWARG] = self

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The model's attention (SDPA or eager) over this step's K/V with this layer's own sliding-window mask.

        query ``[batch, q_heads, q, head_dim]``; key/value ``[batch, kv_heads, n, head_dim]`` (what :meth:`update`
        returned). Returns what the model's attention function returns.
        """
        positions, self._attend_positions = self._attend_positions, None
        implementation = module.config._attn_implementation
        eager = implementation == EAGER_ATTENTION_NAME
        mask = slot_mask(positions, query.shape[-2], query.dtype if eager else None, self.sliding_window)
        if mask.shape[1] != query.shape[1]:
            mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)  # one row per query head
        return fallback_attention(module, implementation)(
            module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs
        )

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_stored_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.get_stored_length()
        return stored + query_length, self.cumulative_length - stored

    def get_max_length(self) -> int:
        return -1

    def memory_parts(self) -> MemoryParts:
        """``{"kv": ("resident", bytes)}``: keys, values and per-slot metadata (append buffers with their spare
        slots)."""
        held = (self._append_buffers.get(name, (getattr(self, name, None),))[0] for name in self.batch_state)
        return {"kv": (RESIDENT, tensor_bytes(*held))}

    # ------------------------------------------------------------------------------------------ compression
    def keys_for_attention(
        self, keys: torch.Tensor, positions: torch.Tensor, real_before: torch.Tensor
    ) -> torch.Tensor:
        """The stored keys as this step's queries should see them (identity unless a method re-rotates)."""
        return keys

    def compress(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chooses what to store after this step.

        Each row keeps its ``target`` highest-:meth:`priority` real slots (in position order). A row with no more
        real tokens than its target keeps them all. The stored length is the largest row's need; a row that keeps
        fewer real slots than that is filled on the left with pad slots (``PAD_POSITION``; only layers that build
        their own mask may return per-row targets, see :class:`~hf_longmem.cache_classes.scored.ScoredLayer`).

        Args:
            keys, values: ``[batch, kv_heads, n, head_dim]`` stored + new states.
            positions: ``[batch, kv_heads, n]`` true positions, ``PAD_POSITION`` for pads (pads are always left of
                reals, and the same in every head).

        Returns:
            The stored ``(keys, values, positions)``.
        """
        target = self.target_length(keys.shape[-2])
        if isinstance(target, int) and target >= keys.shape[-2]:
            return keys, values, positions
        if self.sliding_window is not None and self.ranks_stale_last:
            plan = keep_plan(
                positions, target, lambda: self.windowed(self.priority(keys, values, positions), positions)
            )
        else:
            plan = keep_plan(positions, target, lambda: self.priority(keys, values, positions))
        return self.apply_plan(plan, keys, values, positions)

    def apply_plan(self, plan, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        """Keeps the slots of a :func:`keep_plan` (``None``: everything) in ``keys``/``values``/``positions`` and
        in every :attr:`slot_state` tensor; filler slots become pads."""
        if plan is None:
            return keys, values, positions
        index, filler = plan
        for name in self.slot_state:
            setattr(self, name, getattr(self, name).gather(2, index))
        keys, values, positions = gather_slots(keys, values, positions, index)
        if filler is not None:
            positions = positions.masked_fill(filler, PAD_POSITION)
        return keys, values, positions

    def target_length(self, num_tokens: int) -> int | torch.Tensor:
        """Slots to keep out of ``num_tokens`` (stored + new): an int, or ``[batch]`` per-row targets."""
        raise NotImplementedError

    def priority(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keep-priority of every slot, ``[batch, 1 or kv_heads, n]`` (higher is kept first; ``inf`` = always).

        Pads are excluded by the caller. Ties go to the earlier slot; forced slots should use ``inf``.
        """
        raise NotImplementedError

    def windowed(self, priority: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``priority`` with the slots no later query can see (sliding window) ranked below every other real slot.

        Args:
            priority: ``[batch, 1 or kv_heads, n]``.
            positions: ``[batch, kv_heads, n]``.

        Returns:
            ``[batch, kv_heads, n]`` (``priority`` itself on a full-attention layer).
        """
        if self.sliding_window is None:
            return priority
        # the next query of a row is at its position real_seen: it sees keys at positions > real_seen - window
        stale = positions <= (self.real_seen - self.sliding_window)[:, None, None]
        return priority.expand_as(positions).masked_fill(stale, torch.finfo(priority.dtype).min)

    def drop_stale(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On a sliding-window layer: keeps ``window - 1`` slots per head, the ones later queries can still see
        first (at most ``window - 1`` can be: positions are distinct). ``[batch, kv_heads, n, ...]`` in and out."""
        plan = keep_plan(
            positions,
            self.sliding_window - 1,
            lambda: self.windowed(positions.new_zeros(positions.shape, dtype=torch.float32), positions),
        )
        return self.apply_plan(plan, keys, values, positions)

    def own_mask(self, num_new: int, additive_dtype: torch.dtype | None = None, query_heads: int | None = None):
        """This layer's attention mask from its slots (:func:`~hf_longmem.memory.masks.slot_mask`).

        On a sliding-window layer the window is applied to the true positions, per KV head (heads keep different
        tokens): ``[batch, kv_heads, q, n]``, repeated to ``query_heads`` when given (the model's attention expects
        one mask row per query head or a broadcast one). Else ``[batch, 1, q, n]``.
        """
        if self.sliding_window is None:
            return slot_mask(self.positions[:, 0], num_new, additive_dtype)
        mask = slot_mask(self.positions, num_new, additive_dtype, self.sliding_window)
        if query_heads is not None and query_heads != mask.shape[1]:
            mask = mask.repeat_interleave(query_heads // mask.shape[1], dim=1)
        return mask

    # ------------------------------------------------------------------------------------ batch operations
    def _map_batch_state(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        for name in self.batch_state:
            tensor = getattr(self, name, None)
            if isinstance(tensor, torch.Tensor):
                setattr(self, name, fn(tensor))
        self._drop_stale_buffers()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch_state(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.real_seen = None
        self.is_initialized = False
        self.cumulative_length = 0
        self._append_buffers.clear()
        self._steady_appends = 0
        self._attend_positions = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} drops tokens and cannot be cropped; copy the cache (copy.deepcopy) to roll back"
        )

    def offload(self):
        self._map_batch_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._map_batch_state(lambda t: t.to(self.device, non_blocking=True))


class SlidingWindowScoring:
    """Mixin (before :class:`~hf_longmem.cache_classes.scored.ScoredLayer`) for scored layers that may replace a
    sliding-window layer: their own mask (attention and scoring) hides what the model's sliding mask hides, on true
    positions. Scoring then runs the torch reference (the Triton kernels know no window)."""

    supports_sliding_window = True
    ranks_stale_last = True  # scores rank every slot anyway: a token no query can see again goes first

    def mask_for_this_layer(
        self, query: torch.Tensor, key: torch.Tensor, eager: bool, sliding_window: int | None = None
    ):
        """The model's window (``sliding_window``, from the attention call) on full-attention layers; this layer's own
        window, per KV head, where it replaces a sliding-window layer."""
        if self.sliding_window is None:
            return super().mask_for_this_layer(query, key, eager, sliding_window)
        return self.own_mask(query.shape[-2], query.dtype if eager else None, query.shape[1])

    def scoring_mask(self, attention_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
        """The mask scores are computed with: ``attention_mask`` (``[batch, 1, q, n]``) on full attention, else the
        windowed per-head mask ``[batch, kv_heads, q, n]``."""
        return attention_mask if self.sliding_window is None else self.own_mask(num_queries)


def keep_plan(
    positions: torch.Tensor, target: int | torch.Tensor, priority_fn: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Which slots each row keeps (see :meth:`CompressedLayer.compress`).

    Args:
        positions: ``[batch, kv_heads, n]``, ``PAD_POSITION`` for pads (left of the reals, same in every head).
        target: slots to keep, an int or ``[batch]`` per-row targets.
        priority_fn: returns ``[batch, 1 or kv_heads, n]`` keep-priorities (only called if some row evicts).

    Returns:
        ``None`` if no row evicts, else ``(index [batch, kv_heads, stored] ascending, filler mask or None)``.
    """
    batch, heads, n = positions.shape
    device = positions.device
    real = (positions[:, 0] != PAD_POSITION).sum(-1)  # [b]
    targets = torch.as_tensor(target, device=device).clamp(max=n).expand(batch)
    evicting = real > targets
    if not bool(evicting.any()):
        return None
    stored = int(torch.where(evicting, targets, real).max())
    # Rows that keep everything keep their last `stored` columns: reals are right-aligned, the rest are pads.
    tail = torch.arange(n - stored, n, device=device).expand(batch, heads, stored)
    priority = priority_fn().expand(batch, heads, n).masked_fill(positions == PAD_POSITION, float("-inf"))
    # best first; equal priorities (max-pooled plateaus, ...) in slot order, so a row ranks its real slots the same
    # with or without pads in front (topk breaks ties by index arbitrarily)
    ranked = priority.sort(dim=-1, descending=True, stable=True).indices[..., :stored]  # [b, h, stored]
    keep = torch.arange(stored, device=device) < targets[:, None, None]
    # Fillers (rank beyond the row's target) sort first and become pad slots.
    index = torch.where(keep, ranked, -1).sort(dim=-1).values
    filler = (index < 0) & evicting[:, None, None]
    index = torch.where(evicting[:, None, None], index.clamp(min=0), tail)
    return index, (filler if bool(filler.any()) else None)


def gather_slots(
    keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keeps the slots ``index``: ``[batch, S]`` (the same slots in every head) or ``[batch, kv_heads, S]``.

    Args:
        keys, values: ``[batch, kv_heads, n, head_dim]``.
        positions: ``[batch, kv_heads, n]``.

    Returns:
        ``keys``/``values`` ``[batch, kv_heads, S, head_dim]`` and ``positions`` ``[batch, kv_heads, S]``.
    """
    batch, heads = keys.shape[:2]
    if index.ndim == 2:
        index = index[:, None, :].expand(batch, heads, -1)
    key_index = index[..., None].expand(-1, -1, -1, keys.shape[-1])
    same = values.shape[-1] == keys.shape[-1]
    value_index = key_index if same else index[..., None].expand(-1, -1, -1, values.shape[-1])
    return keys.gather(2, key_index), values.gather(2, value_index), positions.gather(2, index)


class LongMemCache(CacheMemoryReport, Cache):
    """A transformers ``Cache`` whose attention layers are hf_longmem layers.

    Args:
        layer_factory: ``layer_factory(layer_idx)`` builds the compressed layer of one full-attention layer.
        config: the model config. With it, layers are laid out from ``config.layer_types`` (:func:`build_layers`):
            full-attention layers are compressed; on hybrid models (Gemma-2/3, GPT-OSS, EXAONE-4, ...) sliding-window
            layers stay transformers' sliding layers (bounded by the window already); on models whose layers are all
            sliding (Mistral-7B-v0.1), a ``budget`` below the window compresses them too, for the methods that
            support it (``compresses_sliding_layers``; the others are refused on such a model). Multi-head latent attention and ALiBi are
            refused.
            Without it, layers are created on first use and every layer is compressed.

    Position ids: most models pass them to ``update``; for those that do not (GPT-NeoX, Falcon, StableLM, ...),
    :attr:`step_inputs` carries them from a hook :func:`hf_longmem.make_cache` installs on the model; a cache used
    on such a model without the hook refuses batches of several rows, whose padding it cannot see.
    """

    #: Whether the layers of this method replace sliding-window layers of all-sliding models (:func:`build_layers`):
    #: ``None`` asks a layer (``supports_sliding_window``; the factory must then have no side effects), ``False``
    #: keeps transformers' layers.
    compresses_sliding_layers: bool | None = None

    @property
    def generate_kwargs(self) -> dict:
        """Arguments ``generate`` needs with this cache: ``model.generate(ids, cache=cache, **cache.generate_kwargs)``
        (none for most methods; EM-LLM's prefill in execution blocks). A cache never changes the model's
        ``generation_config`` itself."""
        return {}

    def __init__(self, layer_factory: Callable[[int], CacheLayerMixin], config=None):
        if config is None:
            super().__init__(layer_class_to_replicate=_CountingFactory(layer_factory))
        else:
            # subclasses set `budget` before calling us: it decides whether sliding layers are compressed too
            budget = getattr(self, "budget", None)
            budget = budget if isinstance(budget, int) and not isinstance(budget, bool) else None
            layers = build_layers(
                layer_factory, config, budget, sliding=self.compresses_sliding_layers, method=type(self).__name__
            )
            super().__init__(layers=layers)
        #: The decoder's position ids / mask of the latest forward, when a model hook provides them
        #: (:func:`~hf_longmem.memory.step_inputs.track_step_inputs`); ``None`` without the hook.
        self.step_inputs: StepInputs | None = None
        self.handoff = AttentionHandoff()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``Cache.update``, giving our layers the position ids the model's attention did not pass on.

        Models that pass ``kwargs=`` with ``position_ids`` (Llama and most others) go straight to the layer. Where
        the attention passes no kwargs (GPT-NeoX, Falcon) or keeps ``position_ids`` as a named parameter (StableLM),
        they come from :attr:`step_inputs`; with neither, a batch of several rows is refused (its padding is unknown).
        """
        attn_kwargs = kwargs.get("kwargs")
        if attn_kwargs is not None and "position_ids" in attn_kwargs:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        layer = self.layers[layer_idx]
        if not _reads_positions(layer):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        step = self.step_inputs
        if step is not None and step.seen != getattr(layer, "cumulative_length", step.seen):
            step = None  # recorded for an earlier forward: this one ran without the hook
        if step is None and key_states.shape[0] > 1:
            raise ValueError(
                "unsupported model for a batch without a model hook: its attention does not pass `position_ids` "
                "to Cache.update, so this cache cannot tell left padding from tokens. Build the cache with "
                "hf_longmem.make_cache(name, model, ...) (it watches the model's inputs), or call "
                "hf_longmem.memory.step_inputs.track_step_inputs(model) once, or generate one row at a time"
            )
        position_ids = None if step is None else step.position_ids_for(key_states.shape[-2])  # None: no pads
        if attn_kwargs is None:  # no kwargs at all (GPT-NeoX, Falcon): the layer gets a dict of its own
            own = {} if position_ids is None else {"position_ids": position_ids}
            keys, values = super().update(key_states, value_states, layer_idx, *args, **{**kwargs, "kwargs": own})
            taker = own.get(LAYER_KWARG)
            if taker is not None:  # the layer asks for the attention call: hand it over through the pre-hook
                if not self.handoff.armed:
                    raise ValueError(
                        f"{type(taker).__name__} cannot see the queries: this model's attention passes no kwargs to "
                        "Cache.update, and either hf_longmem attention is off (hf_longmem.enable_longmem_attention"
                        "(model); make_cache(name, model) does it) or the attention takes no extra kwargs "
                        "(unsupported model: use a method that needs no attention scores, e.g. 'streaming')"
                    )
                self.handoff.layer = taker
            return keys, values
        if position_ids is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        # position_ids is a named parameter of the attention (StableLM): lend it to the layer, then take it back so
        # the attention call does not get it twice
        attn_kwargs["position_ids"] = position_ids
        try:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        finally:
            attn_kwargs.pop("position_ids", None)

    def get_stored_length(self, layer_idx: int = 0) -> int:
        """Tokens stored (not seen) in ``layer_idx``."""
        if layer_idx >= len(self.layers):
            return 0
        layer = self.layers[layer_idx]
        if hasattr(layer, "get_stored_length"):
            return layer.get_stored_length()
        return 0 if layer.keys is None or not layer.is_initialized else layer.keys.shape[-2]


def _reads_positions(layer) -> bool:
    """Whether ``layer`` tells pads from tokens by position ids (ours do; transformers' own layers do not care)."""
    return not type(layer).__module__.startswith("transformers.")


class _CountingFactory:
    """Adapts ``layer_factory(layer_idx)`` to transformers' argument-less ``layer_class_to_replicate``."""

    def __init__(self, layer_factory: Callable[[int], CacheLayerMixin]):
        self.layer_factory = layer_factory
        self.count = 0

    def __call__(self) -> CacheLayerMixin:
        layer = self.layer_factory(self.count)
        self.count += 1
        return layer


def build_layers(
    layer_factory: Callable[[int], CacheLayerMixin],
    config,
    budget: int | None = None,
    sliding: bool | None = False,
    method: str = "this method",
) -> list[CacheLayerMixin]:
    """One layer per decoder layer of ``config``.

    * Full-attention layers: ``layer_factory(i)``.
    * Sliding-window layers of a model whose layers are ALL sliding (Mistral-7B-v0.1, Qwen2 with
      ``use_sliding_window``, Phi-3-small...): ``layer_factory(i)`` too when ``budget`` is below what transformers'
      sliding layer holds (``window - 1`` tokens) and the method supports it (``sliding``: ``True``, or ``None`` to
      ask the layer's ``supports_sliding_window``): StreamingLLM, SnapKV, PyramidKV, H2O. The layer then keeps at
      most ``budget`` tokens by the method's rule (scored methods rank the tokens that left the window below all
      others; SnapKV's appended generated tokens stop at ``window - 1``), and its own mask hides what left the
      window from the queries, exactly as the model's sliding mask does, on true positions (:meth:`CompressedLayer.
      own_mask`, :meth:`CompressedLayer.attend`; the model must run hf_longmem attention, which ``make_cache``
      switches on). A method that does not support it is refused (``ValueError``): its budget would not apply. At
      a budget of ``window - 1`` or more, transformers' layer holds no more than the method would and is kept.
    * Sliding-window layers of a hybrid model (Gemma-2/3, GPT-OSS, EXAONE-4, ...: sliding and full layers): they
      stay transformers' sliding layers (bounded by the window already); only the full layers are compressed.

    Raises:
        ValueError: for a layer that is neither full nor sliding-window attention (chunked, linear, ...), or a
            multi-head latent attention model (see :func:`check_cache_layout`).
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    check_cache_layout(text_config)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    all_sliding = bool(layer_types) and all(t == "sliding_attention" for t in layer_types)
    layers: list[CacheLayerMixin] = []
    unsupported, sliding_window = False, None
    for layer_idx, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        if layer_type == "full_attention":
            layers.append(layer_factory(layer_idx))
        elif layer_type == "sliding_attention":
            window = kwargs.get("sliding_window")
            # an unknown budget (a method sized by other options) may be below the window: it must compress or refuse
            compress_sliding = all_sliding and isinstance(window, int) and (budget is None or budget < window - 1)
            layer = layer_factory(layer_idx) if compress_sliding and sliding is not False else None
            if layer is not None and not getattr(layer, "supports_sliding_window", False):
                if sliding:
                    raise TypeError(f"{type(layer).__name__} cannot replace a sliding-window layer")
                layer = None
            if layer is None:
                layers.append(DynamicSlidingWindowLayer(**kwargs))
                unsupported = unsupported or compress_sliding
                sliding_window = window
                continue
            layer.sliding_window = window
            layer.kernel_backend = "torch"  # the Triton scoring / decoding kernels apply no window
            layers.append(layer)
        else:
            raise ValueError(
                f"unsupported model: hf_longmem caches handle full and sliding-window attention layers, "
                f"this config has a {layer_type!r} layer"
            )
    if unsupported:
        larger = f", or a budget of at least {sliding_window - 1} tokens" if budget is not None else ""
        raise ValueError(
            f"unsupported model: every layer of this model is sliding-window attention (window {sliding_window}) and "
            f"{method} does not compress sliding-window layers: it would hold what transformers' sliding-window cache "
            f"holds, not its budget. Use streaming, snapkv, pyramidkv or h2o on this model{larger}"
        )
    return layers


#: Config attributes of multi-head latent attention (DeepSeek-V2/V3, Kimi...): the cache holds a compressed latent
#: and a shared rotary key per token, not ``[batch, kv_heads, n, head_dim]`` keys and values.
MLA_CONFIG_KEYS = ("kv_lora_rank", "qk_rope_head_dim")


def check_cache_layout(config) -> None:
    """Raises ``ValueError`` when the model's cache does not hold per-head keys/values ``[batch, kv_heads, n, d]``,
    or its attention needs every token seen.

    ALiBi (Bloom, MPT, Falcon with ``alibi=True``) adds a bias the model sizes from the attention mask, not from the
    cache. Multi-head latent attention (``kv_lora_rank`` / ``qk_rope_head_dim`` in the config) caches latents whose
    channels are not per-head keys: evicting or merging their slots with per-head scores is not implemented.
    """
    model_type = getattr(config, "model_type", type(config).__name__)
    attn_config = getattr(config, "attn_config", None)
    if model_type == "bloom" or getattr(config, "alibi", False) is True or getattr(attn_config, "alibi", False) is True:
        raise ValueError(
            f"unsupported model: {model_type} uses ALiBi position biases, which the model builds from the full "
            "attention mask (every token seen), so they do not line up with a cache that holds fewer tokens"
        )
    mla = [key for key in MLA_CONFIG_KEYS if getattr(config, key, None)]
    if mla:
        raise ValueError(
            f"unsupported model: {getattr(config, 'model_type', type(config).__name__)} uses multi-head latent "
            f"attention (config {', '.join(mla)}): its cache holds latents, not per-head keys/values, and hf_longmem "
            "caches do not compress that layout"
        )


def _attention_modules(model) -> list:
    """The model's self-attention modules: modules with a ``layer_idx`` whose ``forward`` updates a cache."""
    found = []
    for module in model.modules():
        if getattr(module, "layer_idx", None) is None or getattr(module, "is_cross_attention", False):
            continue
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        if ".update(" in source:
            found.append((module, source))
    return found


#: ``key_states = key_states.repeat(...)`` after the cache update: the attention then sees other heads than the cache
#: holds (JetMoE's mixture of attention heads tiles the KV heads across the experts' query heads).
_KEYS_REARRANGED_AFTER_CACHE = re.compile(r"\.update\([\s\S]*key_states\s*=\s*key_states\.(repeat|expand|tile)\(")


def check_model_attention(model, needs_attention: bool) -> None:
    """Raises ``ValueError`` for attention our caches cannot serve exactly (checked before the cache is built).

    * Bidirectional self-attention (``is_causal=False``: a BERT-style model not set up as a decoder): every cache
      here keeps a causal past.
    * A relative position bias passed into the attention (``position_bias``, CPM-Ant): the model sizes it from the
      number of tokens seen, which a cache that drops tokens no longer holds.
    * For methods that read the attention (``needs_attention``): an attention function called more than once per
      cache update (DiffLlama's differential attention), or keys re-arranged after the cache (JetMoE).
    """
    name = getattr(model.config, "model_type", type(model).__name__)
    for module, source in _attention_modules(model):
        if getattr(module, "is_causal", True) is False:
            raise ValueError(
                f"unsupported model: {name}'s self-attention is bidirectional (is_causal=False); hf_longmem caches "
                "keep a causal past (for a BERT-style decoder, build it with is_decoder=True)"
            )
        if "position_bias" in inspect.signature(type(module).forward).parameters:
            raise ValueError(
                f"unsupported model: {name}'s attention adds a relative position bias sized from every token seen "
                "(position_bias), which does not line up with a cache that holds fewer tokens"
            )
        if not needs_attention:
            continue
        if source.count("attention_interface(") > 1:
            raise ValueError(
                f"unsupported model: {name} calls its attention function {source.count('attention_interface(')} "
                "times per cache update (differential attention); methods that read the attention scores need one"
            )
        if _KEYS_REARRANGED_AFTER_CACHE.search(source):
            raise ValueError(
                f"unsupported model: {name} re-arranges the cached keys before its attention (a mixture of attention "
                "heads over shared KV heads), so the scores would not be per cached head"
            )


def cache_memory_bytes(cache: Cache) -> int:
    """Bytes held by any transformers cache (ours report their own, others are summed from their tensors)."""
    return memory_bytes_of(cache)


def check_options(cls: type, options: dict) -> None:
    """Raises ``ValueError`` naming any option ``cls.__init__`` does not take."""
    params = inspect.signature(cls.__init__).parameters
    accepted = [name for name in params if name not in ("self", "args", "kwargs")]
    unknown = [name for name in options if name not in accepted]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; accepted: {accepted}")


__all__ = [
    "CompressedLayer",
    "LongMemCache",
    "build_layers",
    "cache_memory_bytes",
    "check_cache_layout",
    "check_options",
    "gather_slots",
]
