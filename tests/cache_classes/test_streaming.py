"""StreamingLLM: what is kept, the positions it is kept at, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_longmem import StreamingCache, make_cache
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy, masked_logits, streaming_visibility
from tests.helpers.rope_models import SHIFT_ARCHS, arch_model
from tests.helpers.tiny_models import random_ids, tiny_config, tiny_model

# The shared cache suites (tests/helpers/cache_cases.py): true positions, and the re-rotating variant.
CACHE_CASES = [
    CacheCase("streaming", options={"sink_size": 4}, matrix_shift={"position_mode": "shift"}),
    CacheCase("streaming", label="streaming_shift", options={"sink_size": 4, "position_mode": "shift"}),
]


@pytest.mark.parametrize("shape", ["llama_mha", "qwen2"])
def test_true_positions_equal_masking_the_evicted_tokens(shape, attn_impl):
    model = tiny_model(shape, attn_impl)
    prompt, budget, sink = 30, 12, 4
    seq, logits = greedy(model, random_ids(1, prompt), make_cache("streaming", model, budget=budget, sink_size=sink))
    total = seq.shape[1] - 1
    ref = masked_logits(model, seq[:, :total], streaming_visibility(total, prompt, budget, sink))
    torch.testing.assert_close(logits[:, 0], ref[prompt - 1 :], rtol=1e-4, atol=1e-4)


def test_shift_gives_contiguous_positions_inside_the_cache():
    """One layer: the step after eviction must equal a fresh forward over the kept tokens at positions 0..S."""
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    prompt, budget, sink = 24, 10, 3
    ids = random_ids(1, prompt)
    cache = make_cache("streaming", model, budget=budget, sink_size=sink, position_mode="shift")
    with torch.no_grad():
        model(ids, cache=cache)  # prefill, then compress to sinks + last 7
        nxt = random_ids(1, 1, seed=5)
        step = model(nxt, cache=cache, position_ids=torch.tensor([[prompt]])).logits[0, -1]
        kept = torch.cat((ids[:, :sink], ids[:, prompt - (budget - sink) :], nxt), dim=1)
        fresh = model(kept).logits[0, -1]
    torch.testing.assert_close(step, fresh, rtol=1e-4, atol=1e-4)


def test_shift_lets_generation_run_past_the_position_range_with_bounded_distances():
    model = tiny_model("llama_gqa")
    cache = make_cache("streaming", model, budget=8, sink_size=2, position_mode="shift")
    seq, logits = greedy(model, random_ids(1, 20), cache, max_new_tokens=10)
    assert torch.isfinite(logits).all()
    layer = cache.layers[0]
    # stored positions keep the TRUE positions (the shift is applied to the view attended to)
    assert layer.positions[0, 0].tolist() == [0, 1] + list(range(seq.shape[1] - 1 - 6, seq.shape[1] - 1))


@pytest.mark.parametrize("arch", list(SHIFT_ARCHS))
def test_shift_equals_the_model_on_the_kept_tokens_at_the_shifted_positions(arch):
    """Rule (g) of issue 15: after eviction, the logits equal a fresh run over the kept tokens at 0..S."""
    model = arch_model(arch, 1, **SHIFT_ARCHS[arch])
    prompt, budget, sink = 24, 10, 3
    ids = random_ids(1, prompt)
    cache = make_cache("streaming", model, budget=budget, sink_size=sink, position_mode="shift")
    with torch.no_grad():
        model(ids, cache=cache)  # prefill, then compress to sinks + last 7
        nxt = random_ids(1, 2, seed=5)
        step = model(nxt[:, :1], cache=cache, position_ids=torch.tensor([[prompt]])).logits[0, -1]
        step2 = model(nxt[:, 1:], cache=cache, position_ids=torch.tensor([[prompt + 1]])).logits[0, -1]
        kept = torch.cat((ids[:, :sink], ids[:, prompt - (budget - sink) :], nxt[:, :1]), dim=1)
        fresh = model(kept).logits[0, -1]
        kept2 = torch.cat((ids[:, :sink], ids[:, prompt - (budget - sink) + 1 :], nxt), dim=1)  # evicted again
        fresh2 = model(kept2).logits[0, -1]
    torch.testing.assert_close(step, fresh, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step2, fresh2, rtol=1e-4, atol=1e-4)


def test_each_cache_layer_rotates_with_its_own_decoder_layers_rotation():
    """Deeper models (where a fresh run on the kept tokens is not a reference): layer ``i`` gets layer ``i``'s RoPE."""
    smol = make_cache(
        "streaming", arch_model("smollm3", 3, no_rope_layers=[1, 0, 1]), budget=8, sink_size=2, position_mode="shift"
    )
    assert [layer.rotary is None for layer in smol.layers] == [False, True, False]  # NoPE: nothing to rotate
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    gemma = arch_model("gemma3", 4, layer_types=types)
    cache = make_cache("streaming", gemma, budget=8, sink_size=2, position_mode="shift")
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicSlidingWindowLayer", "StreamingLayer"] * 2
    assert cache.layers[1].rotary.call_kwargs == {"layer_type": "full_attention"}
    seq, logits = greedy(gemma, random_ids(1, 20), cache, max_new_tokens=4)
    assert torch.isfinite(logits).all() and cache.get_stored_length(1) == 8


def test_shift_from_a_config_alone_uses_the_same_rotation_as_from_the_model():
    model = arch_model("cohere", 1)
    by_config = StreamingCache(budget=8, sink_size=2, position_mode="shift", config=model.config)
    by_model = make_cache("streaming", model, budget=8, sink_size=2, position_mode="shift")
    ids = random_ids(1, 20)
    seq_config, logits_config = greedy(model, ids, by_config, max_new_tokens=4)
    seq_model, logits_model = greedy(model, ids, by_model, max_new_tokens=4)
    assert torch.equal(seq_config, seq_model)
    torch.testing.assert_close(logits_config, logits_model)


@pytest.mark.parametrize(
    "model_type, overrides, match",
    [
        ("gpt2", dict(n_embd=64, n_head=4, n_layer=1), "no rotary embedding"),
        (
            "deepseek_v3",
            dict(
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
                n_routed_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
            ),
            "latent attention",
        ),
    ],
)
def test_shift_refuses_what_it_cannot_rotate_exactly_when_the_cache_is_built(model_type, overrides, match):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=match):
        make_cache("streaming", model, budget=8, sink_size=2, position_mode="shift")
    if model_type == "deepseek_v3":  # MLA caches latents: every hf_longmem cache refuses the layout
        with pytest.raises(ValueError, match="multi-head latent attention"):
            make_cache("streaming", model, budget=8, sink_size=2)
    else:
        make_cache("streaming", model, budget=8, sink_size=2)  # true positions need no RoPE


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget=4, sink_size=4), "budget"),
        (dict(budget=0), "budget"),
        (dict(budget=16.5), "budget"),
        (dict(budget=16, sink_size=-1), "sink_size"),
        (dict(budget=16, position_mode="rerotate"), "position_mode"),
        (dict(budget=16, position_mode="shift"), "position_mode='shift' needs"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamingCache(**kwargs)


def test_shift_refuses_a_rope_that_is_not_linear_in_position():
    config = tiny_config("llama_gqa", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type"):
        StreamingCache(budget=16, position_mode="shift", config=config)
