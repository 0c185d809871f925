"""decode_attention: Triton (split-K) vs the torch reference, the LSE merge identity, dispatch."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.kernels import decode_attention, merge_attention
from hf_longmem.kernels.decode_attention.reference import naive_decode_attention

from .common import DEVICE, assert_close, needs_triton, pad_mask, rand

N, D, DV = 37, 24, 20

# (batch, q_heads, kv_heads, q, valid, causal_new, dtype): odd n/d/dv, GQA and MHA, q = 1 and 3, pads per row
# or per KV head.
CASES = [
    (2, 6, 2, 1, "row", True, torch.float32),
    (2, 6, 2, 3, None, True, torch.float32),
    (2, 6, 2, 3, "head", True, torch.float32),
    (1, 6, 2, 3, "row", False, torch.float32),
    (2, 3, 3, 1, None, True, torch.float32),
    (2, 3, 3, 3, "row", True, torch.float32),
    (2, 6, 2, 3, "row", True, torch.float16),
]


def _ids(case):
    b, hq, hkv, q, valid, causal, dtype = case
    return f"B{b}-Hq{hq}-Hkv{hkv}-q{q}-{valid or 'nopad'}-{'causal' if causal else 'full'}-{str(dtype)[6:]}"


def _inputs(b, hq, hkv, q, valid, dtype, n=N, seed=0):
    query = rand(b, hq, q, D, dtype=dtype, seed=seed)
    # keys as a strided view of a [b, n, Hkv, d] buffer: the kernel must honour strides
    keys = rand(b, n, hkv, D, dtype=dtype, seed=seed + 1).transpose(1, 2)
    values = rand(b, hkv, n, DV, dtype=dtype, seed=seed + 2)
    mask = None if valid is None else pad_mask(b, n, q, hkv if valid == "head" else None, seed=seed)
    return query, keys, values, mask


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_reference(case):
    from hf_longmem.kernels.decode_attention.triton import triton_decode_attention

    b, hq, hkv, q, valid, causal, dtype = case
    query, keys, values, mask = _inputs(b, hq, hkv, q, valid, dtype)
    ref_out, ref_lse = naive_decode_attention(query, keys, values, D**-0.5, mask, causal)
    # 3 splits of 16 keys over n = 37: a partial last block and a merge of splits
    out, lse = triton_decode_attention(query, keys, values, D**-0.5, mask, causal, block_n=16, num_splits=3)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", ref_out, out, dtype)
    assert_close("lse", ref_lse, lse, dtype)


@needs_triton
def test_public_triton_path_and_fully_masked_rows():
    """Dispatcher's Triton path with its default tiling; a row whose slots are all pads gives zeros and -inf."""
    query, keys, values, mask = _inputs(2, 6, 2, 1, "row", torch.float32)
    mask[1] = False
    out, lse = decode_attention(query, keys, values, D**-0.5, valid=mask, backend="triton")
    ref_out, ref_lse = decode_attention(query, keys, values, D**-0.5, valid=mask, backend="torch")
    assert_close("out", ref_out, out, torch.float32)
    assert_close("lse", ref_lse, lse, torch.float32)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    assert torch.isfinite(lse[0]).all()


def test_reference_equals_sdpa():
    """The spec agrees with PyTorch's SDPA on repeated keys (causal over the last q slots, pads masked)."""
    b, hq, hkv, q = 2, 6, 2, 3
    query, keys, values, mask = _inputs(b, hq, hkv, q, "row", torch.float32)
    out, _ = naive_decode_attention(query, keys, values, D**-0.5, mask, True)
    causal = torch.arange(N, device=DEVICE)[None, :] <= torch.arange(N - q, N, device=DEVICE)[:, None]
    allowed = (causal[None] & mask[:, None, :])[:, None]
    group = hq // hkv
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), attn_mask=allowed, scale=D**-0.5
    )
    assert_close("out", expected, out, torch.float32)


@pytest.mark.parametrize("split", [1, 20, 34])
def test_merge_identity(split):
    """Attention over [A; B] equals the merge of attention over A and over B (the new queries sit in B)."""
    query, keys, values, mask = _inputs(2, 6, 2, 3, "row", torch.float32)
    full = naive_decode_attention(query, keys, values, D**-0.5, mask, True)
    part_a = decode_attention(query, keys[:, :, :split], values[:, :, :split], D**-0.5, mask[:, :split], False)
    part_b = decode_attention(query, keys[:, :, split:], values[:, :, split:], D**-0.5, mask[:, split:], True)
    out, lse = merge_attention(*part_a, *part_b)
    assert_close("out", full[0], out, torch.float32)
    assert_close("lse", full[1], lse, torch.float32)
    swapped = merge_attention(*part_b, *part_a)  # symmetric
    assert_close("out", out, swapped[0], torch.float32)


def test_merge_with_empty_sides():
    out = rand(2, 3, 4)
    lse = torch.randn(2, 3, device=DEVICE)
    empty_lse = torch.full_like(lse, float("-inf"))
    merged, merged_lse = merge_attention(out, lse, torch.zeros_like(out), empty_lse)
    assert torch.equal(merged_lse, lse) and torch.allclose(merged, out)
    both, both_lse = merge_attention(torch.zeros_like(out), empty_lse, torch.zeros_like(out), empty_lse)
    assert torch.isneginf(both_lse).all() and (both == 0).all()
    with pytest.raises(ValueError, match="matching shapes"):
        merge_attention(out, lse, out[:, :2], lse[:, :2])


@needs_triton
@pytest.mark.parametrize("q", [1, 3])
def test_softcap_triton_matches_reference_and_eager(q):
    """Gemma-2 soft-capping: Triton == reference == ``tanh(s / cap) * cap`` before the mask (eager's order)."""
    from hf_longmem.kernels.decode_attention.triton import triton_decode_attention

    query, keys, values, mask = _inputs(2, 6, 2, q, "row", torch.float32)
    query = query * 4  # logits well past the cap
    cap = 1.5
    ref_out, ref_lse = naive_decode_attention(query, keys, values, D**-0.5, mask, True, softcap=cap)
    out, lse = triton_decode_attention(query, keys, values, D**-0.5, mask, True, softcap=cap, block_n=16, num_splits=3)
    assert_close("out", ref_out, out, torch.float32)
    assert_close("lse", ref_lse, lse, torch.float32)
    group = 3
    logits = query @ keys.repeat_interleave(group, 1).transpose(-1, -2) * D**-0.5
    logits = torch.tanh(logits / cap) * cap
    causal = torch.arange(N, device=DEVICE)[None, :] <= torch.arange(N - q, N, device=DEVICE)[:, None]
    allowed = (causal[None] & mask[:, None, :])[:, None]
    expected = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ values.repeat_interleave(group, 1)
    assert_close("out", expected, ref_out, torch.float32)
    plain, _ = naive_decode_attention(query, keys, values, D**-0.5, mask, True)
    assert (plain - ref_out).abs().max() > 1e-2  # the cap matters on these logits
