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
