"""Titans (MAC/MAG/MAL): parity of full forward vs prefill + decode, padding, generate, Auto classes, round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_longmem.modeling.titans import TitansCache, TitansConfig, TitansForCausalLM, TitansModel
from tests.helpers.parity import assert_same_training_step
from tests.kernels.common import DEVICE, needs_triton
from tests.modeling.conformance import ConformanceSuite, ModelTester

VARIANTS = ["mac", "mag", "mal"]


def _model(variant, **kwargs):
    options = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        variant=variant,
        sliding_window=6,
        segment_size=8,
        memory_chunk_size=4,
        memory_heads=2,
        num_persistent_tokens=2,
        memory_max_lr=0.5,
    )
    options.update(kwargs)
    torch.manual_seed(0)
    model = TitansForCausalLM(TitansConfig(**options)).eval()
    with torch.no_grad():  # livelier gates than the initialisation, so that the memory matters
        for layer in model.model.layers:
            if layer.has_memory:
                layer.memory.gates.bias.normal_(0, 1.0)
                layer.memory.conv.weight.normal_(0, 0.5)
    return model


def _ids(batch=2, length=23, seed=1):
    return torch.randint(3, 40, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_forward_equals_chunked_prefill_and_decode(variant, prefill=9):
    """23 tokens cross memory chunks (4), MAC segments (8) and the window (6); the prefill (3 + 6) ends mid-chunk."""
    model, ids = _model(variant), _ids()
    with torch.no_grad():
        full = model(ids).logits
        cache = TitansCache(model.config)
        pieces = [model(ids[:, :3], cache=cache).logits, model(ids[:, 3:prefill], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(prefill, ids.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]


@needs_triton
def test_triton_memory_matches_torch_end_to_end():
    """MAC on the Triton memory kernel (interpreter here, CUDA when compiled) equals the torch path: logits and every
    gradient of a training step, and chunked prefill + decode."""
    ref = _model("mac", memory_backend="torch").to(DEVICE).train()
    tri = _model("mac", memory_backend="triton").to(DEVICE).train()
    ids = _ids(length=19).to(DEVICE)
    reference_logits = assert_same_training_step(ref, tri, ids, atol=2e-5, rtol=1e-4)
    tri.eval()
    with torch.no_grad():
        cache = TitansCache(tri.config)
        pieces = [tri(ids[:, :9], cache=cache).logits] + [
            tri(ids[:, t : t + 1], cache=cache).logits for t in range(9, 19)
        ]
    torch.testing.assert_close(torch.cat(pieces, 1), reference_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_equals_unpadded(variant):
    model, ids = _model(variant), _ids(length=19)
    short = ids[1, 5:]
    padded = torch.stack((ids[0], torch.cat((torch.zeros(5, dtype=torch.long), short))))
    mask = torch.ones_like(padded)
    mask[1, :5] = 0
    with torch.no_grad():
        both = model(padded, attention_mask=mask).logits
        alone = model(short[None]).logits
        first = model(ids[:1]).logits
        # and decoding on after a padded prefill
        cache = TitansCache(model.config)
        model(padded[:, :12], attention_mask=mask[:, :12], cache=cache)
        steps = [
            model(padded[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits for t in range(12, 19)
        ]
    torch.testing.assert_close(both[1, 5:], alone[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(both[0], first[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), both[:, 12:], atol=2e-5, rtol=1e-4)


def test_generate_builds_its_cache_and_honours_a_given_one():
    model, ids = _model("mag"), _ids(batch=1, length=10)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    greedy = ids
    with torch.no_grad():
        for _ in range(6):
            greedy = torch.cat((greedy, model(greedy).logits[:, -1:].argmax(-1)), 1)
    assert torch.equal(out, greedy)
    cache = TitansCache(model.config)
    out2 = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache=cache)
    assert torch.equal(out2, greedy) and cache.get_seq_length() == 15 and cache.memory_bytes() > 0


def test_decode_state_does_not_grow():
    model = _model("mag")
    cache = TitansCache(model.config)
    with torch.no_grad():
        model(_ids(length=20), cache=cache)
        size = cache.memory_bytes()
        for t in range(10):
            model(_ids(length=1, seed=t), cache=cache)
    assert cache.memory_bytes() == size


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_reaches_every_parameter(variant):
    model = _model(variant).train()
    ids = _ids(length=17)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert out.cache is None and not missing, missing


def test_auto_classes():
    """(The fresh-process round trip is the conformance suite's ``test_fresh_process_trust_remote_code``.)"""
    config = AutoConfig.for_model(
        "titans",
        vocab_size=40,
        hidden_size=32,
        num_attention_heads=2,
        variant="mac",
        segment_size=8,
        memory_chunk_size=4,
        num_hidden_layers=1,
        memory_layers=[0],
    )
    assert isinstance(config, TitansConfig)
    assert type(AutoModelForCausalLM.from_config(config)) is TitansForCausalLM


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="variant"):
        TitansConfig(variant="mem")
    with pytest.raises(ValueError, match="segment_size"):
        TitansConfig(variant="mac", segment_size=10, memory_chunk_size=4)
    with pytest.raises(ValueError, match="memory_depth"):
        TitansConfig(memory_depth=3)
    with pytest.raises(ValueError, match="memory_layers"):
        TitansConfig(num_hidden_layers=2, memory_layers=[2])
    model = _model("mal")
    with pytest.raises(ValueError, match="cache"):
        model(_ids(), cache=object())
    with pytest.raises(ValueError, match="attention_mask"):
        model(_ids(), attention_mask=torch.ones(2, 3))


# ---- transformers conformance (tests/modeling/conformance.py) ---------------------------------------------------------


class TitansTester(ModelTester):
    """One MAC block (the variant with per-segment attention over memory read-outs) with a neural memory; 11 tokens
    cross a segment (8) and memory chunks (4). One block keeps the suite fast: the parity tests above run 2 and 3."""

    model_class = TitansForCausalLM
    base_model_class = TitansModel
    num_hidden_states = 2
    doc = "docs/titans.md"

    def get_config(self, **overrides):
        fields = dict(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            memory_layers=[0],
            num_attention_heads=2,
            variant="mac",
            sliding_window=6,
            segment_size=8,
            memory_chunk_size=4,
            memory_heads=2,
            num_persistent_tokens=2,
            memory_max_lr=0.5,
            memory_backend="torch",
            pad_token_id=0,
        )
        fields.update(overrides)
        return TitansConfig(**fields)

    def prepare_model(self, model):
        with torch.no_grad():  # livelier gates than the initialisation, so that the memory matters
            for layer in model.model.layers:
                if layer.has_memory:
                    layer.memory.gates.bias.normal_(0, 1.0)
                    layer.memory.conv.weight.normal_(0, 0.5)
        return model


class TestTitansConformance(ConformanceSuite):
    tester = TitansTester()
