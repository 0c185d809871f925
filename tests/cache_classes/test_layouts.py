"""Cache layouts across architectures: all-sliding models (Mistral-7B-v0.1's `sliding_window`), hybrid models,
multi-head latent attention, and D2O's uncompressed layers on shallow models."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DeepseekV3Config, DynamicCache, Gemma2Config
from transformers.cache_utils import DynamicSlidingWindowLayer

from hf_longmem import make_cache
from hf_longmem.cache_classes.base import cache_memory_bytes
from tests.helpers.reference import greedy, masked_logits, streaming_visibility
from tests.helpers.tiny_models import random_ids, tiny_config, tiny_model

WINDOW = 8


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o", "streaming"])
def test_all_sliding_model_at_full_budget_equals_dynamic_cache(name):
    model = tiny_model("mistral", sliding_window=WINDOW)
    ids = random_ids(1, 14)
    options = {"budget": 64, **({"window_size": 2} if "kv" in name else {})}  # >= window - 1: nothing to compress
    cache = make_cache(name, model, **options)
    assert all(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)  # holds window - 1 already
    seq, logits = greedy(model, ids, cache, max_new_tokens=10)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(config=model.config), max_new_tokens=10)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_compressed_sliding_layer_hides_what_the_window_hides(attn_impl):
    """SnapKV below the window but above the prompt evicts nothing: decoding far past the window must then be
    exactly the model's sliding-window attention (tokens that left the window hidden, then dropped)."""
    model = tiny_model("mistral", attn_impl, sliding_window=WINDOW)
    ids = random_ids(1, 5)
    cache = make_cache("snapkv", model, budget=6, window_size=2)
    assert all(layer.sliding_window == WINDOW for layer in cache.layers)
    seq, logits = greedy(model, ids, cache, max_new_tokens=14)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(config=model.config), max_new_tokens=14)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert max(layer.get_stored_length() for layer in cache.layers) <= WINDOW - 1


def test_compressed_sliding_layers_hold_fewer_bytes():
    model = tiny_model("mistral", sliding_window=WINDOW)
    ids = random_ids(1, 14)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=reference)
    snapkv = make_cache("snapkv", model, budget=4, window_size=2)
    with torch.no_grad():
        model(ids, cache=snapkv)  # SnapKV's budget is the prompt's: generated tokens are added on top
    assert 0 < cache_memory_bytes(snapkv) < cache_memory_bytes(reference)
    h2o = make_cache("h2o", model, budget=4)
    greedy(model, ids, h2o, max_new_tokens=6)
    reference_after = DynamicCache(config=model.config)
    greedy(model, ids, reference_after, max_new_tokens=6)
    assert max(layer.get_stored_length() for layer in h2o.layers) == 4
    assert 0 < cache_memory_bytes(h2o) < cache_memory_bytes(reference_after)


@pytest.mark.parametrize("name", ["snapkv", "h2o"])
def test_compressed_sliding_layers_padded_batch_equals_rows_alone(name):
    model = tiny_model("mistral", sliding_window=WINDOW)
    long_row, short_row = random_ids(1, 20, seed=1), random_ids(1, 11, seed=2)
    batch = torch.cat((long_row, torch.cat((torch.zeros(1, 9, dtype=torch.long), short_row), dim=1)))
    mask = (batch != 0).long()
    options = {"budget": 5, **({"window_size": 2} if name == "snapkv" else {})}
    seq, logits = greedy(
        model, batch, make_cache(name, model, **options), attention_mask=mask, pad_token_id=0, max_new_tokens=8
    )
    for row, ids in enumerate((long_row, short_row)):
        row_seq, row_logits = greedy(model, ids, make_cache(name, model, **options), max_new_tokens=8)
        assert torch.equal(seq[row, 20:], row_seq[0, ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_streaming_on_sliding_layers_sees_its_sinks_and_recent_tokens_inside_the_window_only(attn_impl):
    """Reference: one full forward where token i sees j iff StreamingLLM keeps j for i AND i - j < window."""
    model = tiny_model("mistral", attn_impl, sliding_window=WINDOW)
    prompt, new, budget, sink = 6, 10, 5, 1
    cache = make_cache("streaming", model, budget=budget, sink_size=sink)
    assert all(layer.sliding_window == WINDOW for layer in cache.layers)
    seq, logits = greedy(model, random_ids(1, prompt), cache, max_new_tokens=new)
    total = prompt + new - 1
    i, j = torch.arange(total)[:, None], torch.arange(total)[None, :]
    allowed = streaming_visibility(total, prompt, budget, sink) & (i - j < WINDOW)
    reference = masked_logits(model, seq[:, :total], allowed)[prompt - 1 :]
    torch.testing.assert_close(logits[:, 0], reference, rtol=1e-4, atol=1e-4)
    assert max(layer.get_stored_length() for layer in cache.layers) <= budget


def test_streaming_on_sliding_layers_padded_batch_equals_rows_alone():
    model = tiny_model("mistral", sliding_window=WINDOW)
    long_row, short_row = random_ids(1, 20, seed=1), random_ids(1, 11, seed=2)
    batch = torch.cat((long_row, torch.cat((torch.zeros(1, 9, dtype=torch.long), short_row), dim=1)))
    options = {"budget": 5, "sink_size": 1}
    seq, logits = greedy(
        model,
        batch,
        make_cache("streaming", model, **options),
        attention_mask=(batch != 0).long(),
        pad_token_id=0,
        max_new_tokens=8,
    )
    for row, ids in enumerate((long_row, short_row)):
        row_seq, row_logits = greedy(model, ids, make_cache("streaming", model, **options), max_new_tokens=8)
        assert torch.equal(seq[row, 20:], row_seq[0, ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)


def test_a_compressed_sliding_layer_without_hf_longmem_attention_is_refused_before_the_second_token():
    from hf_longmem import StreamingCache

    model = tiny_model("mistral", sliding_window=WINDOW)  # SDPA: the layer's own window never gets applied
    cache = StreamingCache(budget=4, sink_size=1, config=model.config)
    with pytest.raises(ValueError, match="enable_longmem_attention"):
        greedy(model, random_ids(1, 12), cache, max_new_tokens=3)


@pytest.mark.parametrize(
    "name, options",
    [
        ("kvmerger", dict(budget=4, window_size=2)),
        ("d2o", dict(budget=6)),
        ("think", dict(budget=4, window_size=2)),
        ("duo_attention", dict(head_pattern=False, sink_size=1, recent_size=3)),
    ],
)
def test_methods_that_cannot_compress_sliding_layers_are_refused_on_all_sliding_models(name, options):
    """Their budget would not apply (the cache would hold what transformers' sliding cache holds): refused."""
    model = tiny_model("mistral", sliding_window=WINDOW)
    with pytest.raises(ValueError, match="every layer of this model is sliding-window attention"):
        make_cache(name, model, **options)
    assert model.config._attn_implementation == "sdpa"  # the refusal left the model as it was
    cache = make_cache("kvmerger", model, budget=WINDOW, window_size=2)  # a budget >= window - 1: nothing to do
    assert all(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)


def test_hybrid_models_keep_their_sliding_layers_and_compress_the_full_ones():
    config = Gemma2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = make_cache("h2o", config, budget=4)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == [
        "DynamicSlidingWindowLayer" if t == "sliding_attention" else "H2OLayer" for t in config.layer_types
    ]
    assert "H2OLayer" in kinds and "DynamicSlidingWindowLayer" in kinds


@pytest.mark.parametrize(
    "name", ["streaming", "snapkv", "h2o", "d2o", "kvmerger", "sirllm", "think", "duo_attention", "infllm"]
)
def test_multi_head_latent_attention_is_refused_when_the_cache_is_built(name):
    config = DeepseekV3Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
    )
    with pytest.raises(ValueError, match="multi-head latent attention"):
        make_cache(name, config)


def test_unsupported_layer_types_keep_their_clear_error():
    config = tiny_config("llama_gqa")
    config.layer_types = ["full_attention", "chunked_attention"]
    config.attention_chunk_size = 4
    with pytest.raises(ValueError, match="chunked_attention"):
        make_cache("snapkv", config, budget=8, window_size=2)


def test_alibi_models_are_refused_when_the_cache_is_built():
    from transformers import BloomConfig, FalconConfig

    for config in (BloomConfig(n_layer=2, hidden_size=32, n_head=2), FalconConfig(num_hidden_layers=2, alibi=True)):
        with pytest.raises(ValueError, match="ALiBi"):
            make_cache("streaming", config, budget=8)
    make_cache("streaming", FalconConfig(num_hidden_layers=2, alibi=False), budget=8)  # rotary Falcon is fine
