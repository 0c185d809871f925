"""D2O: layer statistic and ratios, H2O selection with sinks, EMA-thresholded merging with weights summing to one."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from hf_longmem import D2OCache, make_cache
from hf_longmem.cache_classes.d2o import (
    UNLIMITED,
    attention_density,
    d2o_merge,
    layer_ratios,
    query_head_column_sums,
)
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_config, tiny_model


def _layer_budget_kept(options, prompt, decoded, layer, cache, row):
    """Per layer and row, fixed at the first decoding step from every layer's prefill density."""
    return min(prompt + decoded, int(cache.layers[layer].layer_budget[row]))


# The shared cache suites (tests/helpers/cache_cases.py). By default layers 0, 1 and L-1 (all of the tiny models) keep
# everything: none is left uncompressed here. The budget is a layer average: on 2 layers each gets >= 0.54 x budget /
# length of the prompt, clamped to 1, so the full budget is twice the tokens.
CASE = CacheCase("d2o", options={"uncompressed_layers": []}, full_budget=128, kept=_layer_budget_kept)


def test_layer_statistic_equals_eager_attention_variance():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 24)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions  # per layer [1, q_heads, T, T]
    model.set_attn_implementation("sdpa")
    cache = make_cache("d2o", model, budget=8)
    with torch.no_grad():
        model(ids, cache=cache)
    for layer, attention in zip(cache.layers, attentions):
        column = attention.sum(2)  # [1, q_heads, T]
        torch.testing.assert_close(layer.prefill_sums, column, rtol=1e-4, atol=1e-5)
        var = column.double().var(-1)[0]  # per query head, unbiased as torch.var
        expected = ((var - var.min()) / (var.max() - var.min() + 1e-6)).mean()
        torch.testing.assert_close(layer.prefill_density()[0], expected, rtol=1e-4, atol=1e-6)


def test_layer_ratios_formula_and_clamping():
    density = torch.tensor([[0.1, 0.7, 0.3, 0.5], [0.0, 0.0, 0.0, 0.0]])
    rho = torch.tensor([0.4, 0.2])
    expected = (torch.softmax(-density.double(), -1) * 4 * rho.double()[:, None]).clamp(0.01, 1.0)
    torch.testing.assert_close(layer_ratios(density, rho), expected)
    assert torch.allclose(layer_ratios(density[1:], 0.2), torch.full((1, 4), 0.2, dtype=torch.float64))
    clamped = layer_ratios(torch.tensor([0.0, 1.0, 1.0]), 0.9)
    assert clamped[0] == 1.0 and clamped[1] < 1.0
    assert layer_ratios(torch.tensor([0.0, 30.0]), 0.001)[1] == 0.01


def test_the_denser_of_two_synthetic_layers_gets_more_budget():
    """Zero queries attend uniformly (dense); queries aligned with key 0 peak on it, more in some heads than others."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 32, 16, generator=g)
    uniform = torch.zeros(1, 4, 32, 16)
    peaked = keys[:, [0, 0, 1, 1], :1].expand(-1, -1, 32, -1) * torch.tensor([0.0, 2.0, 8.0, 30.0])[None, :, None, None]
    dense = attention_density(query_head_column_sums(uniform, keys, None, 0.25), torch.ones(1, 32, dtype=torch.bool))
    sparse = attention_density(query_head_column_sums(peaked, keys, None, 0.25), torch.ones(1, 32, dtype=torch.bool))
    assert dense.item() < sparse.item()
    ratios = layer_ratios(torch.stack((dense, sparse), -1), 0.3)[0]
    assert ratios[0] > ratios[1]


def test_budgets_are_fixed_at_the_first_decoding_step_from_every_layer():
    model = tiny_model("llama_gqa", num_hidden_layers=4)
    prompt, new = 30, 6
    cache = make_cache("d2o", model, budget=10)  # default: layers 0, 1 and 3 are never compressed
    greedy(model, random_ids(1, prompt), cache, max_new_tokens=new)
    held = prompt + 1  # tokens held at the first decoding step
    density = torch.stack([layer.density for layer in cache.layers], -1)
    ratios = layer_ratios(density, 10 / held)[0]
    for idx, layer in enumerate(cache.layers):
        assert layer.prefill_sums is None  # freed once the budgets are fixed
        torch.testing.assert_close(layer.ratio[0], ratios[idx])
        heavy = max(4, math.floor(held * ratios[idx].item() * 0.5))
        recent = max(1, math.floor(held * ratios[idx].item() * 0.5))
        if idx == 2:
            assert layer.layer_budget.tolist() == [heavy + recent]
            assert layer.keys.shape[-2] == heavy + recent < prompt
        else:
            assert layer.layer_budget.tolist() == [UNLIMITED]
            assert layer.keys.shape[-2] == prompt + new - 1


def test_sinks_and_recent_window_survive_and_the_size_stays_fixed():
    model = tiny_model("llama_gqa")
    prompt, new = 30, 8
    cache = make_cache("d2o", model, budget=10, uncompressed_layers=[])
    seq, _ = greedy(model, random_ids(1, prompt), cache, max_new_tokens=new)
    seen = seq.shape[1] - 1
    for layer in cache.layers:
        budget, recent = int(layer.layer_budget), int(layer.recent_budget)
        assert layer.keys.shape[-2] == budget < prompt
        assert (layer.positions[0, :, :4] == torch.arange(4, dtype=torch.int32)).all()  # the first 4 tokens
        assert (layer.positions[0, :, -recent:] == torch.arange(seen - recent, seen, dtype=torch.int32)).all()
        assert layer.scores.shape == layer.positions.shape
        assert torch.isfinite(layer.tau).all()


def test_evicted_kvs_are_merged_into_kept_slots_during_generation():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    reference = DynamicCache(config=model.config)
    greedy(model, ids, reference, max_new_tokens=4)
    cache = make_cache("d2o", model, budget=10, uncompressed_layers=[], alpha=0.5, beta=0.0)
    greedy(model, ids, cache, max_new_tokens=4)
    for layer, full in zip(cache.layers, reference.layers):
        # prompt keys are the same in both runs (same prefill); a kept prompt slot that changed received a merge
        prompt = layer.positions < 30
        original = full.keys.gather(2, layer.positions.long()[..., None].expand(-1, -1, -1, 16))
        changed = ~torch.isclose(layer.keys, original, atol=1e-6).all(-1) & prompt
        assert changed.any() and not changed.all()


def test_duplicate_of_a_kept_key_is_merged_and_an_orthogonal_one_dropped():
    eye = torch.eye(4)
    kept_keys = eye[:3][None, None]  # [1, 1, 3, 4]
    kept_values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])[None, None]
    evicted_keys = torch.stack((eye[0], eye[3]))[None, None]  # a duplicate of kept key 0, and an orthogonal key
    evicted_values = torch.tensor([[9.0, 9.0], [-7.0, -7.0]])[None, None]
    keys, values, tau, merged = d2o_merge(
        kept_keys,
        kept_values,
        torch.ones(1, 1, 3, dtype=torch.bool),
        evicted_keys,
        evicted_values,
        torch.ones(1, 1, 2, dtype=torch.bool),
        torch.tensor([float("nan")]),
        0.5,
        0.5,
    )
    assert merged.tolist() == [[[True, False]]]
    assert tau.tolist() == [0.5]  # first time: mean(s) = (1 + 0) / 2
    torch.testing.assert_close(
        keys, kept_keys
    )  # merging a key with its duplicate leaves it unchanged (weights sum to 1)
    torch.testing.assert_close(values[0, 0, 0], torch.tensor([5.0, 5.5]))  # (v_c + 1 * v_e) / (1 + 1)
    torch.testing.assert_close(values[0, 0, 1:], kept_values[0, 0, 1:])


def test_merge_threshold_is_an_ema_of_the_mean_similarity():
    g = torch.Generator().manual_seed(5)
    alpha, beta = 0.3, 0.6
    kept, kept_values = torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 2, 4, 8, generator=g)
    valid_kept = torch.ones(2, 1, 4, dtype=torch.bool)
    tau = torch.full((2,), float("nan"))
    expected = [None, None]
    for step in range(3):
        evicted = torch.randn(2, 2, 3, 8, generator=g)
        valid = torch.ones(2, 2, 3, dtype=torch.bool)
        valid[1] = step != 1  # row 1 evicts nothing at step 1: its threshold is left alone
        sim = torch.nn.functional.cosine_similarity(evicted[:, :, :, None], kept[:, :, None], dim=-1).amax(-1)
        for row in range(2):
            if valid[row].any():
                mean = sim[row].mean().item()
                expected[row] = mean if expected[row] is None else alpha * expected[row] + beta * mean
        merged_keys, _, tau, merged = d2o_merge(
            kept, kept_values, valid_kept, evicted, evicted, valid, tau, alpha, beta
        )
        torch.testing.assert_close(tau, torch.tensor(expected, dtype=torch.float32))
        assert torch.equal(merged, valid & (sim >= tau[:, None, None]) & (sim > 0))


def test_chunked_prefill_gives_the_same_statistics_and_budgets():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    ids = random_ids(1, 30)
    whole, chunked = (make_cache("d2o", model, budget=9, uncompressed_layers=[]) for _ in range(2))
    greedy(model, ids, whole, max_new_tokens=2)
    greedy(model, ids, chunked, max_new_tokens=2, prefill_chunk_size=8)
    for a, b in zip(whole.layers, chunked.layers):
        # The column sums are float32 sums over <= 30 queries, in chunks of 8 or at once: each may differ by up to
        # 30 * 2**-24 relative (the bound for a sum in another order). `density` is a min-max normalised variance of
        # them; perturbing every sum of this data by that relative amount moves it by at most 3.6e-6 (measured over
        # 300 random perturbations, all three layers), so 1e-5 bounds the arithmetic. The budgets must be identical.
        torch.testing.assert_close(a.density, b.density, atol=1e-5, rtol=0)
        assert torch.equal(a.layer_budget, b.layer_budget)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(budget=4), "budget"),
        (dict(budget=12.5), "budget"),
        (dict(budget=12, recent_ratio=1.0), "recent_ratio"),
        (dict(budget=12, alpha=1.5), "alpha"),
        (dict(budget=12, beta=-0.1), "beta"),
        (dict(budget=12, num_sink=-1), "num_sink"),
        (dict(budget=12, uncompressed_layers=[2]), "uncompressed_layers"),
        (dict(budget=12, uncompressed_layers=3), "uncompressed_layers"),
        (dict(budget=12, first_eviction="later"), "first_eviction"),
        (dict(budget=12, static=True), "max_new_tokens"),
        (dict(budget=12, max_new_tokens=8), "static=True"),
        (dict(budget=12, static=True, max_new_tokens=8, first_eviction="decode"), "first_eviction='prefill'"),
    ],
)
def test_bad_arguments_name_the_argument(options, match):
    with pytest.raises(ValueError, match=match):
        D2OCache(config=tiny_config("llama_gqa"), **options)


def test_config_is_required():
    with pytest.raises(ValueError, match="config"):
        D2OCache(budget=16)


def test_shallow_models_warn_that_the_paper_default_compresses_nothing():
    """Layers 0, 1 and L - 1 stay whole by default: on a model of at most 3 layers that is every layer."""
    model = tiny_model("llama_gqa")  # 2 layers
    with pytest.warns(UserWarning, match="compresses nothing"):
        cache = make_cache("d2o", model, budget=8)
    ids = random_ids(1, 30)
    greedy(model, ids, cache, max_new_tokens=3)
    assert all(layer.get_stored_length() == 32 for layer in cache.layers)


def test_options_for_budget_reach_the_budget_on_shallow_and_keep_the_paper_on_deep_models():
    import warnings

    from hf_longmem import get_cache_spec
    from hf_longmem.cache_classes.base import cache_memory_bytes

    options = get_cache_spec("d2o").options_for_budget(8)
    model = tiny_model("llama_gqa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = make_cache("d2o", model, **options)
    assert cache.uncompressed_layers == frozenset()
    ids = random_ids(1, 30)
    greedy(model, ids, cache, max_new_tokens=3)
    reference = DynamicCache(config=model.config)
    greedy(model, ids, reference, max_new_tokens=3)
    assert cache_memory_bytes(cache) < cache_memory_bytes(reference)
    deep = make_cache("d2o", tiny_config("llama_gqa", num_hidden_layers=5), **options)
    assert deep.uncompressed_layers == frozenset({0, 1, 4})


def _steady_layer(batch, heads, n, budget, recent, num_sink, scores, positions, tau, generator, dtype):
    """A D2O layer in the state of a decoding step that holds one token over its (per-row equal) budget."""
    from hf_longmem.cache_classes.d2o import D2OLayer, _D2OGroup

    layer = D2OLayer(_D2OGroup(budget, 0.5, num_sink, 0.4, 0.7), 0, uncompressed=False)
    layer.layer_budget = torch.full((batch,), budget)
    layer.recent_budget = torch.full((batch,), recent)
    layer.scores, layer.tau, layer._deferring = scores.clone(), tau.clone(), False
    layer.positions = positions
    assert not layer.has_pad_slots()  # the fast path needs it known
    return layer


def test_steady_decoding_fast_path_equals_the_general_eviction_and_merge_ties_included():
    """One token over the budget in every row and head, no pad: the decoding fast path (argmin eviction, one merge
    per row and head, in place) keeps, merges and updates the threshold exactly as the general path (keep_plan's
    stable ranking, d2o_merge), on quantised scores and keys so that equal scores and equal similarities are
    common (and on generic keys), with the threshold before (NaN) and after the first eviction, and a row whose
    first positions are not the sinks'."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(24):
        batch, heads, head_dim = 3, 2, 4 if trial % 3 else 16
        budget, recent, num_sink = 8 + trial % 3, 1 + trial % 3, trial % 4
        n = budget + 1
        dtype = torch.bfloat16 if trial % 6 == 5 else torch.float32
        # distinct increasing positions per head (heads keep different tokens); row 2 starts past the sinks
        gaps = torch.randint(1, 3, (batch, heads, n), generator=generator)
        gaps[:2, :, : num_sink + 1] = 1
        positions = (gaps.cumsum(-1) - 1 + 2 * (torch.arange(batch) == 2)[:, None, None]).to(torch.int32)
        scores = torch.randint(0, 3, (batch, heads, n), generator=generator).float()
        keys = torch.randint(-1, 2, (batch, heads, n, head_dim), generator=generator).to(dtype)
        if head_dim == 16:  # generic keys too (the quantised ones tie)
            keys = torch.randn(batch, heads, n, head_dim, generator=generator).to(dtype)
        values = torch.randn(batch, heads, n, head_dim + trial % 2, generator=generator).to(dtype)
        tau = torch.tensor([float("nan"), 0.2, -0.1]) if trial % 2 else torch.full((batch,), float("nan"))
        args = (batch, heads, n, budget, recent, num_sink, scores, positions, tau, generator, dtype)
        fast, general = _steady_layer(*args), _steady_layer(*args)
        general._steady = lambda n: False
        for step in range(3):  # later steps: the threshold the fast path set itself (no NaN test)
            assert fast._steady(n) and not general._steady(n)
            out_fast = fast.compress(keys, values, positions)
            out_general = general.compress(keys, values, positions)
            for a, b in zip(out_fast, out_general):
                assert a.dtype == b.dtype and torch.equal(a, b)
            assert torch.equal(fast.scores, general.scores)
            torch.testing.assert_close(fast.tau, general.tau, rtol=0, atol=0, equal_nan=True)
            assert fast._kept_no_pads and (step == 0 or fast._tau_set is fast.tau)
            # the next token: stored + new slot, its position next in each row, its score added to all
            new_keys = (
                keys[:, :, -1:] if trial % 4 == 0 else torch.randn(batch, heads, 1, head_dim, generator=generator)
            )
            keys = torch.cat((out_fast[0], new_keys.to(dtype)), dim=2)
            values = torch.cat((out_fast[1], torch.randn(*values[:, :, -1:].shape, generator=generator).to(dtype)), 2)
            positions = torch.cat(
                (out_fast[2], out_fast[2].amax((1, 2), keepdim=True).expand(-1, heads, 1) + 1), dim=-1
            )
            received = torch.randint(0, 3, (batch, heads, n), generator=generator).float()
            for layer in (fast, general):
                layer.positions = positions
                assert not layer.has_pad_slots()
                layer.scores = torch.nn.functional.pad(layer.scores, (0, 1)) + received


def test_fast_path_is_taken_while_decoding_and_only_at_one_token_over_the_budget():
    model = tiny_model("llama_gqa")
    cache = make_cache("d2o", model, budget=10, uncompressed_layers=[])
    calls = []
    for layer in cache.layers:
        original = layer._evict_and_merge_one
        layer._evict_and_merge_one = lambda *a, _f=original: calls.append(1) or _f(*a)
    greedy(model, random_ids(1, 30), cache, max_new_tokens=5)  # a prefill and 4 decoding steps
    # every decoding step but the first (which sizes the layers and evicts many at once)
    assert len(calls) == 3 * len(cache.layers)


def test_first_eviction_at_the_prefill_fixes_the_same_budgets_and_evicts_at_once():
    """first_eviction='prefill': the budgets the paper fixes at the first decoding step (N = prompt + 1), fixed and
    applied when the prefill ends, from the prefill scores."""
    model = tiny_model("llama_gqa", num_hidden_layers=4)
    ids = random_ids(1, 30)
    paper = make_cache("d2o", model, budget=10)
    greedy(model, ids, paper, max_new_tokens=2)
    early = make_cache("d2o", model, budget=10, first_eviction="prefill")
    with torch.no_grad():
        model(ids, cache=early)
    for want, got in zip(paper.layers, early.layers):
        assert torch.equal(got.layer_budget, want.layer_budget)
        budget = int(got.layer_budget[0])
        assert got.keys.shape[-2] == (30 if budget == UNLIMITED else budget)
    assert early.layers[2].keys.shape[-2] < 30  # layer 2 (the compressed one) evicted in the prefill forward


def test_static_layout_equals_the_dynamic_one_with_a_padded_batch():
    """static=True: the same greedy tokens and logits as static=False (first_eviction='prefill'), per-row budgets and
    a layer that keeps every token included; thawed, the same kept slots, merged keys and values, scores and merge
    thresholds; generating past max_new_tokens in a layer that keeps every token raises."""
    model = tiny_model("llama_gqa", num_hidden_layers=4)
    ids, mask = random_ids(2, 40), torch.ones(2, 40, dtype=torch.long)
    ids[1, :6], mask[1, :6] = 0, 0
    options = dict(budget=12, num_sink=2, uncompressed_layers=[0])
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=10)
    dynamic = make_cache("d2o", model, first_eviction="prefill", **options)
    static = make_cache("d2o", model, static=True, max_new_tokens=10, **options)
    assert static.is_compileable and not dynamic.is_compileable
    want_seq, want_logits = greedy(model, ids, dynamic, **kwargs)
    got_seq, got_logits = greedy(model, ids, static, **kwargs)
    assert torch.equal(got_seq, want_seq)
    # the same tokens attended in ring order instead of position order: float32 sums in another order
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    budgets = [layer.layer_budget.tolist() for layer in dynamic.layers]
    assert budgets[0] == [UNLIMITED, UNLIMITED] and any(b[0] != b[1] for b in budgets[1:])  # per-row budgets
    for want, got in zip(dynamic.layers, static.layers):
        got.thaw()  # makes the eviction and merge the dynamic layer made after the last step
        assert torch.equal(got.positions, want.positions)
        real = want.positions != -1
        for name in ("keys", "values"):
            torch.testing.assert_close(getattr(got, name)[real], getattr(want, name)[real], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.tau, want.tau, equal_nan=True)
        if want.scores is not None:
            torch.testing.assert_close(got.scores[real], want.scores[real], rtol=1e-4, atol=1e-4)
    assert dynamic.layers[1].tau.isfinite().all()  # merges happened
    with pytest.raises(RuntimeError, match="capacity exceeded"):
        greedy(model, ids, make_cache("d2o", model, static=True, max_new_tokens=4, **options), **kwargs)
