"""The flash-style causal column sums against the masked reference (float32: equal to rounding)."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.memory import scoring
from hf_longmem.memory.scoring import causal_column_scores, causal_head_column_sums, column_scores


@pytest.mark.parametrize(
    "num_q, num_k, block", [(1, 40, 128), (1, 1, 128), (7, 7, 4), (33, 70, 8), (50, 50, 128), (20, 90, 6)]
)
def test_causal_column_sums_equal_the_masked_reference(monkeypatch, num_q, num_k, block):
    monkeypatch.setattr(scoring, "CAUSAL_QUERY_BLOCK", block)  # several blocks, a ragged last one
    generator = torch.Generator().manual_seed(num_q + num_k)
    query = torch.randn(2, 4, num_q, 8, generator=generator) * 2
    keys = torch.randn(2, 2, num_k, 8, generator=generator) * 2
    reference = column_scores(query, keys, None, 0.3)  # causal: the queries are the last num_q keys
    torch.testing.assert_close(causal_column_scores(query, keys, 0.3), reference, rtol=1e-5, atol=1e-6)
    # per query head: the group mean of the head sums is the KV-head score; every query's probabilities sum to 1
    sums = causal_head_column_sums(query, keys, 0.3)
    assert sums.shape == (2, 4, num_k)
    torch.testing.assert_close(sums.view(2, 2, 2, num_k).mean(2), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.sum(-1), torch.full((2, 4), float(num_q)), rtol=1e-5, atol=1e-5)
    assert bool((sums[..., 0] > 0).all())  # the first key is seen by every query


@pytest.mark.parametrize("num_q, num_k, block", [(7, 7, 4), (33, 70, 8), (50, 50, 64), (20, 90, 6)])
def test_column_sums_from_lse_equal_the_masked_reference(monkeypatch, num_q, num_k, block):
    """``exp(logit - lse)`` with the log-sum-exp given (as SDPA's CPU flash kernel returns it) is the softmax."""
    monkeypatch.setattr(scoring, "LSE_QUERY_BLOCK", block)  # several blocks, a ragged last one
    generator = torch.Generator().manual_seed(num_q * num_k)
    query = torch.randn(2, 4, num_q, 8, generator=generator) * 2
    keys = torch.randn(2, 2, num_k, 8, generator=generator) * 2
    logits = torch.einsum("bhgqd,bhkd->bhgqk", query.view(2, 2, 2, num_q, 8), keys) * 0.3
    causal = torch.arange(num_k)[None, :] <= torch.arange(num_k - num_q, num_k)[:, None]
    lse = logits.masked_fill(~causal, float("-inf")).logsumexp(-1).view(2, 4, num_q)
    reference = causal_head_column_sums(query, keys, 0.3)  # the softmax path
    sums = causal_head_column_sums(query, keys, 0.3, lse)
    # each probability is exp of a float32 difference of O(|lse|): relative error a few ulps of |lse| <= 40
    torch.testing.assert_close(sums, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(causal_column_scores(query, keys, 0.3, lse), column_scores(query, keys, None, 0.3))


def test_column_sums_from_sdpa_flash_log_sum_exp():
    """The log-sum-exp the CPU flash kernel returns (the one ScoredLayer.attend passes) gives the same sums."""
    generator = torch.Generator().manual_seed(3)
    query, keys, values = (torch.randn(1, heads, 150, 16, generator=generator) for heads in (4, 2, 2))
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, values, 0.0, True, scale=0.25)
    reference = causal_head_column_sums(query, keys, 0.25)
    torch.testing.assert_close(causal_head_column_sums(query, keys, 0.25, lse), reference, rtol=1e-5, atol=1e-6)
