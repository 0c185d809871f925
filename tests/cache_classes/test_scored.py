"""H2O, SnapKV and PyramidKV: scores, what they keep, budgets, and the attention requirement."""

from __future__ import annotations

import pytest
import torch

from hf_longmem import H2OCache, PyramidKVCache, SnapKVCache, make_cache
from hf_longmem.cache_classes.snapkv import pyramid_budgets
from hf_longmem.memory.scoring import column_scores, pool_scores
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_config, tiny_model


def _prompt_compressed_once(options, prompt, decoded, layer, cache, row):
    """SnapKV: the prompt is compressed once to the budget; generated tokens are appended."""
    return options["budget"] + decoded


def _pyramid_kept(options, prompt, decoded, layer, cache, row):
    """PyramidKV: the prompt is compressed once to the layer's share of the pyramid; generated tokens are appended."""
    budgets = pyramid_budgets(options["budget"], options["window_size"], len(cache.layers), prompt, beta=20)
    return budgets[layer] + decoded


# The shared cache suites (tests/helpers/cache_cases.py): an observation window shorter than the tiny prompts.
CACHE_CASES = [
    CacheCase("h2o"),
    CacheCase("snapkv", options={"window_size": 4}, kept=_prompt_compressed_once, matrix_small={"window_size": 4}),
    CacheCase("pyramidkv", options={"window_size": 4}, kept=_pyramid_kept, matrix_small={"window_size": 4}),
]


def eager_column_sums(model, ids, layer_idx, num_queries=None):
    """Brute force: eager attention probabilities of a layer, summed over queries, averaged over each GQA group."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions[layer_idx]  # [1, Hq, T, T]
    model.set_attn_implementation("sdpa")
    if num_queries is not None:
        attentions = attentions[:, :, -num_queries:]
    kv_heads = model.config.num_key_value_heads
    return attentions.sum(2).view(1, kv_heads, -1, attentions.shape[-1]).mean(2)


def test_h2o_prefill_scores_equal_eager_attention_column_sums():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 24)
    cache = make_cache("h2o", model, budget=64)
    with torch.no_grad():
        model(ids, cache=cache)
    for layer_idx, layer in enumerate(cache.layers):
        torch.testing.assert_close(layer.scores, eager_column_sums(model, ids, layer_idx), rtol=1e-4, atol=1e-5)


def test_h2o_scores_accumulate_over_decoding_and_follow_eviction():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 20)
    cache = make_cache("h2o", model, budget=10)
    seq, _ = greedy(model, ids, cache, max_new_tokens=4)
    layer = cache.layers[0]
    assert layer.scores.shape == (1, 2, 10)
    # every kept score is the attention that token received from all queries so far (up to eviction of others),
    # so it is at least what the last step gave it and at most the number of queries that could see it
    assert (layer.scores >= 0).all() and (layer.scores <= seq.shape[1]).all()
    # the recent window (5 newest) is always kept
    newest = torch.arange(seq.shape[1] - 1 - 5, seq.shape[1] - 1, dtype=torch.int32)
    assert (layer.positions[0, :, -5:] == newest).all()


def test_h2o_keeps_a_planted_heavy_hitter():
    """A key aligned with every query dominates the accumulated attention and must survive eviction."""
    keys = torch.randn(1, 1, 30, 8)
    query = torch.randn(1, 1, 30, 8)
    keys[0, 0, 3] = query[0, 0].mean(0) * 50
    scores = column_scores(query, keys, None, 8**-0.5)
    assert scores[0, 0].argmax() == 3


def test_snapkv_window_scores_and_pooling_match_brute_force():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 24)
    raw = eager_column_sums(model, ids, 0, num_queries=6)
    pooled = pool_scores(raw, 5, "avg")
    manual = torch.nn.functional.avg_pool1d(raw, 5, stride=1, padding=2, count_include_pad=False)
    torch.testing.assert_close(pooled, manual)
    maxed = pool_scores(raw, 3, "max")
    assert torch.equal(maxed[..., 1:-1], torch.stack((raw[..., :-2], raw[..., 1:-1], raw[..., 2:])).amax(0))


def test_snapkv_keeps_the_window_and_the_needle():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 40)
    budget, window = 12, 4
    cache = make_cache("snapkv", model, budget=budget, window_size=window, kernel_size=1)
    with torch.no_grad():
        model(ids, cache=cache)
    raw = eager_column_sums(model, ids, 0, num_queries=window)
    layer = cache.layers[0]
    for head in range(2):
        kept = layer.positions[0, head].tolist()
        assert kept[-window:] == list(range(40 - window, 40))
        expected_heavy = raw[0, head, : 40 - window].topk(budget - window).indices.sort().values.tolist()
        assert kept[:-window] == expected_heavy


def test_snapkv_compresses_the_prompt_once_and_appends_generated_tokens():
    model = tiny_model("llama_gqa")
    cache = make_cache("snapkv", model, budget=12, window_size=4)
    greedy(model, random_ids(1, 30), cache, max_new_tokens=6)
    assert cache.get_stored_length() == 12 + 5
    assert cache.get_seq_length() == 35


def test_pyramid_budgets_decrease_average_and_never_reach_zero():
    budgets = pyramid_budgets(budget=64, window_size=8, num_layers=8, prompt_length=1000, beta=20)
    assert budgets == sorted(budgets, reverse=True)
    assert abs(sum(budgets) / len(budgets) - 64) <= 8
    assert min(budgets) >= 8 + 1
    assert pyramid_budgets(budget=9, window_size=8, num_layers=3, prompt_length=1000, beta=20)[-1] == 9
    assert pyramid_budgets(budget=64, window_size=8, num_layers=1, prompt_length=1000, beta=20) == [64]


def test_pyramidkv_on_a_one_layer_model():
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    cache = make_cache("pyramidkv", model, budget=12, window_size=4)
    seq, logits = greedy(model, random_ids(1, 30), cache, max_new_tokens=3)
    assert torch.isfinite(logits).all()
    assert 0 < cache.get_stored_length() < 30


def test_pyramidkv_layers_store_different_lengths_and_stay_exact_per_layer():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    cache = make_cache("pyramidkv", model, budget=12, window_size=4)
    greedy(model, random_ids(1, 40), cache, max_new_tokens=3)
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]


def test_scored_caches_report_a_missing_attention_hook():
    model = tiny_model("llama_gqa")  # plain sdpa: the layer never gets the attention call
    cache = SnapKVCache(budget=8, window_size=2, config=model.config)
    with pytest.raises(RuntimeError, match="enable_longmem_attention"):
        greedy(model, random_ids(1, 12), cache, max_new_tokens=2)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: SnapKVCache(budget=32, window_size=32), "budget"),
        (lambda: SnapKVCache(budget=64, window_size=0), "window_size"),
        (lambda: SnapKVCache(budget=64, kernel_size=4), "kernel_size"),
        (lambda: SnapKVCache(budget=64, pooling="median"), "pooling"),
        (lambda: PyramidKVCache(budget=64), "config"),
        (lambda: PyramidKVCache(budget=64, beta=0, config=tiny_config("llama_gqa")), "beta"),
        (lambda: H2OCache(budget=1), "budget"),
        (lambda: H2OCache(budget=16, recent_ratio=1.0), "recent_ratio"),
    ],
)
def test_bad_arguments_name_the_argument(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize("name, options", [("h2o", {"budget": 10}), ("snapkv", {"budget": 10, "window_size": 3})])
def test_triton_score_kernel_keeps_the_same_tokens(name, options):
    pytest.importorskip("triton")
    from hf_longmem.kernels import set_kernel_backend

    model = tiny_model("llama_gqa")
    batch = torch.cat(
        (random_ids(1, 16, seed=1), torch.cat((torch.zeros(1, 4, dtype=torch.long), random_ids(1, 12)), 1))
    )
    mask = (batch != 0).long()
    ref = make_cache(name, model, **options)
    greedy(model, batch, ref, attention_mask=mask, pad_token_id=0, max_new_tokens=2)
    cache = set_kernel_backend(make_cache(name, model, **options), "triton")
    greedy(model, batch, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=2)
    for layer, ref_layer in zip(cache.layers, ref.layers):
        assert torch.equal(layer.positions, ref_layer.positions)


def test_triton_decode_attention_gives_the_same_generation():
    pytest.importorskip("triton")
    from hf_longmem.kernels import set_kernel_backend

    model = tiny_model("llama_gqa")
    batch = torch.cat(
        (random_ids(1, 16, seed=1), torch.cat((torch.zeros(1, 4, dtype=torch.long), random_ids(1, 12)), 1))
    )
    mask = (batch != 0).long()
    ref_seq, ref_logits = greedy(
        model, batch, make_cache("h2o", model, budget=10), attention_mask=mask, pad_token_id=0, max_new_tokens=3
    )
    cache = set_kernel_backend(make_cache("h2o", model, budget=10), "triton")
    seq, logits = greedy(model, batch, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=3)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_triton_decode_without_pads_skips_the_mask_and_gives_the_same_generation():
    """An unpadded batch decodes through the kernel with no mask (``valid=None``): same tokens as the torch path."""
    pytest.importorskip("triton")
    from hf_longmem.kernels import set_kernel_backend

    model = tiny_model("llama_gqa")
    batch = random_ids(2, 16, seed=3)
    ref_seq, ref_logits = greedy(model, batch, make_cache("snapkv", model, budget=10, window_size=3), max_new_tokens=3)
    cache = set_kernel_backend(make_cache("snapkv", model, budget=10, window_size=3), "triton")
    seq, logits = greedy(model, batch, cache, max_new_tokens=3)
    assert not any(layer.has_pad_slots() for layer in cache.layers)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_pool_scores_of_a_padded_row_equal_the_row_alone(pooling):
    """Pads in front of a row take no part in pooling: the first real slots pool over real slots only."""
    alone = torch.rand(2, 3, 9, generator=torch.Generator().manual_seed(0))
    padded = torch.cat((torch.zeros(2, 3, 4), alone), dim=-1)  # pads score 0, as unattended slots do
    real = torch.arange(13)[None].expand(2, 13) >= 4
    pooled = pool_scores(padded, 5, pooling, real=real)
    assert torch.equal(pooled[..., 4:], pool_scores(alone, 5, pooling))
    assert torch.equal(
        pool_scores(alone, 5, pooling), pool_scores(alone, 5, pooling, real=torch.ones(2, 9, dtype=torch.bool))
    )


@pytest.mark.parametrize("name", ["h2o", "d2o"])
def test_float32_cpu_prefill_scores_from_sdpa_log_sum_exp(monkeypatch, name):
    """H2O/D2O's float32 CPU prefill calls SDPA's flash kernel itself for its log-sum-exp: the output bits are the
    model's SDPA's, the scores those of the softmax path (float32 rounding), the kept tokens the same."""
    from hf_longmem.cache_classes.h2o import H2OLayer
    from hf_longmem.memory import scoring

    model = tiny_model("llama_gqa")
    ids = random_ids(1, 40)
    options = {"budget": 12} if name == "h2o" else {"budget": 12, "uncompressed_layers": []}
    calls = []
    from_lse = scoring.causal_head_column_sums_from_lse
    monkeypatch.setattr(scoring, "causal_head_column_sums_from_lse", lambda *a: calls.append(1) or from_lse(*a))

    def run(every_query: bool):
        monkeypatch.setattr(H2OLayer, "scores_every_query", every_query)
        cache = make_cache(name, model, **options)
        with torch.no_grad():
            logits = model(ids, cache=cache).logits
            following = model(ids[:, -1:], cache=cache).logits  # D2O evicts from the first decoding step
        return logits, following, cache

    reference_logits, reference_next, reference = run(False)
    assert not calls
    logits, following, cache = run(True)
    assert len(calls) == len(cache.layers)  # every layer took the log-sum-exp path
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=0)  # the same SDPA call
    for layer, expected in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.scores, expected.scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer.positions, expected.positions)  # the same tokens kept
    torch.testing.assert_close(following, reference_next, rtol=1e-5, atol=1e-5)
