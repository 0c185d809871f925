"""The attention features hf_longmem honours: one known set, enforced at run time and against every architecture.

The survey tests read the installed transformers: every causal-LM architecture's attention call sites
(``attention_interface(..., softcap=..., s_aux=...)``) and its ``eager_attention_forward`` (parameters and the
``module.<attr>`` it reads). They fail when a new architecture (or a new transformers release) brings a kwarg or an
attention attribute that :mod:`hf_longmem.memory.attention_features` does not know, so the paths that compute
attention themselves cannot silently ignore it.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types

import pytest
import torch
from transformers.masking_utils import sliding_window_overlay
from transformers.models.auto.configuration_auto import model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_longmem.attention import (
    ATTENTION_NAME,
    EAGER_ATTENTION_NAME,
    LAYER_KWARG,
    longmem_attention_name,
    register_attention,
)
from hf_longmem.memory.attention_features import (
    KNOWN_KWARGS,
    MODULE_ATTRIBUTES,
    AttentionFeatures,
    HeadSubsetModule,
    check_attention_kwargs,
)
from hf_longmem.memory.masks import slot_mask

#: The attention function's own parameters (not kwargs a model adds).
SIGNATURE = {"module", "query", "key", "value", "attention_mask", "kwargs"}


# ------------------------------------------------------------------------------------------------ the survey
def _modeling_modules():
    """``{model_type: modeling module}`` of every causal LM the installed transformers ships (importable ones)."""
    modules = {}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        name = model_type_to_module_name(model_type)
        try:
            modules[model_type] = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ImportError:  # remote-code or deprecated entries without a local module
            continue
    return modules


@pytest.fixture(scope="module")
def modeling_modules():
    modules = _modeling_modules()
    assert len(modules) > 100  # the survey really covers transformers' architectures
    return modules


def _top_level_keywords(arguments: str) -> list[str]:
    """Keyword names of a call's argument text (``**kwargs`` and nested calls skipped)."""
    depth, current, parts = 0, "", []
    for char in arguments:
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [m.group(1) for part in parts if (m := re.match(r"\s*(\w+)\s*=(?!=)", part))]


def attention_call_keywords(source: str) -> set[str]:
    """Keywords passed at every ``attention_interface(...)`` call site of a modeling source."""
    found = set()
    for match in re.finditer(r"attention_interface\(", source):
        depth, index = 1, match.end()
        while depth:
            depth += (source[index] in "([{") - (source[index] in ")]}")
            index += 1
        found.update(_top_level_keywords(source[match.end() : index - 1]))
    return found


def test_every_architecture_passes_only_known_attention_kwargs(modeling_modules):
    unknown = {}
    for model_type, module in modeling_modules.items():
        extra = attention_call_keywords(inspect.getsource(module)) - KNOWN_KWARGS - SIGNATURE
        if extra:
            unknown[model_type] = sorted(extra)
    assert not unknown, (
        f"attention kwargs that hf_longmem.memory.attention_features does not know (apply or refuse them): {unknown}"
    )


def test_every_eager_attention_reads_only_known_module_attributes(modeling_modules):
    """What a model's eager attention reads from the module (``module.sinks``, ...) and its own parameters."""
    unknown = {}
    for model_type, module in modeling_modules.items():
        eager = getattr(module, "eager_attention_forward", None)
        if eager is None:
            continue
        source = inspect.getsource(eager)
        attributes = set(re.findall(r"\bmodule\.(\w+)", source)) - MODULE_ATTRIBUTES
        parameters = set(inspect.signature(eager).parameters) - KNOWN_KWARGS - SIGNATURE
        if attributes or parameters:
            unknown[model_type] = sorted(attributes | parameters)
    assert not unknown, (
        f"eager attention reads module attributes / takes parameters hf_longmem does not know: {unknown}"
    )


def test_the_survey_sees_softcap_and_sinks(modeling_modules):
    """Guards the survey itself: Gemma-2's softcap and GPT-OSS's sinks are found where they are."""
    assert "softcap" in attention_call_keywords(inspect.getsource(modeling_modules["gemma2"]))
    assert "s_aux" in attention_call_keywords(inspect.getsource(modeling_modules["gpt_oss"]))
    assert "sinks" in re.findall(
        r"\bmodule\.(\w+)", inspect.getsource(modeling_modules["gpt_oss"].eager_attention_forward)
    )


# ---------------------------------------------------------------------------------------------- run time
class _Layer:
    """A cache layer that takes the attention call and returns the query as output."""

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return query.transpose(1, 2), None


def _attention_module(sinks: torch.Tensor | None = None):
    config = types.SimpleNamespace(model_type="toy", _attn_implementation=EAGER_ATTENTION_NAME)
    module = types.SimpleNamespace(config=config, num_key_value_groups=2, training=False, is_causal=True)
    if sinks is not None:
        module.sinks = sinks
    return module


def _call(name: str, module, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    register_attention()
    query, key = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    return ALL_ATTENTION_FUNCTIONS[name](module, query, key, key, None, **kwargs)


def test_unknown_kwarg_is_refused_naming_it_and_the_model():
    with pytest.raises(ValueError, match="'rope_bias'") as error:
        _call(EAGER_ATTENTION_NAME, _attention_module(), **{LAYER_KWARG: _Layer(), "rope_bias": 1.0})
    assert "toy" in str(error.value) and "_Layer" in str(error.value)


def test_refused_features_are_named():
    with pytest.raises(ValueError, match="position bias"):
        _call(EAGER_ATTENTION_NAME, _attention_module(), **{LAYER_KWARG: _Layer(), "position_bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="bidirectional"):
        _call(EAGER_ATTENTION_NAME, _attention_module(), **{LAYER_KWARG: _Layer(), "is_causal": False})
    # the defaults of these kwargs are accepted, as are the applied, cache and inert ones
    check_attention_kwargs(
        _attention_module(),
        {
            "is_causal": True,
            "position_bias": None,
            "softcap": 1.0,
            "s_aux": None,
            "position_ids": None,
            "use_cache": True,
        },
    )


def test_sdpa_fallback_refuses_sinks():
    with pytest.raises(ValueError, match="sinks"):
        _call(ATTENTION_NAME, _attention_module(sinks=torch.zeros(4)))


def test_models_without_sdpa_get_the_eager_fallback():
    assert longmem_attention_name("sdpa", supports_sdpa=False) == EAGER_ATTENTION_NAME
    assert longmem_attention_name("flex_attention", supports_sdpa=False) == EAGER_ATTENTION_NAME
    assert longmem_attention_name("sdpa") == ATTENTION_NAME


# --------------------------------------------------------------------------------------------- the math
def _gpt_oss_eager():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    return eager_attention_forward


def test_features_softmax_with_sinks_equals_gpt_oss_eager():
    """Grouped logits ``[b, Hkv, g * q, n]`` with :meth:`sink_logits` rows == GPT-OSS's eager attention."""
    torch.manual_seed(0)
    batch, q_heads, kv_heads, num_q, n, dim = 2, 6, 2, 3, 7, 8
    group = q_heads // kv_heads
    query, key, value = (
        torch.randn(batch, q_heads, num_q, dim),
        torch.randn(batch, kv_heads, n, dim),
        torch.randn(batch, kv_heads, n, dim),
    )
    sinks = torch.randn(q_heads) * 3
    module = types.SimpleNamespace(num_key_value_groups=group, training=False, sinks=sinks)
    expected, _ = _gpt_oss_eager()(module, query, key, value, None, scaling=0.3)
    features = AttentionFeatures(scaling=0.3, sinks=sinks)
    logits = query.reshape(batch, kv_heads, group * num_q, dim) @ key.transpose(-1, -2) * 0.3
    probs = features.softmax(logits, features.sink_logits(kv_heads, num_q, logits.dtype))
    out = (probs @ value).reshape(batch, q_heads, num_q, dim).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # the same sinks merged from a log-sum-exp (the kernels' way)
    plain = torch.softmax(logits, -1) @ value
    lse = torch.logsumexp(logits, -1)
    merged, _ = features.add_sinks(plain.reshape(batch, q_heads, num_q, dim), lse.reshape(batch, q_heads, num_q))
    torch.testing.assert_close(merged.transpose(1, 2), expected, atol=1e-6, rtol=1e-5)


def test_head_subset_module_slices_sinks_for_the_models_own_attention():
    torch.manual_seed(1)
    query, key = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8)
    sinks = torch.randn(4) * 3
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, sinks=sinks)
    full, _ = _gpt_oss_eager()(module, query, key, key, None, scaling=0.35)
    heads = torch.tensor([2, 3])  # the query group of KV head 1
    part, _ = _gpt_oss_eager()(
        HeadSubsetModule(module, heads), query[:, heads], key[:, 1:], key[:, 1:], None, scaling=0.35
    )
    torch.testing.assert_close(part, full[:, :, heads])
    assert AttentionFeatures(scaling=1.0, sinks=sinks).head_subset(heads).sinks.tolist() == sinks[heads].tolist()


def test_softcap_is_tanh_before_the_mask():
    logits = torch.tensor([-30.0, -1.0, 0.0, 2.0, 40.0])
    torch.testing.assert_close(AttentionFeatures(scaling=1.0, softcap=5.0).cap(logits), torch.tanh(logits / 5) * 5)
    assert AttentionFeatures(scaling=1.0).cap(logits) is logits


@pytest.mark.parametrize("window", [1, 3, 6])
def test_window_matches_transformers_overlay_and_slot_mask(window):
    positions = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.int32)
    num_q = 3
    overlay = sliding_window_overlay(window)
    allowed = AttentionFeatures(scaling=1.0, sliding_window=window).window_allows(positions[:, -num_q:], positions)
    for row in range(2):
        for i, q_pos in enumerate(positions[row, -num_q:].tolist()):
            for j, k_pos in enumerate(positions[row].tolist()):
                if k_pos >= 0:
                    assert bool(allowed[row, i, j]) == overlay(0, 0, q_pos, k_pos), (row, q_pos, k_pos)
    mask = slot_mask(positions, num_q, sliding_window=window)[:, 0]  # [b, q, n]
    plain = slot_mask(positions, num_q)[:, 0]
    torch.testing.assert_close(mask, plain & allowed | (mask & ~plain))  # window only removes slots
    assert mask.any(-1).all()  # every query still sees itself


def test_features_of_a_gemma2_and_gpt_oss_call():
    query = torch.zeros(1, 4, 1, 8)
    gemma = types.SimpleNamespace(training=False)
    features = AttentionFeatures.of_call(gemma, query, 0.125, 0.1, {"softcap": 50.0, "sliding_window": None})
    assert (features.scaling, features.softcap, features.sinks, features.dropout) == (0.125, 50.0, None, 0.0)
    oss = types.SimpleNamespace(training=True, sinks=torch.ones(4))
    features = AttentionFeatures.of_call(oss, query, None, 0.1, {"s_aux": oss.sinks, "sliding_window": 128})
    assert features.sinks is oss.sinks and features.sliding_window == 128 and features.dropout == 0.1
    assert features.scaling == 8**-0.5
    with pytest.raises(ValueError, match="attention sinks"):
        features.refuse("Toy", oss, sinks=True)
    with pytest.raises(ValueError, match="per query head|one per query"):
        AttentionFeatures.of_call(types.SimpleNamespace(training=False, sinks=torch.ones(3)), query, None, 0.0, {})


# ----------------------------------------------------------------------------- what really reaches the function
#: Architectures whose tiny forward covers every kind of kwarg seen at run time across transformers' causal LMs
#: (``**kwargs`` pass-through flags, softcap, sinks, sliding windows, MoE router flags, explicit ``position_ids``,
#: cross-attention and position-bias kwargs).
RUNTIME_SURVEY = ("llama", "gemma2", "gpt_oss", "granite_swa", "qwen2_moe", "stablelm", "bert", "inkling_text")
TINY_SIZES = dict(
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    vocab_size=64,
    max_position_embeddings=64,
    num_local_experts=2,
    num_experts=2,
    num_experts_per_tok=1,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
)


def _tiny_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    text = config.get_text_config(decoder=True)
    for name, value in TINY_SIZES.items():
        if hasattr(text, name) and not isinstance(getattr(text, name), (list, dict)):
            setattr(text, name, value)
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:2]
    return config


@pytest.mark.parametrize("model_type", RUNTIME_SURVEY)
def test_runtime_kwargs_are_known(model_type):
    """The kwargs a tiny forward really passes to the attention function (``**kwargs`` included) are all known;
    a cache layer accepts them, or refuses a feature it cannot run by name."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"{model_type} is not in this transformers")
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append((module, dict(kwargs)))
        eager = inspect.getmodule(type(module)).eager_attention_forward
        return eager(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hf_longmem_test_recording", recording)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type), attn_implementation="hf_longmem_test_recording")
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5, 6]]))
    assert calls
    names = set().union(*(kwargs for _, kwargs in calls))
    assert names <= KNOWN_KWARGS, f"{model_type} passes unknown attention kwargs {sorted(names - KNOWN_KWARGS)}"
    if model_type == "inkling_text":  # an additive position bias: refused by name
        with pytest.raises(ValueError, match="position bias"):
            check_attention_kwargs(*calls[0])
    else:
        for module, kwargs in calls:
            check_attention_kwargs(module, kwargs)
            AttentionFeatures.of_call(
                module, torch.zeros(1, model.config.num_attention_heads, 1, 16), None, 0.0, kwargs
            )
