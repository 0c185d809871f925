"""Caches that compute attention themselves honour the model's attention features (issue 15, item 2).

Tiny random Gemma-2 (logit softcap 1.0 that the logits reach, ``query_pre_attn_scalar`` scaling, sliding layers) and
GPT-OSS (attention sinks of a few units, sliding layers): at full budget ThinK, InfLLM, EM-LLM, DuoAttention (two
head groups per layer) and SnapKV give the greedy tokens and logits of ``DynamicCache``. With every layer ours
(``config=None``), the sliding layers' window reaches our own paths too (ThinK's packed prompt, DuoAttention's
group masks); InfLLM refuses a sliding window with a ``ValueError`` naming it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Gemma2Config, GptOssConfig

import hf_longmem
from hf_longmem import make_cache
from hf_longmem.cache_classes.duo_attention import DuoAttentionCache
from hf_longmem.cache_classes.think import ThinKCache
from tests.helpers.tiny_models import TINY_DECODER

VOCAB, PROMPT, NEW = TINY_DECODER["vocab_size"], 12, 6
#: float32 logits: a few ulps of a 2-layer model's O(10) logits after a different summation order
ATOL, RTOL = 2e-4, 1e-4


def _common(**overrides):
    kwargs = dict(TINY_DECODER, intermediate_size=64, layer_types=["sliding_attention", "full_attention"])
    kwargs.update(overrides)
    return kwargs


def tiny_gemma2(sliding_window: int = 5, softcap: float | None = 1.0):
    """Gemma-2, logit softcap 1.0 (the logits reach it), scaling ``query_pre_attn_scalar ** -0.5`` != ``d ** -0.5``."""
    config = Gemma2Config(
        **_common(sliding_window=sliding_window),
        attn_logit_softcapping=softcap,
        final_logit_softcapping=None,
        query_pre_attn_scalar=8,
    )
    return _build(config)


def tiny_gpt_oss(sliding_window: int = 5):
    """GPT-OSS with sink logits of a few units (``normal_(0, 3)``) and a small MoE; plain RoPE."""
    config = GptOssConfig(
        **_common(sliding_window=sliding_window),
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = _build(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 3.0)
    return model


def _build(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


MODELS = {"gemma2": tiny_gemma2, "gpt_oss": tiny_gpt_oss}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def _generate(model, cache):
    out = model.generate(
        _ids(), cache=cache, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences, torch.stack(out.logits)


def _assert_same_as_dynamic(model, cache):
    ref_tokens, ref_logits = _generate(model, DynamicCache(config=model.config))
    tokens, logits = _generate(model, cache)
    assert torch.equal(tokens, ref_tokens), f"greedy tokens differ: {tokens.tolist()} vs {ref_tokens.tolist()}"
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL)


def _duo_pattern(model):
    # two groups in every layer: query heads of KV head 0 retrieval, of KV head 1 streaming (and the reverse)
    return torch.tensor([[True, False], [False, True]])


FULL_BUDGET = {
    # ratio 0.05 of 16 channels prunes none: the packed-prompt path runs with every channel
    "think": lambda model: make_cache("think", model, base="full", key_channel_ratio=0.05),
    "think_snapkv": lambda model: make_cache("think", model, base="snapkv", budget=64, key_channel_ratio=0.05),
    "infllm": lambda model: make_cache(
        "infllm", model, n_init=2, n_local=64, block_size=4, topk=2, repr_topk=2, max_cached_blocks=4, exc_block_size=5
    ),
    "emllm": lambda model: make_cache(
        "emllm", model, n_init=2, n_local=64, n_mem=16, min_block_size=2, max_block_size=4, exc_block_size=5
    ),
    "duo_attention": lambda model: make_cache(
        "duo_attention", model, head_pattern=_duo_pattern(model), sink_size=2, recent_size=64
    ),
    "snapkv": lambda model: make_cache("snapkv", model, budget=64),
}


@pytest.mark.parametrize("method", list(FULL_BUDGET))
def test_full_budget_equals_dynamic_cache(model, method):
    _assert_same_as_dynamic(model, FULL_BUDGET[method](model))


def test_features_matter_on_these_models(model):
    """The cap / sinks change the tokens' logits here (else the parity above would prove nothing)."""
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
        if hasattr(model.model.layers[0].self_attn, "sinks"):
            saved = [layer.self_attn.sinks.clone() for layer in model.model.layers]
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(-1e4)
            plain = model(ids).logits
            for layer, sinks in zip(model.model.layers, saved):
                layer.self_attn.sinks.copy_(sinks)
        else:
            for layer in model.model.layers:
                layer.self_attn.attn_logit_softcapping = None
            plain = model(ids).logits
            for layer in model.model.layers:
                layer.self_attn.attn_logit_softcapping = model.config.attn_logit_softcapping
    assert (plain - reference).abs().max() > 0.1


# ------------------------------------------------------------------ every layer ours: the sliding window reaches us
def test_think_on_sliding_layers_applies_the_window(model):
    """``config=None``: every layer (sliding ones too) is a ThinK layer; the prompt (12) exceeds the window (5)."""
    hf_longmem.enable_longmem_attention(model)
    _assert_same_as_dynamic(model, ThinKCache(base="full", key_channel_ratio=0.05))


def test_duo_attention_on_sliding_layers_applies_the_window(model):
    hf_longmem.enable_longmem_attention(model)
    _assert_same_as_dynamic(model, DuoAttentionCache(head_pattern=_duo_pattern(model), sink_size=2, recent_size=64))


def test_infllm_refuses_a_sliding_window(model):
    from hf_longmem.cache_classes.infllm import InfLLMCache

    hf_longmem.enable_longmem_attention(model)
    options = dict(n_init=2, n_local=64, block_size=4, topk=2, repr_topk=2, max_cached_blocks=4, exc_block_size=5)
    rotary = InfLLMCache.from_model(model, **options).rotary
    cache_all_layers = InfLLMCache(**options, rotary=rotary)
    with pytest.raises(ValueError, match="sliding window"):
        model(_ids(), cache=cache_all_layers)


def test_think_triton_path_applies_softcap_and_sinks(model, monkeypatch):
    """ThinK's Triton kernel (interpreted on CPU): softcap in the kernel, sinks merged from its log-sum-exp."""
    pytest.importorskip("triton")
    from hf_longmem.cache_classes.think import ThinKLayer

    monkeypatch.setattr(ThinKLayer, "kernel_backend", "triton")
    _assert_same_as_dynamic(model, FULL_BUDGET["think"](model))


def test_infllm_refuses_attention_dropout_in_training():
    model = tiny_gemma2()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    cache = FULL_BUDGET["infllm"](model)
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(_ids(), cache=cache)
    model.eval()  # no dropout at inference: the same cache type runs
    model(_ids(), cache=FULL_BUDGET["infllm"](model))


def test_scored_triton_decode_applies_softcap_and_sinks(model, monkeypatch):
    """SnapKV decoding with the Triton flash-decoding kernel (interpreted on CPU) == DynamicCache."""
    pytest.importorskip("triton")
    from hf_longmem.cache_classes.scored import ScoredLayer

    monkeypatch.setattr(ScoredLayer, "kernel_backend", "triton")
    _assert_same_as_dynamic(model, FULL_BUDGET["snapkv"](model))


def test_infllm_layers_on_sliding_layers_are_refused_at_construction():
    from hf_longmem.cache_classes.infllm import InfLLMLayer, refuse_sliding_layers

    config = tiny_gemma2().config  # layer 0 sliding, layer 1 full
    options = dict(n_init=2, n_local=8, block_size=4, topk=1, repr_topk=1, max_cached_blocks=1, exc_block_size=4)
    layers = [InfLLMLayer(None, **options), InfLLMLayer(None, **options)]
    with pytest.raises(ValueError, match=r"sliding window \(layers \[0\]"):
        refuse_sliding_layers("InfLLMCache", layers, config)
    refuse_sliding_layers("InfLLMCache", [DynamicCache(config=config).layers[0], layers[1]], config)


def test_h2o_scores_are_the_models_own_attention_probabilities(model):
    """Eviction scores use the model's softcapped logits / sinks: H2O's prefill scores of the full layer equal the
    column sums of the model's eager attention weights (group-averaged)."""
    ids = _ids()
    cache = make_cache("h2o", model, budget=64)
    with torch.no_grad():
        model(ids, cache=cache)
        attentions = model(ids, output_attentions=True).attentions[1]  # [1, Hq, T, T], layer 1 is full attention
    expected = attentions.sum(2).view(1, 2, -1, attentions.shape[-1]).mean(2)
    torch.testing.assert_close(cache.layers[1].scores, expected, rtol=1e-4, atol=1e-5)


class _NoRotation:
    """A RoPE-free model: memory placed "at a constant distance" is the tokens' own keys."""

    def rotate(self, states, delta, *, query=False):
        return states


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_infllm_memory_path_applies_softcap_and_sinks(backend, monkeypatch):
    """Beyond full budget: window + initial tokens + every memory block (topk >= blocks) without RoPE is full
    attention, so InfLLM's merged local/memory/sink softmax must equal eager attention with softcap and sinks."""
    from hf_longmem.cache_classes.infllm import InfLLMLayer

    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setattr(InfLLMLayer, "kernel_backend", backend)
    torch.manual_seed(0)
    q_heads, kv_heads, dim, total, scaling, cap = 4, 2, 8, 14, 0.5, 1.5
    queries, keys, values = (
        torch.randn(1, q_heads, total, dim) * 3,
        torch.randn(1, kv_heads, total, dim) * 3,
        torch.randn(1, kv_heads, total, dim),
    )
    sinks = torch.randn(q_heads) * 3
    module = type("Attention", (), {"training": False, "sinks": sinks})()
    layer = InfLLMLayer(
        _NoRotation(), n_init=2, n_local=4, block_size=2, topk=16, repr_topk=1, max_cached_blocks=16, exc_block_size=3
    )
    outputs = []
    for start, stop in [(0, 9), *((t, t + 1) for t in range(9, total))]:  # a chunked prefill, then decoding
        attn_kwargs = {"position_ids": torch.arange(start, stop)[None], "softcap": cap, "s_aux": sinks}
        layer.update(keys[:, :, start:stop], values[:, :, start:stop], 0, kwargs=attn_kwargs)
        attn_kwargs.pop("longmem_layer")
        out, _ = layer.attend(module, queries[:, :, start:stop], None, None, None, scaling=scaling, **attn_kwargs)
        outputs.append(out)
    assert layer.store.num_blocks(0) > 0 and layer.init_keys.shape[-2] == 2  # memory really took part
    from transformers.models.gpt_oss.modeling_gpt_oss import repeat_kv

    logits = torch.tanh(queries @ repeat_kv(keys, 2).transpose(-1, -2) * scaling / cap) * cap
    logits = logits.masked_fill(torch.ones(total, total, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(torch.cat((logits, sinks.view(1, -1, 1, 1).expand(1, -1, total, 1)), -1), -1)[..., :-1]
    expected = (probs @ repeat_kv(values, 2)).transpose(1, 2)
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=2e-5, rtol=1e-4)
