"""KVMerger: consecutive merging sets, Gaussian-kernel merge around the pivot, the budget met exactly."""

from __future__ import annotations

import pytest
import torch

from hf_longmem import KVMergerCache, make_cache
from hf_longmem.cache_classes.kvmerger import kvmerger_compress
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model

# The shared cache suites (tests/helpers/cache_cases.py): a threshold that merges only to meet the budget; the prompt
# is merged once to the budget and generated tokens are appended.
CASE = CacheCase(
    "kvmerger",
    options={"window_size": 4, "sim_threshold": 0.5},
    kept=lambda options, decoded, **_: options["budget"] + decoded,
    matrix_small={"window_size": 4},
)


def orthogonal_keys(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """``[1, 1, n, dim]`` mutually orthogonal keys (cosine 0: nothing merges unless made equal)."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)))
    return q[:n][None, None].contiguous()


def compress(keys, values, scores, budget, window, threshold=0.9, max_set_size=None):
    positions = torch.arange(keys.shape[2], dtype=torch.int32).expand(*keys.shape[:3])
    return kvmerger_compress(keys, values, positions, scores, budget, window, threshold, max_set_size)


def test_a_run_of_identical_kvs_merges_into_the_original_state():
    keys, values = orthogonal_keys(14), torch.randn(1, 1, 14, 4, generator=torch.Generator().manual_seed(1))
    keys[:, :, 3:9], values[:, :, 3:9] = keys[:, :, 3:4], values[:, :, 3:4]  # six identical KVs
    scores = torch.rand(1, 1, 14, generator=torch.Generator().manual_seed(2))
    scores[0, 0, 5] = 2.0  # the pivot
    out_keys, out_values, out_positions = compress(keys, values, scores, budget=9, window=2)
    assert out_positions[0, 0].tolist() == [0, 1, 2, 5, 9, 10, 11, 12, 13]  # the set keeps its pivot's position
    torch.testing.assert_close(out_keys[:, :, 3], keys[:, :, 3], rtol=0, atol=0)  # fixed point, exactly
    torch.testing.assert_close(out_values[:, :, 3], values[:, :, 3], rtol=0, atol=0)
    others = [0, 1, 2, 9, 10, 11, 12, 13]
    assert torch.equal(out_keys[:, :, [0, 1, 2, 4, 5, 6, 7, 8]], keys[:, :, others])


def test_sets_are_consecutive_and_merged_with_gaussian_weights_around_the_pivot():
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(16, generator=g)
    keys = orthogonal_keys(12)
    keys[0, 0, 2:7] = direction + 0.2 * torch.randn(5, 16, generator=g)  # similar, not identical: one set
    values = torch.randn(1, 1, 12, 4, generator=g)
    scores = torch.full((1, 1, 12), 0.1)
    scores[0, 0, 4] = 1.0
    out_keys, out_values, out_positions = compress(keys, values, scores, budget=8, window=2, threshold=0.8)
    assert out_positions[0, 0].tolist() == [0, 1, 4, 7, 8, 9, 10, 11]
    members = keys[0, 0, 2:7]
    d2 = (members - keys[0, 0, 4]).square().sum(-1)
    sigma2 = d2[[0, 1, 3, 4]].mean()  # over the members other than the pivot
    w = torch.exp(-d2 / (2 * sigma2))
    w = w / w.sum()
    assert w.argmax() == 2 and torch.isclose(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(out_keys[0, 0, 2], (w[:, None] * members).sum(0))
    torch.testing.assert_close(out_values[0, 0, 2], (w[:, None] * values[0, 0, 2:7]).sum(0))


def test_spare_budget_keeps_the_most_important_tokens_unmerged():
    keys = orthogonal_keys(14)
    keys[:, :, :12] = keys[:, :, :1]  # one set of 12 identical keys, then a window of 2
    values = torch.arange(14.0).view(1, 1, 14, 1)
    scores = torch.full((1, 1, 14), 0.1)
    scores[0, 0, 6] = 1.0  # the most important token: both its links are cut first
    out_keys, out_values, out_positions = compress(keys, values, scores, budget=5, window=2)
    assert out_positions[0, 0].tolist() == [0, 6, 7, 12, 13]  # set [0..5], token 6 alone, set [7..11], window
    torch.testing.assert_close(out_values[0, 0, :3, 0], torch.tensor([2.5, 6.0, 9.0]))  # uniform weights
    assert (
        kvmerger_compress(keys, values, torch.arange(14, dtype=torch.int32).expand(1, 1, 14), scores, 14, 2, 0.9, None)
        is None
    )


def test_threshold_above_one_is_window_voted_eviction():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    merger = make_cache("kvmerger", model, budget=12, window_size=4, sim_threshold=1.5)
    snap = make_cache("snapkv", model, budget=12, window_size=4, kernel_size=1)
    seq, logits = greedy(model, ids, merger, max_new_tokens=4)
    ref_seq, ref_logits = greedy(model, ids, snap, max_new_tokens=4)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits)
    for a, b in zip(merger.layers, snap.layers):
        assert torch.equal(a.positions, b.positions)


def test_budget_is_met_exactly_and_kept_slots_stay_in_order_per_head():
    model = tiny_model("llama_mha")
    cache = make_cache("kvmerger", model, budget=12, window_size=4, sim_threshold=0.2)
    seq, _ = greedy(model, random_ids(1, 40), cache, max_new_tokens=5)
    for layer in cache.layers:
        assert layer.keys.shape == (1, 4, 12 + 4, 16)
        pos = layer.positions[0]
        assert (pos[:, 1:] > pos[:, :-1]).all()
        assert (pos[:, 8:] == torch.arange(36, 44, dtype=torch.int32)).all()  # window + generated tokens
    # a later multi-token turn is compressed again, to the budget
    turn = torch.cat((seq, random_ids(1, 6, seed=4)), dim=1)
    greedy(model, turn, cache, max_new_tokens=3)
    assert cache.get_stored_length() == 12 + 2


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(budget=32, window_size=32), "budget"),
        (dict(budget=64, window_size=0), "window_size"),
        (dict(budget=64, sim_threshold=float("nan")), "sim_threshold"),
        (dict(budget=64, sim_threshold="high"), "sim_threshold"),
        (dict(budget=64, max_set_size=0), "max_set_size"),
    ],
)
def test_bad_arguments_name_the_argument(options, match):
    with pytest.raises(ValueError, match=match):
        KVMergerCache(**options)
