"""block_topk: Triton block scores vs the torch reference on odd shapes, selection rules, argument errors."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.kernels.block_topk import block_topk, naive_block_scores, select_topk

from .common import DEVICE, assert_close, needs_triton, rand

# (batch, heads, head_dim, blocks, k, counts, dtype)
CASES = [
    (1, 4, 16, 37, 5, None, torch.float32),
    (3, 5, 7, 70, 12, [70, 10, 0], torch.float32),  # odd widths, a short row, an empty row
    (2, 3, 24, 1, 4, [1, 0], torch.float32),  # k > n
    (2, 4, 16, 130, 16, [130, 129], torch.float16),
]


def _ids(case):
    b, h, d, n, k, counts, dtype = case
    return f"B{b}-H{h}-d{d}-n{n}-k{k}-{'counts' if counts else 'all'}-{str(dtype)[6:]}"


def _inputs(b, h, d, n, counts, dtype, seed=0):
    query = rand(b, h, d, dtype=dtype, seed=seed)
    reprs = rand(b, n, h, d, dtype=dtype, seed=seed + 1)
    num = torch.tensor(counts, device=DEVICE) if counts is not None else None
    return query, reprs, num


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference(case):
    from hf_longmem.kernels.block_topk.triton import triton_block_scores

    b, h, d, n, k, counts, dtype = case
    query, reprs, num = _inputs(b, h, d, n, counts, dtype)
    expected = naive_block_scores(query.flatten(1), reprs.flatten(2), num)
    scores = triton_block_scores(query.flatten(1), reprs.flatten(2), num, block_n=16, block_d=16)  # several tiles
    assert torch.equal(torch.isneginf(scores), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    assert_close("scores", expected[finite], scores[finite], dtype)
    index = block_topk(query, reprs, k, num, backend="triton")
    ref_index = block_topk(query, reprs, k, num, backend="torch")
    assert torch.equal(index, ref_index)


@pytest.mark.parametrize("case", CASES[:3], ids=_ids)
def test_reference_selection_rules(case):
    b, h, d, n, k, counts, dtype = case
    query, reprs, num = _inputs(b, h, d, n, counts, dtype)
    index, scores = block_topk(query, reprs, k, num, backend="torch", return_scores=True)
    assert index.shape == (b, k) and index.dtype == torch.long
    brute = torch.einsum("bhd,bnhd->bn", query.float(), reprs.float())
    for row in range(b):
        real = n if counts is None else counts[row]
        order = brute[row, :real].argsort(descending=True)[:k].tolist()
        assert index[row].tolist() == order + [-1] * (k - len(order))
        assert torch.isneginf(scores[row, real:]).all()


def test_needle_representative_ranks_first():
    query, reprs, _ = _inputs(2, 4, 8, 50, None, torch.float32)
    reprs[0, 17] = 5 * query[0]
    reprs[1, 3] = 5 * query[1]
    assert block_topk(query, reprs, 1)[:, 0].tolist() == [17, 3]


def test_select_topk_of_nothing():
    assert select_topk(torch.empty(2, 0), 3).tolist() == [[-1] * 3] * 2


@pytest.mark.parametrize(
    "args,match",
    [
        ((rand(2, 8), rand(2, 5, 9), 3), "D = 8"),
        ((rand(2, 8), rand(3, 5, 8), 3), "b = 2"),
        ((rand(2, 2, 2, 2), rand(2, 5, 8), 3), "`query` must be"),
        ((rand(2, 8), rand(2, 8), 3), "`reprs` must be"),
        ((rand(2, 8), rand(2, 5, 8), 0), "`k`"),
        ((rand(2, 8), rand(2, 5, 8), 2, torch.tensor([1.0, 2.0])), "num_blocks"),
        ((rand(2, 8), rand(2, 5, 8), 2, torch.tensor([1])), "num_blocks"),
        ((torch.ones(2, 8, dtype=torch.long), rand(2, 5, 8), 2), "floating-point"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        block_topk(*args)
