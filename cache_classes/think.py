"""ThinK (Xu et al., 2024): query-driven pruning of key channels, stacked on a token cache.

After the prefill has been compressed by the base token cache (SnapKV, PyramidKV, or none), each KV head ranks the
``head_dim`` channels of its kept keys by ``mean_t(Q_w[t, c]^2) * mean_s(K[s, c]^2)`` — proportional to the
squared Frobenius norm of the rank-1 term ``Q_w[:, c] K[:, c]^T`` of the attention logits — with ``Q_w`` the last
``window_size`` queries, and drops the ``key_channel_ratio`` share with the smallest scores. The kept channels are
**stored packed** (``[batch, kv_heads, tokens, head_dim - pruned]`` plus the channel indices), so the memory saving
is real, and attention computes ``q . k`` on the gathered query channels, still scaled by ``1/sqrt(head_dim)``.
Tokens that arrive after the pruning (generated tokens, later turns) are kept full width, as in the paper.

Deviations, on purpose:

* every prompt key is pruned, the observation window included (the official code keeps the last 32 keys full
  width; ``recent_size=32`` restores that). kvpress, reviewed by ThinK's first author, prunes all as well;
* per KV head (the squared queries of a GQA group are averaged), not per query head after ``repeat_kv`` (ThinK#4);
* unlike the official flash path and kvpress, pruned channels are never zero-filled back: nothing is re-expanded.

The attention over the packed prompt is computed here, so it applies the model's attention features itself (logit
softcap, attention sinks, sliding window, dropout in training; :mod:`hf_longmem.memory.attention_features`), as the
model's eager attention would on the same slots.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from hf_longmem.attention import LAYER_KWARG
from hf_longmem.kernels import channel_attention
from hf_longmem.memory.accounting import MemoryParts
from hf_longmem.memory.attention_features import AttentionFeatures
from hf_longmem.memory.masks import slot_mask
from hf_longmem.memory.padding import PAD_POSITION, tensor_version
from hf_longmem.registry import register_cache
from hf_longmem.validation import check_int, check_ratio

from .base import CompressedLayer, LongMemCache
from .scored import NEEDS_ATTENTION_MESSAGE
from .snapkv import PyramidKVCache, SnapKVCache
from .static import append_static_options, check_static_layers, check_static_step, finish_freeze

BASES = ("full", "snapkv", "pyramidkv")


def channel_scores(query_window: torch.Tensor, keys: torch.Tensor, query_real: torch.Tensor, key_real: torch.Tensor):
    """ThinK's channel importance per KV head.

    Args:
        query_window: ``[batch, q_heads, w, head_dim]`` the last queries.
        keys: ``[batch, kv_heads, n, head_dim]`` the kept keys.
        query_real: ``[batch, w]`` bool, False for pad queries.
        key_real: ``[batch, kv_heads, n]`` bool, False for pad slots.

    Returns:
        ``[batch, kv_heads, head_dim]`` float32 scores (higher = more important).
    """
    batch, q_heads, window, head_dim = query_window.shape
    kv_heads = keys.shape[1]
    q_weight = query_real.float()[:, None, :, None]
    q_sq = (query_window.float().square() * q_weight).sum(2) / q_weight.sum(2).clamp(min=1)  # [b, Hq, d]
    q_sq = q_sq.view(batch, kv_heads, q_heads // kv_heads, head_dim).mean(2)
    k_weight = key_real.float()[..., None]
    k_sq = (keys.float().square() * k_weight).sum(2) / k_weight.sum(2).clamp(min=1)  # [b, Hkv, d]
    return q_sq * k_sq


class ThinKLayer(CompressedLayer):
    """ThinK over an optional base token layer. Before pruning, the base layer (or this layer, keeping every token)
    holds the cache; after, ``pruned_*`` hold the packed prompt and ``keys``/``values`` the full-width later tokens."""

    batch_state = (*CompressedLayer.batch_state, "pruned_keys", "pruned_values", "pruned_positions", "channel_index")
    #: ``"triton"``: attention over the packed prompt with the Triton ``channel_attention`` kernel (CUDA, or CPU
    #: under ``TRITON_INTERPRET=1``); ``None``/``"torch"``: batched matmuls over the gathered query channels, the
    #: default because it measured faster end to end on an H200 (1B-shape bfloat16 model, 16k context, batch 1,
    #: ``benchmarks/gpu_check.py``: 22.8 ms per token vs 38.4 with the kernel).
    kernel_backend: str | None = None

    def __init__(self, base: CompressedLayer | None, key_channel_ratio: float, window_size: int, recent_size: int):
        super().__init__()
        self.base = base
        self._initial_base = base  # handed its tokens over at pruning (``base`` -> None); back on reset()
        self.key_channel_ratio, self.window_size, self.recent_size = key_channel_ratio, window_size, recent_size
        self.pruned_keys = self.pruned_values = self.pruned_positions = self.channel_index = None
        self._pending = False
        self._new_real: torch.Tensor | None = None
        self._packed_has_pads: bool | None = None
        # (channel_index, its version, q_heads, q, gather index): the query-channel index, built once per pruning
        self._channel_gather: tuple | None = None
        # name -> (packed tensor, its version, dtype, flat view); "zero" -> the logits' 0-d zero
        self._flat_views: dict = {}

    @property
    def is_pruned(self) -> bool:
        return self.pruned_keys is not None

    def reset(self) -> None:
        """Forget everything: the base layer, the packed prompt and its channel choice (``cache.reset()``)."""
        super().reset()
        self.base = self._initial_base
        if self.base is not None:
            self.base.reset()
        self.pruned_keys = self.pruned_values = self.pruned_positions = self.channel_index = None
        self._pending = False
        self._new_real = None
        self._packed_has_pads = None
        self._channel_gather = None
        self._flat_views = {}

    # ------------------------------------------------------------------------------------------------ update
    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending:
            raise RuntimeError(NEEDS_ATTENTION_MESSAGE.format(name=type(self).__name__))
        attn_kwargs = kwargs.get("kwargs")
        if attn_kwargs is None:
            raise RuntimeError(
                "ThinK: this model does not pass its attention kwargs to Cache.update (unsupported model)"
            )
        holder = self.base if (self.base is not None and not self.is_pruned) else None
        if holder is not None:
            keys, values = holder.update(key_states, value_states, *args, **kwargs)
        else:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
        # [b, q]: which new tokens are real, for the pruning of a prefill (a decoded token prunes nothing, and its
        # position stays lazy: see appends_only)
        num_new = key_states.shape[-2]
        if num_new == 1:
            self._new_real = None
        else:
            positions = (self if holder is None else holder).positions
            self._new_real = positions[:, 0, -num_new:] != PAD_POSITION
        attn_kwargs[LAYER_KWARG] = self  # take the attention call (the base layer gets it from us)
        self._pending = True
        return keys, values

    def target_length(self, num_tokens: int) -> int:
        return num_tokens  # ThinK drops channels, not tokens; the base layer drops tokens

    def appends_only(self) -> bool:
        # once pruned, a step appends full-width keys to the tail and nothing else: decoded positions are kept
        # lazily (the base class's tail), not concatenated at every step
        return self.is_pruned

    # ------------------------------------------------------------------------------------------------ attend
    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        self._pending = False
        if self.is_pruned:
            features = AttentionFeatures.of_call(module, query, scaling, dropout, kwargs)
            return self._attend_pruned(query, features), None
        if self.base is not None:
            output = self.base.attend(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
            keys, values, positions = self.base.keys, self.base.values, self.base.positions
        else:
            from hf_longmem.attention import fallback_attention

            output = fallback_attention(module, module.config._attn_implementation)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
            keys, values, positions = self.keys, self.values, self.positions
        if query.shape[-2] > 1:  # prefill: prune the (token-compressed) prompt
            self._prune(query, keys, values, positions)
        return output

    def _prune(self, query, keys, values, positions) -> None:
        window = min(self.window_size, query.shape[-2])
        head_dim = keys.shape[-1]
        d_keep = head_dim - int(head_dim * self.key_channel_ratio)
        recent = min(self.recent_size, keys.shape[-2])
        packed = keys.shape[-2] - recent
        scores = channel_scores(
            query[:, :, -window:],
            keys[..., :packed, :],
            self._new_real[:, -window:],
            positions[..., :packed] != PAD_POSITION,
        )
        index = scores.topk(d_keep, dim=-1).indices.sort(dim=-1).values  # [b, Hkv, d_keep]
        self.channel_index = index.to(torch.int16 if head_dim <= torch.iinfo(torch.int16).max else torch.int32)
        self.pruned_keys = (
            keys[..., :packed, :].gather(-1, index[:, :, None, :].expand(-1, -1, packed, -1)).contiguous()
        )
        self.pruned_values = values[..., :packed, :] if recent == 0 else values[..., :packed, :].clone()
        self.pruned_positions = positions[..., :packed] if recent == 0 else positions[..., :packed].clone()
        if self.base is not None:
            self.cumulative_length, self.real_seen = self.base.cumulative_length, self.base.real_seen
            self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True
            self.base.reset()  # its tokens are ours now: release its buffers (kept for reuse after reset())
            self.base = None
        # clone: a (possibly empty) view would keep the whole full-width prompt storage alive
        self.keys = keys[..., packed:, :].clone()
        self.values = values[..., packed:, :].clone()
        self.positions = positions[..., packed:].clone()

    def _attend_pruned(self, query: torch.Tensor, features: AttentionFeatures) -> torch.Tensor:
        """Attention over the packed prompt (gathered channels) and the full-width tail, one softmax.

        Applies the model's attention features as its eager attention does
        (:mod:`~hf_longmem.memory.attention_features`): scaling, logit softcap (before the mask), attention
        sinks (an extra softmax slot per query head), the sliding window (by true positions) and dropout in
        training. Batched matmuls, or Triton's
        ``channel_attention`` with ``kernel_backend="triton"`` (softcap in the kernel, sinks merged from its
        log-sum-exp; a window or dropout takes the torch path).

        Args:
            query: ``[batch, q_heads, q, head_dim]``, the last ``q`` slots of the tail.

        Returns:
            ``[batch, q, q_heads, dv]``.
        """
        if self.kernel_backend == "triton" and features.sliding_window is None and not features.dropout:
            out, lse = channel_attention(
                query,
                self.pruned_keys,
                self.channel_index,
                self.pruned_values,
                features.scaling,
                valid=self.pruned_positions != PAD_POSITION if self._packed_pads() else None,
                keys_full=self.keys,
                values_full=self.values,
                valid_full=self.positions != PAD_POSITION if self.has_pad_slots() else None,
                backend="triton",
                softcap=features.softcap,
            )
            out, _ = features.add_sinks(out, lse)
            return out.transpose(1, 2).contiguous()
        batch, q_heads, num_q, head_dim = query.shape
        kv_heads = self.keys.shape[1]
        group = q_heads // kv_heads
        rows = group * num_q  # a KV head's query group folded into the query axis: plain batched matmuls
        flat = batch * kv_heads  # logits and probabilities are [b * Hkv, rows, n]; [b, Hkv, rows, n] views mask them
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32  # promote_types(dtype, float32)
        q_full = query.to(dtype).reshape(flat, rows, head_dim)
        q_packed = self._query_channels(q_full)  # [b * Hkv, rows, d_keep]
        zero, scaling = self._zero(dtype, query.device), features.scaling  # logits scaled by baddbmm's alpha

        def scaled_logits(queries: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
            return features.cap(torch.baddbmm(zero, queries, keys_t, beta=0, alpha=scaling))

        logits_packed = scaled_logits(q_packed, self._flat_packed("keys", self.pruned_keys, dtype))
        logits_tail = scaled_logits(q_full, self.keys.to(dtype).reshape(flat, -1, head_dim).transpose(1, 2))
        masks = []  # (logits, allowed [b, Hkv or 1, rows, n]): the rare masked steps work on 4-D views
        if self._packed_pads():
            masks.append((0, (self.pruned_positions != PAD_POSITION)[:, :, None, :]))  # older than every query
        tail_allowed = self.tail_mask(num_q)  # [b, 1, q, R] -> one row per (group head, query)
        if tail_allowed is not None:
            masks.append((1, tail_allowed[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, 1, rows, -1)))
        if features.sliding_window is not None:  # by true positions, per KV head: [b, h, q, n] -> [b, h, rows, n]
            query_positions = self.positions[:, :, -num_q:]
            for which, key_positions in ((0, self.pruned_positions), (1, self.positions)):
                allowed = features.window_allows(query_positions, key_positions)
                masks.append(
                    (which, allowed[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, rows, -1))
                )
        logits = [logits_packed, logits_tail]
        for which, allowed in masks:
            grouped = logits[which].view(batch, kv_heads, rows, -1)
            logits[which] = grouped.masked_fill(~allowed, float("-inf")).view(flat, rows, -1)
        sink_rows = None
        if features.sinks is not None:  # [1, Hkv, rows, 1] -> [b * Hkv, rows, 1]
            sink_rows = features.sink_logits(kv_heads, num_q, dtype).expand(batch, -1, -1, -1).reshape(flat, rows, 1)
        probs = features.softmax(torch.cat(logits, dim=-1), sink_rows)
        probs_packed, probs_tail = probs.split((self.pruned_keys.shape[-2], self.keys.shape[-2]), dim=-1)
        out = torch.bmm(probs_packed, self._flat_packed("values", self.pruned_values, dtype))
        out = torch.baddbmm(out, probs_tail, self.values.to(dtype).reshape(flat, -1, self.values.shape[-1]))
        return out.view(batch, q_heads, num_q, -1).transpose(1, 2).to(query.dtype).contiguous()

    def _zero(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 0-d zero, the ignored input of the logits' ``baddbmm`` (made once per dtype and device)."""
        found = self._flat_views.get("zero")
        if torch.compiler.is_compiling() or found is None or found.dtype != dtype or found.device != device:
            found = torch.zeros((), dtype=dtype, device=device)
            if not torch.compiler.is_compiling():
                self._flat_views["zero"] = found
        return found

    def _flat_packed(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The packed prompt's keys as ``[b * Hkv, d_keep, P]`` (transposed for the logits) or values as
        ``[b * Hkv, P, dv]``, in ``dtype``; the views are kept while the packed tensor is the same (it never changes
        in place), so a decoding step makes none."""
        # kept only for a tensor autograd does not track: a view made under no_grad would cut the graph later
        keep = not torch.compiler.is_compiling() and not tensor.requires_grad
        memo = self._flat_views.get(name)
        if keep and memo is not None and memo[0] is tensor and memo[1:3] == (tensor_version(tensor), dtype):
            return memo[3]
        converted = tensor.to(dtype)
        batch, heads, length = converted.shape[:3]
        flat = converted.reshape(batch * heads, length, converted.shape[-1])  # sizes given: the span may be empty
        view = flat.transpose(1, 2) if name == "keys" else flat
        if keep and converted is tensor:  # a converted copy is not kept (memory)
            self._flat_views[name] = (tensor, tensor_version(tensor), dtype, view)
        return view

    def _query_channels(self, query: torch.Tensor) -> torch.Tensor:
        """The kept key channels of flat queries: ``[b * Hkv, rows, d]`` -> ``[b * Hkv, rows, d_keep]`` (what
        ``gather_query_channels`` gives, flattened), with the expanded int64 gather index built once per channel
        choice and query shape, not at every step."""
        flat, rows, _ = query.shape
        index = self.channel_index
        if torch.compiler.is_compiling():  # a traced graph builds it once anyway; no tensor kept across calls
            return query.gather(-1, index.long().view(flat, 1, -1).expand(-1, rows, -1))
        memo = self._channel_gather
        if memo is None or memo[0] is not index or memo[1:3] != (tensor_version(index), rows):
            expanded = index.long().view(flat, 1, -1).expand(-1, rows, -1)
            memo = self._channel_gather = (index, tensor_version(index), rows, expanded)
        return query.gather(-1, memo[3])

    def tail_mask(self, num_q: int) -> torch.Tensor | None:
        """``[batch, 1, q, R]`` bool mask of the full-width tail for ``num_q`` queries (``None``: all visible)."""
        if num_q > 1 or self.has_pad_slots():
            return slot_mask(self.positions[:, 0], num_q)
        return None

    def _packed_pads(self) -> bool:
        if self._packed_has_pads is None:
            self._packed_has_pads = bool((self.pruned_positions == PAD_POSITION).any())
        return self._packed_has_pads

    def _map_batch_state(self, fn) -> None:
        super()._map_batch_state(fn)
        self._packed_has_pads = None
        self._flat_views = {}  # views of the replaced tensors: not kept alive

    # ------------------------------------------------------------------------------------------ bookkeeping
    def get_seq_length(self) -> int:
        return self.base.get_seq_length() if self.base is not None else self.cumulative_length

    def get_stored_length(self) -> int:
        if self.base is not None:
            return self.base.get_stored_length()
        pruned = 0 if self.pruned_keys is None else self.pruned_keys.shape[-2]
        return pruned + super().get_stored_length()

    def memory_parts(self) -> MemoryParts:
        return self.base.memory_parts() if self.base is not None else super().memory_parts()

    def reorder_cache(self, beam_idx):
        (self.base.reorder_cache if self.base is not None else super().reorder_cache)(beam_idx)

    def batch_repeat_interleave(self, repeats):
        (self.base.batch_repeat_interleave if self.base is not None else super().batch_repeat_interleave)(repeats)

    def batch_select_indices(self, indices):
        (self.base.batch_select_indices if self.base is not None else super().batch_select_indices)(indices)


class StaticThinKLayer(ThinKLayer):
    """:class:`ThinKLayer` with a static layout (``static=True``; :mod:`~hf_longmem.cache_classes.static`).

    After the prefill (token compression by the base, then channel pruning), the packed prompt keeps its shape and
    the full-width tail gets ``max_new_tokens`` more slots, filled in place (one more token raises); the tail's
    mask comes from its slots' validity.
    """

    is_compileable = True

    def __init__(self, *args, max_new_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_new_tokens = max_new_tokens
        self._frozen = False

    def freeze(self) -> None:
        """Moves the full-width tail into fixed buffers (eager, once, after the prefill)."""
        if self.sliding_window is not None:
            raise ValueError("ThinK (static=True) supports full-attention layers only")
        if not self.is_pruned:
            raise ValueError("ThinK (static=True) prunes at the prefill: prefill a prompt of at least 2 tokens")
        extra = self.max_new_tokens
        keys = torch.nn.functional.pad(self.keys, (0, 0, 0, extra))
        values = torch.nn.functional.pad(self.values, (0, 0, 0, extra))
        positions = torch.nn.functional.pad(self.positions, (0, extra), value=PAD_POSITION)
        self._append_buffers.clear()
        self.store(keys, values, positions, no_pads=False)
        self._packed_pads()  # known from now on: no device sync while decoding
        finish_freeze(self, (self.keys, self.values, self._positions))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self._frozen:
            return super().update(key_states, value_states, *args, **kwargs)
        name = type(self).__name__
        attn_kwargs = kwargs.get("kwargs")
        check_static_step(self, key_states.shape[-2], attn_kwargs, self._pending)
        free = self._positions[:, 0] == PAD_POSITION  # [b, tail capacity]
        torch._assert_async(
            free.any(dim=-1).all(), f"{name} (static=True): capacity exceeded, more tokens than max_new_tokens"
        )
        slot = free.to(torch.int32).argmax(dim=-1)[:, None, None]  # [b, 1, 1]: the first free slot
        batch, heads, _, head_dim = key_states.shape
        self.keys.scatter_(2, slot[..., None].expand(-1, heads, 1, head_dim), key_states)
        self.values.scatter_(2, slot[..., None].expand(-1, heads, 1, value_states.shape[-1]), value_states)
        new_position = self.real_seen.to(torch.int32)[:, None, None].expand(batch, heads, 1)
        self._positions.scatter_(2, slot.expand(-1, heads, -1), new_position)
        self.real_seen.add_(1)
        self.cumulative_length.add_(1)
        attn_kwargs[LAYER_KWARG] = self
        self._pending = True
        return self.keys, self.values

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        output = super().attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if not self._frozen:
            self.freeze()
        return output

    def tail_mask(self, num_q: int) -> torch.Tensor | None:
        if not self._frozen:
            return super().tail_mask(num_q)
        return (self._positions[:, :1] != PAD_POSITION)[:, :, None, :]  # [b, 1, 1, capacity]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self._frozen:
            return super().get_mask_sizes(query_length)
        return self.keys.shape[-2], 0  # unused by this layer (it computes its own attention)


class ThinKCache(LongMemCache):
    """ThinK key-channel pruning on top of a token cache.

    Args:
        key_channel_ratio: fraction of key channels PRUNED per KV head, in (0, 1) (paper default 0.4).
        base: the token cache underneath: ``"snapkv"`` (default, as in the paper's main results), ``"pyramidkv"``,
            ``"full"`` (no token eviction), or a fresh :class:`SnapKVCache` / :class:`PyramidKVCache` instance.
        budget: the base cache's token budget (with a base given by name).
        window_size: queries that score the channels (and the base's observation window; official 32).
        recent_size: newest prompt keys kept full width (official code 32; default 0 prunes them all).
        config: the model config.
        static, max_new_tokens: after the prefill, the pruned prompt plus ``max_new_tokens`` full-width slots
            written in place (:class:`StaticThinKLayer`; ``is_compileable``). Same attention as ``static=False``
            (float rounding aside); full-attention models, the prompt prefilled in one forward.

    Example::

        cache = ThinKCache(base=SnapKVCache(budget=512, config=model.config), key_channel_ratio=0.4)
        hf_longmem.enable_longmem_attention(model)
        model.generate(input_ids, cache=cache)
    """

    def __init__(
        self,
        key_channel_ratio: float = 0.4,
        base: str | Cache = "snapkv",
        budget: int | None = None,
        window_size: int = 32,
        recent_size: int = 0,
        config=None,
        static: bool = False,
        max_new_tokens: int | None = None,
    ):
        check_ratio("key_channel_ratio", key_channel_ratio)
        check_int("window_size", window_size, low=1)
        check_int("recent_size", recent_size, low=0)
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        if getattr(text_config, "num_kv_shared_layers", 0):
            # Gemma-3n/4: the last layers attend to the keys an earlier layer's update returned; once ThinK packs a
            # layer's keys, what it returns is no longer the full-width keys those layers expect
            raise ValueError(
                f"unsupported model: ThinK packs pruned key channels, and {text_config.num_kv_shared_layers} layers "
                "of this model reuse another layer's keys and values (num_kv_shared_layers)"
            )
        base_factory = _base_layer_factory(base, budget, window_size, config)
        self.key_channel_ratio = key_channel_ratio
        self.static = append_static_options(static, max_new_tokens)

        def factory(layer_idx: int) -> ThinKLayer:
            args = (base_factory(layer_idx), key_channel_ratio, window_size, recent_size)
            if self.static:
                return StaticThinKLayer(*args, max_new_tokens=max_new_tokens)
            return ThinKLayer(*args)

        super().__init__(factory, config)
        check_static_layers(self, self.static, StaticThinKLayer)


def _base_layer_factory(base, budget, window_size, config):
    if isinstance(base, str):
        if base not in BASES:
            raise ValueError(f"`base` must be one of {BASES} or a SnapKV/PyramidKV cache, got {base!r}")
        if base == "full":
            if budget is not None:
                raise ValueError("`budget` is an option of the base token cache; base='full' keeps every token")
            return lambda layer_idx: None
        cls = SnapKVCache if base == "snapkv" else PyramidKVCache
        options = {"window_size": window_size, "config": config}
        if budget is not None:
            options["budget"] = budget
        base = cls(**options)
    elif budget is not None:
        raise ValueError("`budget` is for a base given by name; set it on the base cache instance instead")
    if getattr(base, "static", False):
        raise ValueError("`base` must use the dynamic layout: pass static=True to ThinKCache itself")
    if not isinstance(base, (SnapKVCache, PyramidKVCache)):
        raise ValueError(
            f"`base` must be one of {BASES} or a SnapKVCache/PyramidKVCache instance (prefill-time token caches), "
            f"got {type(base).__name__}"
        )
    if base.get_seq_length() > 0:
        raise ValueError("`base` must be a fresh cache (it has already seen tokens)")
    if base.layers:
        layers = list(base.layers)
        return lambda layer_idx: layers[layer_idx]
    return lambda layer_idx: base.layer_class_to_replicate()


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache("think", ThinKCache, needs_attention=True, summary="ThinK: query-driven key-channel pruning over SnapKV")
