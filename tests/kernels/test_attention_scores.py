"""attention_column_scores: Triton (two passes) vs the torch reference vs memory.scoring.column_scores."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.kernels import attention_column_scores
from hf_longmem.kernels.attention_scores import reference
from hf_longmem.memory.scoring import column_scores

from .common import DEVICE, assert_close, needs_triton, pad_mask, rand

N, D = 37, 24

# (batch, q_heads, kv_heads, q, pads, dtype): decode (q = 1), SnapKV window (q = 3), H2O prefill (q = n).
CASES = [
    (2, 6, 2, 1, False, torch.float32),
    (2, 6, 2, 3, True, torch.float32),
    (1, 6, 2, N, True, torch.float32),
    (2, 3, 3, 3, False, torch.float32),
    (2, 3, 3, 9, True, torch.float32),
    (2, 6, 2, 3, True, torch.float16),
]


def _ids(case):
    b, hq, hkv, q, pads, dtype = case
    return f"B{b}-Hq{hq}-Hkv{hkv}-q{q}-{'pads' if pads else 'nopad'}-{str(dtype)[6:]}"


def _inputs(b, hq, hkv, q, pads, dtype, seed=0):
    query = rand(b, hq, q, D, dtype=dtype, seed=seed)
    keys = rand(b, hkv, N, D, dtype=dtype, seed=seed + 1)
    valid = pad_mask(b, N, q, seed=seed) if pads else None
    query_valid = valid[:, N - q :].clone() if pads else None
    if pads:
        query_valid[-1, 0] = False  # a pad query among real slots
    return query, keys, valid, query_valid


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference(case):
    from hf_longmem.kernels.attention_scores.triton import triton_attention_column_scores

    b, hq, hkv, q, pads, dtype = case
    query, keys, valid, query_valid = _inputs(b, hq, hkv, q, pads, dtype)
    expected = reference.naive_attention_column_scores(query, keys, D**-0.5, valid, True, query_valid)
    # 16-row / 16-key tiles: several row tiles per key block and a partial last key block
    scores = triton_attention_column_scores(query, keys, D**-0.5, valid, True, query_valid, block_m=16, block_n=16)
    assert scores.dtype == torch.float32
    assert_close("scores", expected, scores, dtype)


@needs_triton
def test_public_triton_path_per_head_pads():
    query, keys, _, query_valid = _inputs(2, 6, 2, 3, True, torch.float32, seed=5)
    valid = pad_mask(2, N, 3, kv_heads=2, seed=5)
    scores = attention_column_scores(query, keys, D**-0.5, valid, query_valid=query_valid, backend="triton")
    expected = attention_column_scores(query, keys, D**-0.5, valid, query_valid=query_valid, backend="torch")
    assert_close("scores", expected, scores, torch.float32)
    assert (scores.masked_select(~valid) == 0).all()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_equals_memory_scoring(case, monkeypatch):
    """Same numbers as the torch scorer H2O/SnapKV use, with its mask = causal & valid & query_valid."""
    b, hq, hkv, q, pads, dtype = case
    monkeypatch.setattr(reference, "QUERY_CHUNK", 4)  # exercise the query chunking
    query, keys, valid, query_valid = _inputs(b, hq, hkv, q, pads, dtype)
    scores = attention_column_scores(query, keys, D**-0.5, valid, query_valid=query_valid)
    mask = None
    if pads:
        causal = torch.arange(N, device=DEVICE)[None, :] <= torch.arange(N - q, N, device=DEVICE)[:, None]
        mask = (causal[None] & valid[:, None, :] & query_valid[:, :, None])[:, None]
    expected = column_scores(query, keys, mask, D**-0.5)
    assert_close("scores", expected, scores, torch.float32)
    # every real query spreads a total attention of 1 over the keys of each KV head
    real_queries = q * b if query_valid is None else query_valid.sum().item()
    assert scores.sum().item() == pytest.approx(real_queries * hkv, rel=1e-4)
