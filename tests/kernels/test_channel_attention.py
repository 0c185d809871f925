"""channel_attention: Triton vs the torch reference on ThinK-pruned keys, with and without a full-width tail."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.kernels import channel_attention, decode_attention
from hf_longmem.kernels.channel_attention.reference import naive_channel_attention

from .common import DEVICE, assert_close, needs_triton, pad_mask, rand

N, D, DV, D_KEEP = 37, 24, 20, 14

# (batch, q_heads, kv_heads, q, full-width tail length r, index dtype, dtype). q = 7 > r = 5: the causal limit
# reaches into the pruned slots.
CASES = [
    (2, 6, 2, 1, 0, torch.int16, torch.float32),
    (2, 6, 2, 3, 5, torch.int32, torch.float32),
    (1, 6, 2, 7, 5, torch.int64, torch.float32),
    (2, 3, 3, 3, 0, torch.int16, torch.float32),
    (2, 6, 2, 3, 5, torch.int16, torch.float16),
]


def _ids(case):
    b, hq, hkv, q, r, index_dtype, dtype = case
    return f"B{b}-Hq{hq}-Hkv{hkv}-q{q}-r{r}-{str(index_dtype)[6:]}-{str(dtype)[6:]}"


def _inputs(b, hq, hkv, q, r, index_dtype, dtype, seed=0):
    """Full keys ``[b, Hkv, N + r, D]`` and their ThinK split: the first N slots pruned, the last r full width."""
    generator = torch.Generator().manual_seed(seed)
    query = rand(b, hq, q, D, dtype=dtype, seed=seed)
    keys = rand(b, hkv, N + r, D, dtype=dtype, seed=seed + 1)
    values = rand(b, hkv, N + r, DV, dtype=dtype, seed=seed + 2)
    index = torch.stack([torch.randperm(D, generator=generator)[:D_KEEP].sort().values for _ in range(b * hkv)])
    index = index.view(b, hkv, D_KEEP).to(device=DEVICE, dtype=index_dtype)
    pruned = keys[:, :, :N].gather(-1, index.long()[:, :, None, :].expand(-1, -1, N, -1))
    valid = pad_mask(b, N + r, q, hkv, seed=seed)
    tail = {}
    if r:
        tail = {"keys_full": keys[:, :, N:], "values_full": values[:, :, N:], "valid_full": valid[..., N:]}
    return query, keys, values, index, pruned, valid, tail


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference(case):
    from hf_longmem.kernels.channel_attention.triton import triton_channel_attention

    b, hq, hkv, q, r, index_dtype, dtype = case
    query, _, values, index, pruned, valid, tail = _inputs(b, hq, hkv, q, r, index_dtype, dtype)
    args = (query, pruned, index, values[:, :, :N], D**-0.5, valid[..., :N], True)
    ref_out, ref_lse = naive_channel_attention(*args, **tail)
    out, lse = triton_channel_attention(*args, **tail, block_n=16, num_splits=2)
    assert_close("out", ref_out, out, dtype)
    assert_close("lse", ref_lse, lse, dtype)


@needs_triton
def test_public_triton_path():
    query, _, values, index, pruned, valid, tail = _inputs(2, 6, 2, 3, 5, torch.int16, torch.float32, seed=3)
    args = (query, pruned, index, values[:, :, :N], D**-0.5, valid[..., :N])
    out, lse = channel_attention(*args, **tail, backend="triton")
    ref_out, ref_lse = channel_attention(*args, **tail, backend="torch")
    assert_close("out", ref_out, out, torch.float32)
    assert_close("lse", ref_lse, lse, torch.float32)


@pytest.mark.parametrize("r", [0, 5])
def test_reference_semantics(r):
    """Keeping every channel is decode attention over the union; pruning scores only the kept channels."""
    b, hq, hkv, q = 2, 6, 2, 3
    query, keys, values, _, _, valid, _ = _inputs(b, hq, hkv, q, r, torch.int64, torch.float32)
    everything = torch.arange(D, device=DEVICE).expand(b, hkv, D)
    tail = {"keys_full": keys[:, :, N:], "values_full": values[:, :, N:], "valid_full": valid[..., N:]} if r else {}
    out, lse = channel_attention(query, keys[:, :, :N], everything, values[:, :, :N], D**-0.5, valid[..., :N], **tail)
    expected = decode_attention(query, keys, values, D**-0.5, valid)
    assert_close("out", expected[0], out, torch.float32)
    assert_close("lse", expected[1], lse, torch.float32)

    # zeroing the dropped channels of full keys gives the same logits as pruned keys + gathered queries
    index = torch.arange(0, D, 2, device=DEVICE).expand(b, hkv, D // 2)
    pruned = keys[:, :, :N, ::2]
    zeroed = keys.clone()
    zeroed[:, :, :N, 1::2] = 0
    out, lse = channel_attention(query, pruned, index, values[:, :, :N], D**-0.5, valid[..., :N], **tail)
    expected = decode_attention(query, zeroed, values, D**-0.5, valid)
    assert_close("out", expected[0], out, torch.float32)
    assert_close("lse", expected[1], lse, torch.float32)


@needs_triton
def test_softcap_triton_matches_reference():
    from hf_longmem.kernels.channel_attention.triton import triton_channel_attention

    query, _, values, index, pruned, valid, tail = _inputs(2, 6, 2, 3, 5, torch.int32, torch.float32, seed=1)
    args = (query * 4, pruned, index, values[:, :, :N], D**-0.5, valid[..., :N], True)
    ref_out, ref_lse = naive_channel_attention(*args, **tail, softcap=1.5)
    out, lse = triton_channel_attention(*args, **tail, softcap=1.5, block_n=16, num_splits=2)
    assert_close("out", ref_out, out, torch.float32)
    assert_close("lse", ref_lse, lse, torch.float32)
    plain, _ = naive_channel_attention(*args, **tail)
    assert (plain - ref_out).abs().max() > 1e-2
