"""Merge math shared by D2O and KVMerger, against brute-force loops on small synthetic tensors."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.memory.merging import (
    consecutive_merge_sets,
    cosine_best_match,
    cosine_similarity,
    gaussian_kernel_weights,
    merge_runs,
    weighted_merge_into,
)


def test_cosine_best_match_equals_brute_force_and_skips_invalid_targets():
    g = torch.Generator().manual_seed(0)
    sources, targets = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    valid = torch.rand(2, 3, 7, generator=g) > 0.3
    valid[..., 0] = True
    sim, index = cosine_best_match(sources, targets, valid)
    for b in range(2):
        for h in range(3):
            for e in range(5):
                cos = torch.nn.functional.cosine_similarity(sources[b, h, e][None], targets[b, h], dim=-1)
                cos[~valid[b, h]] = -2
                assert index[b, h, e] == cos.argmax()
                torch.testing.assert_close(sim[b, h, e], cos.max())
    assert cosine_similarity(torch.ones(1, 4), torch.ones(3, 4)).eq(1).all()


def test_weighted_merge_weights_sum_to_one():
    g = torch.Generator().manual_seed(1)
    targets, sources = torch.randn(1, 2, 4, 6, generator=g), torch.randn(1, 2, 3, 6, generator=g)
    index = torch.tensor([[[1, 1, 3], [0, 2, 2]]])
    weights = torch.tensor([[[0.5, 0.25, 0.0], [1.0, 0.3, 0.6]]])
    out = weighted_merge_into(targets, sources, index, weights)
    expected = targets.clone()
    expected[0, 0, 1] = (targets[0, 0, 1] + 0.5 * sources[0, 0, 0] + 0.25 * sources[0, 0, 1]) / 1.75
    expected[0, 1, 0] = (targets[0, 1, 0] + sources[0, 1, 0]) / 2.0
    expected[0, 1, 2] = (targets[0, 1, 2] + 0.3 * sources[0, 1, 1] + 0.6 * sources[0, 1, 2]) / 1.9
    torch.testing.assert_close(out, expected)
    # a merged copy of a vector is that vector, whatever the weight (the official D2O division by 1 + n_c is not)
    copies = targets[:, :, [1, 1, 1]]
    torch.testing.assert_close(weighted_merge_into(targets, copies, torch.ones_like(index), weights.abs()), targets)
    with pytest.raises(ValueError, match="weights"):
        weighted_merge_into(targets, sources, index, -weights)


def reference_sets(keys: torch.Tensor, cand: torch.Tensor, threshold: float, max_size: int | None) -> list[int]:
    """The greedy scan written as a loop: newest candidate first, absorb older tokens similar to the anchor."""
    n = keys.shape[0]
    slots = [i for i in range(n) if cand[i]]
    out, sets, i = [-1] * n, [], len(slots) - 1
    while i >= 0:
        anchor, members = slots[i], [slots[i]]
        i -= 1
        while i >= 0 and (max_size is None or len(members) < max_size):
            cos = torch.nn.functional.cosine_similarity(keys[anchor], keys[slots[i]], dim=0).clamp(-1, 1)
            if not cos > threshold:
                break
            members.append(slots[i])
            i -= 1
        sets.append(members)
    for number, members in enumerate(reversed(sets)):
        for slot in members:
            out[slot] = number
    return out


@pytest.mark.parametrize("threshold, max_size", [(0.5, None), (0.5, 3), (0.9, 4), (-1.5, 5), (1.5, None)])
def test_consecutive_merge_sets_equal_the_greedy_scan(threshold, max_size):
    g = torch.Generator().manual_seed(2)
    # blocks of noisy copies of a few directions, so that runs of similar keys exist
    base = torch.randn(2, 3, 6, 8, generator=g)
    block = torch.randint(0, 6, (2, 3, 40), generator=g).sort(-1).values
    keys = base.gather(2, block[..., None].expand(-1, -1, -1, 8)) + 0.4 * torch.randn(2, 3, 40, 8, generator=g)
    cand = torch.zeros(2, 1, 40, dtype=torch.bool)
    cand[0, :, 5:35] = True  # pads on the left, a window on the right
    cand[1, :, :36] = True
    set_id = consecutive_merge_sets(keys, cand, threshold, max_size)
    for b in range(2):
        for h in range(3):
            assert set_id[b, h].tolist() == reference_sets(keys[b, h], cand[b, 0], threshold, max_size)
    # every set is a run of consecutive slots
    for ids in set_id.reshape(-1, 40).tolist():
        members = [i for i in ids if i >= 0]
        assert members == sorted(members) and set(members) == set(range(len(set(members))))
    if threshold > 1:  # nothing merges: every candidate is its own set
        assert all(ids.count(i) == 1 for ids in set_id.reshape(-1, 40).tolist() for i in set(ids) if i >= 0)


def test_identical_keys_form_one_set_up_to_the_cap():
    keys = torch.randn(1, 1, 1, 4).expand(1, 1, 10, 4)
    cand = torch.ones(1, 1, 10, dtype=torch.bool)
    assert consecutive_merge_sets(keys, cand, 0.99, None).tolist() == [[[0] * 10]]
    assert consecutive_merge_sets(keys, cand, 0.99, 4).tolist() == [[[0, 0, 1, 1, 1, 1, 2, 2, 2, 2]]]
    assert consecutive_merge_sets(keys, cand, 1.0, None).tolist() == [[list(range(10))]]  # similarity is never > 1


def test_gaussian_weights_sum_to_one_with_the_pivot_largest():
    g = torch.Generator().manual_seed(3)
    d2 = torch.rand(2, 2, 9, generator=g) * 4
    run_id = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 3]).expand(2, 2, 9).clone()
    pivots = [1, 3, 6, 8]
    d2[..., pivots] = 0.0
    run_id[1, 1, 2] = 4  # a slot left out
    weights = gaussian_kernel_weights(d2, run_id, 4)
    for b in range(2):
        for h in range(2):
            for run in range(4):
                members = [i for i in range(9) if run_id[b, h, i] == run]
                w = weights[b, h, members]
                torch.testing.assert_close(w.sum(), torch.tensor(1.0))
                assert w.argmax() == members.index(pivots[run]) or len(members) == 1
                others = [i for i in members if i != pivots[run]]
                if others:
                    sigma2 = d2[b, h, others].mean()
                    raw = torch.exp(-d2[b, h, members] / (2 * sigma2))
                    torch.testing.assert_close(w, raw / raw.sum())
    assert weights[1, 1, 2] == 0
    assert gaussian_kernel_weights(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3, dtype=torch.long), 1).allclose(
        torch.full((1, 1, 3), 1 / 3)
    )


def test_merge_runs_fixed_point_pivot_position_and_weighted_mean():
    g = torch.Generator().manual_seed(4)
    keys, values = torch.randn(1, 2, 7, 4, generator=g), torch.randn(1, 2, 7, 3, generator=g)
    keys[:, :, 1:4], values[:, :, 1:4] = keys[:, :, 1:2], values[:, :, 1:2]  # a run of identical states
    positions = torch.arange(10, 17, dtype=torch.int32).expand(1, 2, 7)
    scores = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.5, 0.4, 0.8]).expand(1, 2, 7)
    run_id = torch.tensor([0, 1, 1, 1, 2, 2, 3]).expand(1, 2, 7)
    merged_keys, merged_values, merged_positions, weights = merge_runs(keys, values, positions, scores, run_id, 4)
    assert merged_keys.shape == (1, 2, 4, 4) and merged_values.shape == (1, 2, 4, 3)
    assert merged_positions[0, 0].tolist() == [10, 12, 14, 16]  # pivots: the top-scored slot of each run
    torch.testing.assert_close(merged_keys[:, :, 1], keys[:, :, 1], rtol=0, atol=0)  # fixed point, exactly
    torch.testing.assert_close(merged_values[:, :, 1], values[:, :, 1], rtol=0, atol=0)
    torch.testing.assert_close(merged_keys[:, :, [0, 3]], keys[:, :, [0, 6]])  # singletons are untouched
    w = weights[0, 0, 4:6]
    assert w[0] > w[1] and torch.isclose(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(merged_values[0, 0, 2], w[0] * values[0, 0, 4] + w[1] * values[0, 0, 5])
    torch.testing.assert_close(merged_keys[0, 0, 2], w[0] * keys[0, 0, 4] + w[1] * keys[0, 0, 5])
