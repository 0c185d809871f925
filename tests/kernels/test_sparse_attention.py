"""sparse_attention (LongGen): Triton block-sparse kernel vs the torch mask-based reference, forward and backward; the
tile layout never skips an allowed pair; the reference against a dense softmax; argument checks."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.kernels.sparse_attention import SparsePattern, naive_sparse_attention, sparse_attention

from .common import DEVICE, assert_close, needs_triton, rand

PATTERNS = {
    "sink_window": SparsePattern("sink_window", sink_size=3, window=7),
    "block_sparse": SparsePattern("block_sparse", block_size=4, local_blocks=2, vertical_stride=3),
    "block_sparse_big_blocks": SparsePattern("block_sparse", block_size=20, local_blocks=1, vertical_stride=2),
}
D, DV = 20, 12


def _positions(kind: str, batch: int, n: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query_positions [b, q], key_positions [b, n])``: a training layout (0..n-1), left padding on row 1, or a
    cache after eviction (sinks, a gap, then the recent tokens, with empty slots on row 1)."""
    keys = torch.arange(n).repeat(batch, 1)
    if kind == "padded":
        keys[1, :5] = -1
        keys[1, 5:] -= 5
    elif kind == "evicted":
        keys = torch.cat([torch.arange(3), torch.arange(40, 40 + n - 3)]).repeat(batch, 1)
        keys[1, 3:9] = -1  # a shorter row: empty slots
    return keys[:, n - q :].to(DEVICE), keys.to(DEVICE)


CASES = [
    # (pattern, layout, batch, q_heads, kv_heads, q, n, dtype)
    ("sink_window", "train", 2, 4, 2, 37, 37, torch.float32),
    ("sink_window", "padded", 2, 4, 2, 37, 37, torch.float32),
    ("sink_window", "evicted", 2, 4, 2, 3, 29, torch.float32),
    ("block_sparse", "train", 2, 4, 2, 37, 37, torch.float32),
    ("block_sparse", "padded", 2, 3, 3, 37, 37, torch.float32),
    ("block_sparse", "evicted", 2, 4, 1, 1, 29, torch.float32),
    ("block_sparse_big_blocks", "train", 1, 2, 2, 45, 45, torch.float32),
    ("block_sparse", "train", 2, 4, 2, 37, 37, torch.float16),
]


def _ids(case):
    name, layout, b, hq, hkv, q, n, dtype = case
    return f"{name}-{layout}-B{b}-Hq{hq}-Hkv{hkv}-q{q}-n{n}-{str(dtype)[6:]}"


def _inputs(case, seed=0):
    name, layout, b, hq, hkv, q, n, dtype = case
    query = rand(b, hq, q, D, dtype=dtype, seed=seed).requires_grad_()
    keys = rand(b, n, hkv, D, dtype=dtype, seed=seed + 1).transpose(1, 2).detach().requires_grad_()  # strided
    values = rand(b, hkv, n, DV, dtype=dtype, seed=seed + 2).requires_grad_()
    qpos, kpos = _positions(layout, b, n, q)
    return query, keys, values, qpos, kpos, PATTERNS[name]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference_forward_and_backward(case):
    query, keys, values, qpos, kpos, pattern = _inputs(case)
    dtype = case[-1]
    upstream = rand(*query.shape[:3], DV, dtype=dtype, seed=9)
    results = {}
    for backend in ("torch", "triton"):
        out, lse = sparse_attention(query, keys, values, qpos, kpos, D**-0.5, pattern, backend=backend)
        grads = torch.autograd.grad((out.float() * upstream.float()).sum(), (query, keys, values))
        results[backend] = (out, lse, *grads)
    for name, ref, tri in zip(("out", "lse", "dq", "dk", "dv"), results["torch"], results["triton"]):
        assert tri.dtype == ref.dtype
        assert_close(name, ref, tri, dtype)


@needs_triton
def test_layout_skips_tiles_and_never_an_allowed_pair():
    """The tile layout marks every tile that holds an allowed pair, and skips most tiles of a long sparse pattern."""
    from hf_longmem.kernels.sparse_attention.triton import BLOCK, tile_layout

    n = 160
    for name, pattern in PATTERNS.items():
        for layout in ("train", "padded", "evicted"):
            qpos, kpos = _positions(layout, 2, n, n if layout != "evicted" else 5)
            tiles = tile_layout(qpos, kpos, pattern).bool()
            allowed = pattern.allowed(qpos, kpos)
            q_tiles, k_tiles = tiles.shape[1:]
            padded = torch.zeros(2, q_tiles * BLOCK, k_tiles * BLOCK, dtype=torch.bool, device=allowed.device)
            padded[:, : allowed.shape[1], : allowed.shape[2]] = allowed
            occupied = padded.view(2, q_tiles, BLOCK, k_tiles, BLOCK).any(4).any(2)
            assert not bool((occupied & ~tiles).any()), f"{name}/{layout}: an allowed pair in a skipped tile"
    qpos, kpos = _positions("train", 1, n, n)
    assert tile_layout(qpos, kpos, PATTERNS["sink_window"]).float().mean() < 0.5


def test_reference_equals_dense_softmax_over_the_allowed_keys():
    """Row by row, the reference is softmax attention over exactly the keys the pattern allows (dense, in float64)."""
    case = ("block_sparse", "padded", 2, 4, 2, 37, 37, torch.float32)
    query, keys, values, qpos, kpos, pattern = _inputs(case)
    out, lse, weights = naive_sparse_attention(query, keys, values, qpos, kpos, D**-0.5, pattern)
    allowed = pattern.allowed(qpos, kpos)
    for b in range(2):
        for h in range(4):
            for i in range(37):
                cols = torch.nonzero(allowed[b, i]).flatten()
                if cols.numel() == 0:
                    assert bool((out[b, h, i] == 0).all()) and lse[b, h, i] == float("-inf")
                    continue
                k, v = keys[b, h // 2, cols].double(), values[b, h // 2, cols].double()
                p = torch.softmax(query[b, h, i].double() @ k.T * D**-0.5, -1)
                torch.testing.assert_close(out[b, h, i].double(), p @ v, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(weights[b, h, i, cols].double(), p, rtol=1e-5, atol=1e-6)
    assert float(weights.detach().masked_select(~allowed[:, None].expand_as(weights)).abs().sum()) == 0.0


def test_argument_checks():
    case = ("sink_window", "train", 2, 4, 2, 37, 37, torch.float32)
    query, keys, values, qpos, kpos, pattern = _inputs(case)
    with pytest.raises(ValueError, match="query_positions"):
        sparse_attention(query, keys, values, qpos[:, :5], kpos, D**-0.5, pattern, backend="torch")
    with pytest.raises(ValueError, match="key_positions"):
        sparse_attention(query, keys, values, qpos, kpos.float(), D**-0.5, pattern, backend="torch")
    with pytest.raises(ValueError, match="pattern"):
        sparse_attention(query, keys, values, qpos, kpos, D**-0.5, "sink_window", backend="torch")
    with pytest.raises(ValueError, match="window"):
        SparsePattern("sink_window", window=0)
    with pytest.raises(ValueError, match="sparse"):
        SparsePattern("strided")
