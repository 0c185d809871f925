"""Tiny random models of every decoder-only causal LM that the installed transformers ships.

The list is not hand-written: :func:`architecture_names` reads ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and
``CONFIG_MAPPING``, so a new transformers release is picked up by the next run. :func:`tiny_causal_lm` builds each
from its config with generic small sizes (:data:`GENERIC`, applied only to the fields a config has) plus
:data:`OVERRIDES`, a short table for configs that need a specific value to stay small or consistent (MoE sizes,
``layer_types``, MLA ranks, ...).

What cannot be built from a config is skipped with a stated reason (:func:`skip_reason`): encoder-decoder models,
encoder (masked-LM) architectures whose causal LM is only an ``is_decoder`` mode, multimodal wrappers, models that
do not run with transformers' ``DynamicCache`` (own cache classes: RWKV, xLSTM, ...) and models without any
attention KV layer (pure state-space / recurrent: nothing for a KV cache to compress). Hybrid models whose
``DynamicCache`` mixes attention with linear-attention/conv layers, or holds KV in other layer kinds (indexed sparse
attention, hybrid layers), are kept: a cache must run on them or refuse them.

:data:`HARD_FEATURES` adds variants where an attention feature that our own attention paths must honour is switched on
hard enough to change the output: a Gemma-2 attention-logit softcap the logits reach, GPT-OSS sinks of a few units,
interleaved RoPE (cohere, glm), and NoPE layers (SmolLM3 ``no_rope_layers``, EXAONE-4 full layers).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings

import torch
from transformers import DynamicCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from tests.helpers.tiny_models import TINY_DECODER, VOCAB

#: Sliding window of the tiny models (where the architecture has sliding layers): shorter than the prompts of the
#: checks, so the sliding layers really drop tokens, and larger than the compressing budgets.
SLIDING_WINDOW = 12

#: Generic small sizes, applied to every config field of these names (through ``attribute_map`` aliases too).
GENERIC = dict(
    TINY_DECODER,
    intermediate_size=96,
    sliding_window=SLIDING_WINDOW,
    # MoE
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    # MLA (DeepSeek-style)
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    # no randomness in the forward
    attention_dropout=0.0,
    hidden_dropout=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    dropout=0.0,
    num_nextn_predict_layers=0,
)

#: Per model type: config values that the generic ones do not give (applied after :data:`GENERIC`).
OVERRIDES: dict[str, dict] = {
    # MHA-only architectures (no num_key_value_heads field) need nothing; these need consistent sizes:
    "gpt_neox": dict(rotary_pct=0.5),
    "gptj": dict(rotary_dim=8),
    "codegen": dict(rotary_dim=8, n_ctx=256),
    "phi": dict(partial_rotary_factor=0.5),
    "persimmon": dict(partial_rotary_factor=0.5),
    "stablelm": dict(partial_rotary_factor=0.25),
    "gemma2": dict(layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"]),
    "cohere2": dict(layer_types=["sliding_attention", "full_attention"]),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"]),
    "exaone4": dict(layer_types=["sliding_attention", "full_attention"]),
    # per-layer embeddings, KV sharing, wide defaults the generic names do not reach
    "gemma4_text": dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16),
    "gemma3n_text": dict(
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=16,
        num_kv_shared_layers=0,
        laurel_rank=8,
        layer_types=["sliding_attention", "full_attention"],
        altup_num_inputs=2,
    ),
    "cpmant": dict(dim_head=16, dim_ff=96),
    "ergo": dict(first_dense_intermediate_size=96, shared_intermediate_size=32),
    "kimi_linear": dict(linear_head_dim=16, linear_num_heads=4),
    "inkling2_text": dict(
        unpadded_vocab_size=VOCAB, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16
    ),
    "inkling2_loop_text": dict(
        unpadded_vocab_size=VOCAB, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16
    ),
    "qwen4_exp_text": dict(
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4
    ),
    "gpt_neo": dict(attention_types=[[["local", "global"], 1]], window_size=SLIDING_WINDOW),
    "zaya": dict(num_experts_per_tok=1),
    "lfm2_moe": dict(num_dense_layers=1),
    "mamba2": dict(num_heads=8),
    "xlnet": dict(d_head=16),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "recurrent_gemma": dict(block_types=("recurrent", "attention"), lru_width=64, attention_window_size=SLIDING_WINDOW),
}

#: Config classes whose sub-configs mark a multimodal wrapper (its text model is usually listed on its own).
MULTIMODAL_SUBCONFIGS = ("vision", "audio", "vq", "patcher", "text_encoder", "depth_decoder", "text_config")
#: Largest tiny model built (parameters, counted on the meta device first): a config whose sizes the generic
#: overrides do not reach is skipped rather than allocated.
MAX_PARAMETERS = 3_000_000
#: Cache layer classes of transformers' DynamicCache that hold no per-token keys/values (recurrent / conv state, or
#: a layer reading another layer's KV). A model whose layers are all of these has nothing for a KV cache to compress;
#: every other layer kind (plain, sliding, indexed, hybrid linear + attention, model-specific) is in the matrix, where
#: a cache must handle it or refuse it.
STATE_ONLY_LAYER_NAMES = ("LinearAttentionLayer", "DummyLayer")


def architecture_names() -> list[str]:
    """Every model type with a causal-LM class in the installed transformers, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _model_class(model_type: str):
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return getattr(importlib.import_module("transformers"), name)


def _config_fields(config_cls) -> set[str]:
    names = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    return names | set(getattr(config_cls, "attribute_map", {}))


def static_skip_reason(model_type: str) -> str | None:
    """Why ``model_type`` is not a decoder-only causal LM buildable from its config alone (``None``: it is)."""
    try:
        config_cls = CONFIG_MAPPING[model_type]
    except (KeyError, ImportError) as error:  # pragma: no cover - depends on the installed transformers
        return f"no config class ({type(error).__name__}: {error})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder_decoder = bool(getattr(config_cls(), "is_encoder_decoder", False))
    except Exception:  # noqa: BLE001 - a default config that does not validate is judged when built
        encoder_decoder = bool(getattr(config_cls, "is_encoder_decoder", False))
    if encoder_decoder:
        return "encoder-decoder model"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder architecture (a masked LM); its causal LM is the encoder run with is_decoder=True"
    sub = [key for key in getattr(config_cls, "sub_configs", {}) if any(s in key for s in MULTIMODAL_SUBCONFIGS)]
    if sub:
        text = f"{model_type}_text"
        also = f"; its text model is {text}" if text in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else ""
        return f"multimodal/composite model (sub-configs {', '.join(sub)}){also}"
    return None


def tiny_config(model_type: str, attn_impl: str = "eager", **overrides):
    """The config of a tiny random ``model_type`` (see the module docstring for the sizes)."""
    config_cls = CONFIG_MAPPING[model_type]
    fields = _config_fields(config_cls)
    kwargs = {key: value for key, value in GENERIC.items() if key in fields}
    kwargs.update(OVERRIDES.get(model_type, {}))
    kwargs.update(overrides)
    aliases = getattr(config_cls, "attribute_map", {})
    # an alias and its target must not both be given
    for alias, target in aliases.items():
        if alias in kwargs and target in kwargs:
            kwargs.pop(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_cls(**kwargs)
    config._attn_implementation = attn_impl
    return config


def randomize(model, std: float = 0.2, seed: int = 0):
    """Re-draws every 2-D weight from ``N(0, std^2)`` (larger than default init: peaked attention, so greedy decoding
    is sensitive to every kept token); sets ``eos_token_id=None`` so generations have a fixed length."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def _error_line(error: Exception) -> str:
    """One line naming ``error`` (validation errors keep their cause, which is on the last line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"
    return f"{type(error).__name__}: {text[:200]}"


def _build(model_type: str, attn_impl: str, seed: int, overrides: dict):
    torch.manual_seed(seed)
    config = tiny_config(model_type, attn_impl, **overrides)
    model_cls = _model_class(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            count = sum(p.numel() for p in model_cls._from_config(config, attn_implementation=attn_impl).parameters())
        if count > MAX_PARAMETERS:
            raise ValueError(f"{count:,} parameters with the generic sizes (> {MAX_PARAMETERS:,}): needs an override")
        model = model_cls._from_config(config, attn_implementation=attn_impl, dtype=torch.float32)
    return randomize(model, seed=seed)


def kv_layer_kinds(model) -> list[str]:
    """Class names of the layers of ``DynamicCache(config=model.config)`` (what transformers caches per layer)."""
    return [type(layer).__name__ for layer in DynamicCache(config=model.config).layers]


def _attention_layer_types(model_type: str) -> list[str] | None:
    """``layer_types`` for 2 layers that keep one attention layer of a hybrid model (``None``: not applicable).

    The default (full-size) config's own layer types are read: its first non-attention type, then its first attention
    type, so the tiny model has both kinds, as the real one does.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            default = list(getattr(CONFIG_MAPPING[model_type](), "layer_types", None) or [])
    except Exception:  # noqa: BLE001
        return None
    attention = [t for t in default if "attention" in t and "linear" not in t]
    other = [t for t in default if t not in attention]
    return [other[0], attention[0]] if attention and other else None


def _generates(model) -> None:
    """Raises what greedy decoding with ``DynamicCache`` raises on ``model`` (nothing if it runs)."""
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(ids, cache=DynamicCache(config=model.config), max_new_tokens=2, do_sample=False)


@functools.cache
def resolve_overrides(model_type: str, attn_impl: str = "eager") -> tuple[dict | None, str | None]:
    """The overrides that build ``model_type`` into a tiny model generating with ``DynamicCache``, or why none does.

    Tries :data:`OVERRIDES` first, then two generic fall-backs that new architectures commonly need: every head its
    own KV head (multi-head latent attention and other layouts without GQA), and a hybrid model's ``layer_types``
    cut to one non-attention and one attention layer (:func:`_attention_layer_types`).

    Returns:
        ``(overrides, None)`` when buildable, ``(None, reason)`` when skipped.
    """
    reason = static_skip_reason(model_type)
    if reason:
        return None, reason
    base = dict(OVERRIDES.get(model_type, {}))
    candidates = [base, {**base, "num_key_value_heads": GENERIC["num_attention_heads"]}]
    hybrid = _attention_layer_types(model_type)
    if hybrid and "layer_types" not in base:
        candidates += [{**c, "layer_types": hybrid} for c in candidates]
    for overrides in candidates:
        try:
            model = _build(model_type, attn_impl, 0, overrides)
        except Exception as error:  # noqa: BLE001 - any failure to build is the reason
            reason = f"cannot be built from its config: {_error_line(error)}"
            continue
        if not model._supports_default_dynamic_cache():
            return (
                None,
                f"uses its own cache class ({type(model).__name__} is excluded from DynamicCache by transformers)",
            )
        kinds = kv_layer_kinds(model)
        if all(kind in STATE_ONLY_LAYER_NAMES for kind in kinds):
            reason = f"no attention KV layer (DynamicCache layers: {', '.join(sorted(set(kinds)))})"
            continue
        try:
            _generates(model)
        except Exception as error:  # noqa: BLE001
            reason = f"does not generate with DynamicCache: {_error_line(error)}"
            continue
        return overrides, None
    return None, reason


def tiny_causal_lm(model_type: str, attn_impl: str = "eager", seed: int = 0, **overrides):
    """A tiny random float32 ``model_type`` causal LM (eval mode), built from its config.

    Sizes: :data:`GENERIC`, then the overrides :func:`resolve_overrides` found for the type, then ``overrides``.
    """
    resolved, reason = resolve_overrides(model_type, attn_impl)
    if resolved is None:
        raise ValueError(f"{model_type} is skipped: {reason}")
    return _build(model_type, attn_impl, seed, {**resolved, **overrides})


def build_skip_reason(model_type: str, attn_impl: str = "eager") -> str | None:
    """Why ``model_type`` is skipped (``None``: it is built and runs greedy decoding with ``DynamicCache``)."""
    return resolve_overrides(model_type, attn_impl)[1]


# ------------------------------------------------------------------------------------------------ hard features
def _softcapped_gemma2(attn_impl: str, **overrides):
    # Attention logits q.k / sqrt(16) of these N(0, 0.2^2) weights reach several units: a cap of 2 clips them.
    return tiny_causal_lm("gemma2", attn_impl, **{"attn_logit_softcapping": 2.0, **overrides})


def _sinks_gpt_oss(attn_impl: str, **overrides):
    model = tiny_causal_lm("gpt_oss", attn_impl, **overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            sinks = layer.self_attn.sinks
            sinks.copy_(2.0 + 2.0 * torch.rand(sinks.shape, generator=generator))  # a few units: they take real mass
    return model


#: Variants with an attention feature switched on hard enough to change the output (name -> builder).
HARD_FEATURES = {
    "gemma2+softcap": _softcapped_gemma2,
    "gpt_oss+sinks": _sinks_gpt_oss,
    "cohere+interleaved_rope": lambda attn_impl, **kw: tiny_causal_lm("cohere", attn_impl, **kw),
    "glm+interleaved_rope": lambda attn_impl, **kw: tiny_causal_lm("glm", attn_impl, **kw),
    # SmolLM3: no_rope_layers[i] == 0 means layer i uses no RoPE
    "smollm3+nope": lambda attn_impl, **kw: tiny_causal_lm("smollm3", attn_impl, **{"no_rope_layers": [1, 0], **kw}),
    # EXAONE-4: full-attention layers are NoPE when the model has sliding layers
    "exaone4+nope": lambda attn_impl, **kw: tiny_causal_lm(
        "exaone4", attn_impl, **{"layer_types": ["sliding_attention", "full_attention"], **kw}
    ),
}


def build_model(name: str, attn_impl: str = "eager", **overrides):
    """A tiny model by matrix name: a model type, or a :data:`HARD_FEATURES` variant."""
    if name in HARD_FEATURES:
        return HARD_FEATURES[name](attn_impl, **overrides)
    return tiny_causal_lm(name, attn_impl, **overrides)
