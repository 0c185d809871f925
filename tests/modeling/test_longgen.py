"""LongGen: full forward == prefill + decode for both sparse patterns, what the cache stores, conversion of a Llama
model, refusals, the embedded model's KV saving (exact arithmetic) and the transformers conformance suite."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_longmem.modeling.longgen import LongGenCache, LongGenConfig, LongGenForCausalLM, LongGenModel
from tests.kernels.common import needs_triton
from tests.modeling.conformance import ConformanceSuite, ModelTester, randomize_

PATTERNS = {
    "sink_window": dict(sparse="sink_window", sink_size=2, window=5),
    "block_sparse": dict(sparse="block_sparse", block_size=3, local_blocks=2, vertical_stride=2),
}
# float32 logits (|logit| ~ 10) from sums run in another order: a few 2**-24 relative per layer; the bound of the issue
PARITY_ATOL = 1e-5


def _config(sparse: str = "sink_window", **overrides) -> LongGenConfig:
    fields = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        full_layers=[1],
        pad_token_id=0,
        **PATTERNS[sparse],
    )
    fields.update(overrides)
    return LongGenConfig(**fields)


def _model(sparse: str = "sink_window", **overrides) -> LongGenForCausalLM:
    torch.manual_seed(0)
    model = LongGenForCausalLM(_config(sparse, **overrides))
    randomize_(model)
    return model.eval()


def _llama_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    fields.update(overrides)
    return LlamaConfig(**fields)


def _ids(batch: int = 2, length: int = 29, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparse", list(PATTERNS))
def test_full_forward_equals_prefill_and_decode(sparse):
    """One forward over 29 tokens == a 10-token prefill, a 6-token chunk, then token-by-token decode (the sparse
    layers' caches evicted on the way)."""
    model = _model(sparse)
    ids = _ids()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = LongGenCache(model.config)
        pieces = [model(ids[:, :10], cache=cache).logits, model(ids[:, 10:16], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(16, ids.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=PARITY_ATOL)
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.layers[0].stored_length() < ids.shape[1]  # the sparse layers did evict


def test_full_forward_equals_decode_with_left_padding():
    """A left-padded batch decoded token by token gives, at the real tokens, the full forward of each row alone."""
    model = _model("block_sparse")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        cache = LongGenCache(model.config)
        steps = [model(ids[:, :8], attention_mask=mask[:, :8], cache=cache).logits]
        for t in range(8, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
        alone = model(ids[1:, 5:], use_cache=False).logits
    torch.testing.assert_close(torch.cat(steps, 1)[1, 5:], alone[0], rtol=0, atol=PARITY_ATOL)


def _expected_kept(pattern, length: int) -> list[int]:
    """Positions a query at ``length`` or later can read, by brute force over queries up to far beyond."""
    queries = torch.arange(length, length + 20 * (pattern.block_size + pattern.window))[None]
    allowed = pattern.allowed(queries, torch.arange(length)[None])[0].any(0)
    return torch.nonzero(allowed).flatten().tolist()


@pytest.mark.parametrize("sparse", list(PATTERNS))
def test_sparse_layers_store_exactly_what_later_queries_read(sparse):
    model = _model(sparse)
    ids = _ids(batch=1, length=26)
    cache = LongGenCache(model.config)
    with torch.no_grad():
        model(ids[:, :20], cache=cache)
        model(ids[:, 20:21], cache=cache)
        model(ids[:, 21:], cache=cache)
    expected = _expected_kept(model.config.sparse_pattern(), 26)
    for idx in (0, 2):
        assert cache.layers[idx].positions[0].tolist() == expected
    assert cache.layers[1].keys.shape[-2] == 26  # the full layer keeps everything
    if sparse == "sink_window":
        assert len(expected) == 2 + 5 - 1  # sinks + the window minus the next query itself


def test_kv_bytes_ratio_of_half_sparse_model_matches_the_arithmetic():
    """4 layers, 2 sparse with sinks 4 + window 16, 128 tokens: the sparse layers hold 4 + 15 slots, the full ones
    128, so the KV bytes are (2 * 128 + 2 * 19) / (4 * 128) of a full cache, the base model's DynamicCache."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(_llama_config(num_hidden_layers=4)).eval()
    model = LongGenForCausalLM.from_pretrained_base(llama, full_layers=[1, 2], sink_size=4, window=16)
    ids = _ids(batch=1, length=128)
    cache, full = LongGenCache(model.config), DynamicCache(config=llama.config)
    with torch.no_grad():
        model(ids, cache=cache)
        llama(ids, cache=full)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    assert cache.kv_bytes() * (4 * 128) == full_bytes * (2 * 128 + 2 * 19)
    assert cache.memory_bytes() == cache.kv_bytes() + 2 * 19 * 8  # plus the sparse layers' int64 positions


def test_conversion_keeps_weights_and_all_full_layers_equal_the_base():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(_llama_config(num_hidden_layers=2, tie_word_embeddings=True)).eval()
    randomize_(llama)
    ids = _ids()
    converted = LongGenForCausalLM.from_pretrained_base(llama, full_layers=[0, 1])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, llama(ids).logits, rtol=0, atol=0)
    sparse = LongGenForCausalLM.from_pretrained_base(llama, full_layers=[1], window=4)
    assert sparse.config.model_type == "longgen" and sparse.config.full_layers == [1]
    for name, tensor in llama.state_dict().items():
        torch.testing.assert_close(sparse.state_dict()[name], tensor, rtol=0, atol=0)
    with torch.no_grad():  # the first layer's window of 4 changes what it reads: no longer the base model
        assert not torch.allclose(sparse(ids).logits, llama(ids).logits)


def test_mistral_without_sliding_window_converts_exactly():
    from tests.helpers.tiny_models import tiny_model

    mistral = tiny_model("mistral")
    converted = LongGenForCausalLM.from_pretrained_base(mistral, full_layers=[0, 1])
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, mistral(ids).logits, rtol=0, atol=0)


def test_refusals():
    with pytest.raises(ValueError, match="full_layers"):
        _config(full_layers=[3])
    with pytest.raises(ValueError, match="sparse"):
        LongGenConfig(sparse="strided")
    with pytest.raises(ValueError, match="window"):
        _config(window=0)
    model = _model()
    with pytest.raises(ValueError, match="LongGenCache"):
        model(_ids(), cache=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="attention_mask"):
        model(_ids(), attention_mask=torch.ones(2, 3))
    from tests.helpers.tiny_models import tiny_model

    with pytest.raises(ValueError, match="unsupported model"):  # Qwen2's q/k/v biases: not Llama-shaped
        LongGenForCausalLM.from_pretrained_base(tiny_model("qwen2"))
    with pytest.raises(ValueError, match="sliding-window"):
        LongGenForCausalLM.from_pretrained_base(tiny_model("mistral", sliding_window=8))
    cache = LongGenCache(model.config)
    with torch.no_grad():
        model(_ids(), cache=cache)
    with pytest.raises(ValueError, match="cropped"):
        cache.crop(5)


def test_auto_classes():
    config = _config()
    assert type(AutoModelForCausalLM.from_config(config)) is LongGenForCausalLM
    assert isinstance(AutoModelForCausalLM.from_config(config).model, LongGenModel)


@needs_triton
@pytest.mark.parametrize("sparse", list(PATTERNS))
def test_triton_backend_matches_torch_end_to_end(sparse):
    """The model on the Triton kernel (interpreted on CPU) computes the torch reference's logits and gradients."""
    ids = _ids(batch=2, length=21)
    results = {}
    for backend in ("torch", "triton"):
        model = _model(sparse, sparse_backend=backend)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        results[backend] = loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-4, atol=1e-5)


# ---- transformers conformance (tests/modeling/conformance.py) ---------------------------------------------------------


class LongGenTester(ModelTester):
    """Two layers (a sink-window layer with window 4 and a full one); 11 tokens cross the window."""

    model_class = LongGenForCausalLM
    base_model_class = LongGenModel
    num_hidden_states = 3
    doc = "docs/longgen.md"

    def get_config(self, **overrides):
        fields = dict(
            vocab_size=61,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            full_layers=[1],
            sparse="sink_window",
            sink_size=2,
            window=4,
            pad_token_id=0,
        )
        fields.update(overrides)
        return LongGenConfig(**fields)

    def prepare_model(self, model):
        randomize_(model)
        return model


class TestLongGenConformance(ConformanceSuite):
    tester = LongGenTester()


def test_sparse_layers_call_the_attention_interface_entry():
    """The sparse layers look their attention up in transformers' AttentionInterface (``"longgen_sparse"``): a
    function registered there under that name is what they run."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from hf_longmem.modeling.longgen import longgen_sparse_attention

    assert ALL_ATTENTION_FUNCTIONS["longgen_sparse"] is longgen_sparse_attention
    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return longgen_sparse_attention(module, *args, **kwargs)

    model, ids = _model(), _ids()
    with torch.no_grad():
        expected = model(ids).logits
        AttentionInterface.register("longgen_sparse", counting)
        try:
            got = model(ids).logits
        finally:
            AttentionInterface.register("longgen_sparse", longgen_sparse_attention)
    assert calls == [0, 2]  # the sparse layers, once each
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
