"""Layers that decide what to keep from attention scores (H2O, SnapKV, PyramidKV, ...).

Such a layer needs the queries, which only the attention function sees. During ``update()`` it stores the new
states uncompressed and puts itself into the attention kwargs; hf_longmem's registered attention function then
calls :meth:`ScoredLayer.attend`, which computes the attention output exactly as the model's fallback attention
would (SDPA or eager), scores the keys, and compresses the storage. ``make_cache(name, model)`` switches the model
to hf_longmem attention; a cache built by hand needs ``hf_longmem.enable_longmem_attention(model)``, and a missed
call is reported at the next step instead of silently keeping every token.

The output is the model's own attention function over the layer's slots (softcap, sinks, scaling and dropout as the
model applies them; the sliding window through the layer's own mask). The Triton decode path applies softcap and
sinks itself and leaves windowed or dropout steps to the model's function. The eviction scores
(:meth:`ScoredLayer.received_attention`) are the model's attention probabilities too: softcapped logits, the sinks'
share in the denominator, the window in the mask (no dropout: a score, not an output).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_longmem.attention import EAGER_ATTENTION_NAME, LAYER_KWARG, fallback_attention
from hf_longmem.kernels import attention_column_scores, decode_attention
from hf_longmem.kernels.decode_attention.reference import grouped_logits
from hf_longmem.kernels.utils import resolve_backend
from hf_longmem.memory.attention_features import AttentionFeatures
from hf_longmem.memory.masks import slot_mask
from hf_longmem.memory.padding import PAD_POSITION
from hf_longmem.memory.scoring import QUERY_CHUNK, allowed_mask, causal_column_scores, column_scores

from .base import CompressedLayer

#: transformers' SDPA attention function (``ALL_ATTENTION_FUNCTIONS["sdpa"]`` unless a user replaced it).
_SDPA_ATTENTION = sdpa_attention_forward

#: Steps with at most this many new queries use the flash-decoding kernel on CUDA (prefills use the fallback).
DECODE_KERNEL_MAX_QUERIES = 16

NEEDS_ATTENTION_MESSAGE = (
    "{name} needs hf_longmem attention to see the queries: build the cache with "
    "hf_longmem.make_cache(name, model, ...) or call hf_longmem.enable_longmem_attention(model) first"
)


def feature_column_scores(
    query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None, features: AttentionFeatures
) -> torch.Tensor:
    """:func:`~hf_longmem.memory.scoring.column_scores` with the model's softcap and attention sinks: the attention
    each key receives (the sink's share is nobody's), summed over the queries, averaged over a GQA group.

    Args:
        query: ``[batch, q_heads, q, head_dim]`` (the last ``q`` positions).
        keys: ``[batch, kv_heads, n, head_dim]``.
        attention_mask: ``[batch, 1, q, n]`` (bool or additive) or ``None`` (causal).

    Returns:
        ``[batch, kv_heads, n]`` float32.
    """
    num_q, num_k = query.shape[-2], keys.shape[-2]
    kv_heads = keys.shape[1]
    allowed = allowed_mask(attention_mask, num_q, num_k, query.device)[:, :, None]  # [b, 1, 1, q, n]
    sinks = None
    if features.sinks is not None:
        sinks = features.sinks.float().view(1, kv_heads, -1, 1, 1)  # [1, Hkv, g, 1, 1]
    total = query.new_zeros(keys.shape[0], kv_heads, num_k, dtype=torch.float32)
    for start in range(0, num_q, QUERY_CHUNK):  # chunks of queries bound the [chunk, n] probabilities
        stop = min(start + QUERY_CHUNK, num_q)
        logits = grouped_logits(query[:, :, start:stop], keys, features.scaling, features.softcap)  # [b,Hkv,g,c,n]
        logits = logits.masked_fill(~allowed[..., start:stop, :], float("-inf"))
        if sinks is not None:
            logits = torch.cat((logits, sinks.expand(*logits.shape[:-1], 1)), dim=-1)
        probs = torch.softmax(logits, dim=-1)[..., :num_k].nan_to_num(0.0)  # fully masked rows give zeros
        total += probs.sum(dim=3).mean(dim=2)
    return total


def static_step_column_scores(
    query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, call: tuple
) -> torch.Tensor:
    """The attention each slot receives from a static decoding step (the arguments of
    :meth:`~hf_longmem.cache_classes.static.StaticSlots.after_attention`), with the model's scaling, softcap and sinks.

    Args:
        query: ``[batch, q_heads, 1, head_dim]``; keys: ``[batch, kv_heads, capacity, head_dim]``.
        valid: ``[batch, 1, 1, capacity]`` bool, the slots attended.
        call: ``(module, scaling, dropout, kwargs)`` of the attention call.

    Returns:
        ``[batch, kv_heads, capacity]`` float32.
    """
    module, scaling, dropout, kwargs = call
    features = AttentionFeatures.of_call(module, query, scaling, dropout, kwargs)
    if features.softcap is not None or features.sinks is not None:
        return feature_column_scores(query, keys, valid, features)
    return column_scores(query, keys, valid, features.scaling)


class ScoredLayer(CompressedLayer):
    """Base of the attention-scored layers: defers compression to :meth:`attend`."""

    #: ``None``: the prefill scoring kernel runs Triton on CUDA, decode attention runs the model's attention
    #: (SDPA/eager) everywhere; ``"triton"`` also decodes with the Triton flash-decoding kernel; ``"torch"`` uses no
    #: Triton. Decode defaults to SDPA because it measured faster end to end on an H200 (1B-shape bfloat16 model,
    #: 16k context, batch 1, ``benchmarks/gpu_check.py``: SnapKV 14.9 ms per token vs 21.0 with the kernel).
    kernel_backend: str | None = None
    #: Whether :meth:`observe` scores every query of a prefill (H2O, D2O), not only a last window: a float32 CPU
    #: prefill then takes SDPA's log-sum-exp along with the output (:meth:`_flash_prefill`).
    scores_every_query: bool = False

    def __init__(self):
        super().__init__()
        self._pending = False
        self._deferring = True
        self._features: AttentionFeatures | None = None
        self._lse: torch.Tensor | None = None  # [batch, q_heads, q] of this step's flash prefill (else None)

    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending:
            raise RuntimeError(NEEDS_ATTENTION_MESSAGE.format(name=type(self).__name__))
        attn_kwargs = kwargs.get("kwargs")
        if attn_kwargs is None:
            raise RuntimeError(
                f"{type(self).__name__}: this model does not pass its attention kwargs to Cache.update, "
                "so attention-scored compression cannot run (unsupported model)"
            )
        self._deferring = True
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # stores, compress() deferred
        self._pending = True
        attn_kwargs[LAYER_KWARG] = self
        return keys, values

    def appends_only(self) -> bool:
        return True  # compression happens in attend(), after the attention call

    def compresses_now(self) -> bool:
        """Whether :meth:`attend` compresses after this step's attention (SnapKV: only after a scored prefill)."""
        return True

    def compress(self, keys, values, positions):
        if self._deferring:
            return keys, values, positions
        return super().compress(keys, values, positions)

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """Attention output for ``query`` ``[batch, q_heads, q, head_dim]``, then scoring and compression."""
        implementation = module.config._attn_implementation
        features = AttentionFeatures.of_call(module, query, scaling, dropout, kwargs)
        scale = features.scaling
        kernel = query.shape[-2] <= DECODE_KERNEL_MAX_QUERIES and self.kernel_backend == "triton"
        if kernel and features.sliding_window is None and not features.dropout:
            # flash-decoding over this layer's own slots (pads masked per KV head), GQA without repeat_kv; no mask
            # (and no position materialisation) when the layer holds no pad. Softcap in the kernel, sinks merged
            # from its log-sum-exp (a window or dropout goes to the model's attention below).
            valid = self.positions != PAD_POSITION if self.has_pad_slots() else None
            out, lse = decode_attention(
                query, key, value, scale, valid=valid, causal_new=True, backend="triton", softcap=features.softcap
            )
            out, _ = features.add_sinks(out, lse)
            output, weights = out.transpose(1, 2).contiguous(), None
        else:
            # SDPA applies causality only if the module says it is causal (BERT-style decoders may not)
            eager = implementation == EAGER_ATTENTION_NAME or not getattr(module, "is_causal", True)
            attention_mask = self.mask_for_this_layer(query, key, eager, features.sliding_window)
            attention = fallback_attention(module, implementation)
            if self._flash_prefill(attention, query, key, value, attention_mask, features):
                # the call SDPA makes here, with the log-sum-exp it computes anyway: the column sums need no softmax
                output, self._lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    query, key, value, 0.0, True, scale=scaling
                )
                output, weights = output.transpose(1, 2).contiguous(), None
            else:
                output, weights = attention(
                    module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
                )
        if self.wants_scores(query.shape[-2]):
            self._features = features  # received_attention() scores with the model's softcap and sinks
            try:
                # no [q, n] mask tensor where it is plain causal: the scoring functions take None as causal
                causal = self.scoring_is_causal()
                mask = (
                    None
                    if causal
                    else slot_mask(self.positions[:, 0], query.shape[-2], sliding_window=features.sliding_window)
                )
                self.observe(query, key, mask, scale)
            finally:
                self._features = None  # holds the model's sink parameter: not kept in the cache
                self._lse = None  # this step's only
        self._pending = False
        self._deferring = False
        if not self.compresses_now():
            return output, weights
        current = (self.keys, self.values, self.positions)
        self._kept_no_pads = None  # compress() may say its result holds no pad (else rescanned on demand)
        stored = self.compress(*current)
        if stored[0] is not current[0]:
            self._steady_appends = 0  # compressing (H2O every step): appends go back to plain concatenation
        if any(new is not old for new, old in zip(stored, current)):
            self.store(*stored, no_pads=self._kept_no_pads)
        return output, weights

    def _flash_prefill(self, attention, query, key, value, attention_mask, features: AttentionFeatures) -> bool:
        """Whether this step's attention is SDPA's CPU flash kernel over a plain causal prefill that
        :meth:`observe` scores with every query (:attr:`scores_every_query`): then :meth:`attend` calls that kernel
        itself, for the per-query log-sum-exp it returns with the output (the same call, the same output bits, as
        transformers' ``sdpa_attention_forward`` with ``enable_gqa``; ``tests/cache_classes/test_scored.py``).

        Float32 only: in lower precision SDPA's logits are not the float32 logits the scores are computed from.
        """
        num_q, num_k = query.shape[-2], key.shape[-2]
        return (
            1 < num_q == num_k  # first: a decoding step stops here
            and self.scores_every_query
            and attention is _SDPA_ATTENTION
            and query.device.type == "cpu"
            and query.dtype == key.dtype == value.dtype == torch.float32
            and attention_mask is None
            and query.shape[-1] == key.shape[-1] == value.shape[-1] <= 256  # transformers' enable_gqa condition
            and query.shape[1] % key.shape[1] == 0
            and not (query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1)  # SDPA's flash check
            and torch.backends.cuda.flash_sdp_enabled()  # not disabled by `sdpa_kernel` (the flag is CPU's too)
            and features.softcap is None
            and features.sinks is None
            and features.sliding_window is None
            and not features.dropout
            and self.wants_scores(num_q)
            and self.scoring_is_causal()
        )

    def mask_for_this_layer(
        self, query: torch.Tensor, key: torch.Tensor, eager: bool, sliding_window: int | None = None
    ):
        """This layer's own mask, built from its slots (with the model's sliding window by true positions).

        The model's mask is sized for the first layer; a scored layer may store a different number of tokens
        (PyramidKV) or per-row pad slots, so it always uses its own (same pattern where the sizes agree).
        """
        num_new, num_keys = query.shape[-2], key.shape[-2]
        # no mask where SDPA's own causal default is exact; an eager attention always gets one (some add the mask
        # unconditionally, e.g. ModernBERT's)
        plain = not eager and (num_new == 1 or num_new == num_keys)
        if plain and not self.has_pad_slots() and sliding_window is None:
            return None
        return slot_mask(self.positions[:, 0], num_new, query.dtype if eager else None, sliding_window)

    def wants_scores(self, num_new: int) -> bool:
        """Whether a step of ``num_new`` queries is scored (SnapKV scores prefills only)."""
        return True

    def observe(self, query: torch.Tensor, keys: torch.Tensor, attention_mask, scaling: float) -> None:
        """Records what :meth:`priority` will rank by.

        Args:
            query: ``[batch, q_heads, q, head_dim]``.
            keys: ``[batch, kv_heads, n, head_dim]`` (stored + new).
            attention_mask: ``[batch, 1, q, n]`` bool; a pad query sees only itself (it adds no score to real keys).
                ``None`` when it is plain causal (no pad slot, no window: :meth:`scoring_is_causal`).
        """
        raise NotImplementedError

    def received_attention(
        self, query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Attention each key receives from ``query`` (the last ``q`` slots), summed over queries, group-averaged.

        ``[batch, kv_heads, n]`` float32. On CUDA the Triton kernel computes it from the slot metadata without a
        ``[q, n]`` probability matrix; elsewhere the chunked torch reference uses ``attention_mask``. With the
        model's softcap, sinks or sliding window, the probabilities are the model's own (torch, chunked).
        """
        features = getattr(self, "_features", None)
        if features is not None and (features.softcap is not None or features.sinks is not None):
            return feature_column_scores(query, keys, attention_mask, features)
        if features is None or features.sliding_window is None:
            backend = resolve_backend(self.kernel_backend, query, keys)
        else:
            backend = "torch"  # the kernel knows no window; the mask has it
        if backend == "triton":
            num_q = query.shape[-2]
            return attention_column_scores(
                query,
                keys,
                scaling,
                valid=self.positions != PAD_POSITION,
                causal_new=True,
                query_valid=self.positions[:, 0, -num_q:] != PAD_POSITION,
                backend="triton",
            )
        if self.scoring_is_causal():  # score only what the queries see, no mask tensor
            return causal_column_scores(query, keys, scaling, self._lse)
        return column_scores(query, keys, attention_mask, scaling)

    def scoring_is_causal(self) -> bool:
        """Whether this step's scoring mask is plain causal (no pad slot, no window): the queries, the last of the
        slots, see every slot up to their own."""
        features = getattr(self, "_features", None)
        windowed = self.sliding_window is not None or (features is not None and features.sliding_window is not None)
        return not windowed and not self.has_pad_slots()

    def reset(self) -> None:
        super().reset()
        self._pending = False
        self._deferring = True
