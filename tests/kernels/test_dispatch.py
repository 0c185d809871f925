"""Backend choice and argument errors of the public kernel ops."""

from __future__ import annotations

import importlib

import pytest
import torch

from hf_longmem.kernels import attention_column_scores, channel_attention, decode_attention, sparse_attention, utils
from hf_longmem.kernels.sparse_attention import SparsePattern

from .common import DEVICE, rand

B, HQ, HKV, Q, N, D = 2, 6, 2, 3, 11, 8


@pytest.fixture
def qkv():
    return rand(B, HQ, Q, D, seed=0), rand(B, HKV, N, D, seed=1), rand(B, HKV, N, D, seed=2)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU default path")
def test_cpu_dispatches_to_torch_by_default(qkv, monkeypatch):
    """Even with triton installed (and the interpreter on), CPU tensors take the torch reference by default."""
    assert utils.resolve_backend(None, *qkv) == "torch"
    calls = []
    for module, name in (
        ("decode_attention", "naive_decode_attention"),
        ("channel_attention", "naive_channel_attention"),
        ("attention_scores", "naive_attention_column_scores"),
        ("sparse_attention", "naive_sparse_attention"),
    ):
        # the op folders are shadowed by their functions on `hf_longmem.kernels`: import them by name
        module = importlib.import_module(f"hf_longmem.kernels.{module}")
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    query, keys, values = qkv
    decode_attention(query, keys, values, D**-0.5)
    channel_attention(query, keys[..., :4], torch.arange(4, device=DEVICE).expand(B, HKV, 4), values, D**-0.5)
    attention_column_scores(query, keys, D**-0.5)
    positions = torch.arange(N, device=DEVICE).expand(B, N)
    sparse_attention(query, keys, values, positions[:, -Q:], positions, D**-0.5, SparsePattern(window=4))
    assert calls == [
        "naive_decode_attention",
        "naive_channel_attention",
        "naive_attention_column_scores",
        "naive_sparse_attention",
    ]


def test_resolve_backend_errors(qkv, monkeypatch):
    with pytest.raises(ValueError, match="`backend`"):
        utils.resolve_backend("cuda", *qkv)
    assert utils.resolve_backend("torch", *qkv) == "torch"
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            utils.resolve_backend("triton", *qkv)
    monkeypatch.setattr(utils, "triton_available", lambda: False)
    assert utils.resolve_backend(None, *qkv) == "torch"
    with pytest.raises(ImportError, match="triton"):
        utils.resolve_backend("triton", *qkv)


def _decode_errors(query, keys, values):
    bool_valid = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    return [
        ({"query": query[0]}, "`query` must be a 4-D tensor"),
        ({"keys": keys.long()}, "`keys` must be a floating-point"),
        ({"keys": keys[:1], "values": values[:1]}, "batch sizes differ"),
        ({"values": values[:, :, :5]}, "`values`.*must match `keys`"),
        ({"query": query[:, :5]}, "multiple of kv_heads"),
        ({"keys": keys[..., :5]}, "`keys` head_dim 5 must be 8"),
        ({"scaling": -1.0}, "`scaling`"),
        ({"scaling": "0.1"}, "`scaling`"),
        ({"valid": bool_valid.float()}, "`valid` must be a bool"),
        ({"valid": bool_valid[:, :5]}, "`valid` must be \\[batch, n\\]"),
        ({"query": rand(B, HQ, N + 1, D)}, "causal_new=True"),
        ({"backend": "cuda"}, "`backend`"),
        ({"keys": keys.half()}, "`keys` is torch.float16, `query` is torch.float32"),
    ]


@pytest.mark.parametrize("index", range(13))
def test_decode_attention_errors(qkv, index):
    query, keys, values = qkv
    overrides, message = _decode_errors(query, keys, values)[index]
    args = {"query": query, "keys": keys, "values": values, "scaling": D**-0.5, **overrides}
    with pytest.raises(ValueError, match=message):
        decode_attention(**args)


def test_channel_attention_errors(qkv):
    query, keys, values = qkv
    index = torch.arange(4, device=DEVICE).expand(B, HKV, 4)
    pruned = keys[..., :4]
    base = {"query": query, "keys_pruned": pruned, "channel_index": index, "values": values, "scaling": D**-0.5}
    cases = [
        ({"channel_index": index.float()}, "`channel_index` must be a signed integer"),
        ({"channel_index": index[:, :1]}, "`channel_index` must be \\[batch, kv_heads, d_keep\\]"),
        (
            {
                "keys_pruned": rand(B, HKV, N, D + 2),
                "channel_index": torch.arange(D + 2, device=DEVICE).expand(B, HKV, D + 2),
            },
            "more",
        ),
        ({"keys_pruned": pruned[0]}, "`keys_pruned` must be a 4-D tensor"),
        ({"keys_full": keys}, "given together"),
        ({"valid_full": torch.ones(B, 2, dtype=torch.bool, device=DEVICE)}, "`valid_full` was given without"),
        ({"keys_full": keys[:, :1], "values_full": values[:, :1]}, "multiple of kv_heads|kv_heads"),
        ({"keys_full": keys[..., :4], "values_full": values}, "`keys_full` head_dim"),
        (
            {"keys_full": keys, "values_full": values, "valid_full": torch.ones(B, 3, dtype=torch.bool, device=DEVICE)},
            "valid_full",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            channel_attention(**{**base, **overrides})


def test_column_scores_errors(qkv):
    query, keys, _ = qkv
    base = {"query": query, "keys": keys, "scaling": D**-0.5}
    cases = [
        ({"keys": keys[..., :5]}, "`keys` head_dim"),
        ({"query": query[:, :5]}, "multiple of kv_heads"),
        ({"keys": keys[:1]}, "batch sizes differ"),
        ({"query_valid": torch.ones(B, Q + 1, dtype=torch.bool, device=DEVICE)}, "`query_valid` must be a bool tensor"),
        ({"query_valid": torch.ones(B, Q, device=DEVICE)}, "`query_valid` must be a bool tensor"),
        ({"valid": torch.ones(B, HKV + 1, N, dtype=torch.bool, device=DEVICE)}, "`valid` must be"),
        ({"scaling": 0.0}, "`scaling`"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            attention_column_scores(**{**base, **overrides})


def test_set_kernel_backend_is_per_cache_and_changes_no_class():
    from hf_longmem import make_cache
    from hf_longmem.cache_classes.scored import ScoredLayer
    from hf_longmem.kernels import set_kernel_backend
    from tests.helpers.tiny_models import tiny_model

    model = tiny_model("llama_gqa")
    forced = set_kernel_backend(make_cache("snapkv", model, budget=16, window_size=4), "torch")
    other = make_cache("snapkv", model, budget=16, window_size=4)
    assert [layer.kernel_backend for layer in forced.layers] == ["torch"] * len(forced.layers)
    assert [layer.kernel_backend for layer in other.layers] == [None] * len(other.layers)
    assert ScoredLayer.kernel_backend is None
    streaming = set_kernel_backend(make_cache("streaming", model, budget=16), "torch")  # no kernels: unchanged
    assert all("kernel_backend" not in vars(layer) for layer in streaming.layers)
    with pytest.raises(ValueError, match="backend"):
        set_kernel_backend(other, "cuda")
    with pytest.raises(ValueError, match="first use"):
        set_kernel_backend(make_cache("snapkv", None, budget=16, window_size=4), "torch")
