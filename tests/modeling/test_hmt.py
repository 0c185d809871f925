"""HMT (modeling/hmt): the recurrence against a plain re-implementation of the paper/official code, piecewise ==
one call, generate with the default HMTCache, bank bounds and eviction, LoRA, bad inputs, fresh-process round trip."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, LlamaForCausalLM

from hf_longmem.modeling.hmt import HMTCache, HMTConfig, HMTForCausalLM, HMTModel, append_to_bank, recall
from tests.helpers.remote_roundtrip import assert_fresh_process_roundtrip
from tests.helpers.tiny_models import random_ids, tiny_model
from tests.modeling.conformance import ConformanceSuite, ModelTester, randomize_, tiny_backbone_config

ATOL = 1e-4


def _hmt(shape="llama_gqa", seed=0, **kwargs):
    options = dict(segment_length=8, sensory_length=2, num_memories=3)
    options.update(kwargs)
    torch.manual_seed(seed)
    return HMTForCausalLM.from_backbone(tiny_model(shape, seed=seed), **options).eval()


def reference_logits(model: HMTForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """HMT written out segment by segment as in the paper / official RecurrentWrapper (no caches, no pieces)."""
    config = model.config
    L, j, k, N = config.segment_length, config.summary_length, config.sensory_length, config.num_memories
    T = config.num_memory_tokens
    embed = model.backbone.get_input_embeddings()
    head = model.backbone.get_output_embeddings()

    def run(embeds):  # positions 0..S-1, as the official code (inputs_embeds without position ids)
        return model.backbone.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state

    batch, bank, previous, logits = ids.shape[0], [], None, []
    init = model.memory.memory_init.expand(batch, -1, -1)
    for n, start in enumerate(range(0, ids.shape[1], L)):
        segment = ids[:, start : start + L]
        if n == 0:
            memory = init
        elif not config.use_recall:
            memory = bank[-1] * config.memory_scale
        else:
            token = model.memory.summary_embedding.expand(batch, 1, -1)
            summary = run(torch.cat([token, embed(segment[:, :j]), token], 1))[:, -1:]
            recent = bank[-N:]  # each [B, T, d]
            keys = torch.stack([model.memory.recall_key(m.mean(1)) for m in recent], 1)  # [B, n, h]
            q = model.memory.recall_query(summary)  # [B, 1, h]
            weights = torch.softmax(q @ keys.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)  # [B, 1, n]
            memory = sum(weights[:, :, i : i + 1] * m for i, m in enumerate(recent)) * config.memory_scale
        parts = [memory] + ([embed(previous[:, -k:])] if n > 0 and k > 0 else []) + [embed(segment), memory]
        hidden = run(torch.cat(parts, 1))
        offset = T + (k if n > 0 and k > 0 else 0)
        logits.append(head(hidden[:, offset : offset + segment.shape[1]]))
        bank.append(hidden[:, -T:])
        previous = segment
    return torch.cat(logits, 1)


# ---- config, registration, construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(segment_length=0), "segment_length"),
        (dict(summary_fraction=0.0), "summary_fraction"),
        (dict(summary_fraction=1.5), "summary_fraction"),
        (dict(sensory_length=9, segment_length=8), "sensory_length"),
        (dict(num_memories=0), "num_memories"),
        (dict(lora_rank=-1), "lora_rank"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_target_modules=[]), "lora_target_modules"),
        (dict(recall_hidden_size=0), "recall_hidden_size"),
        (dict(memory_scale=0.0), "memory_scale"),
        (dict(num_memory_tokens=0), "num_memory_tokens"),
    ],
)
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HMTConfig(**kwargs)


def test_registered_with_auto_classes_and_summary_length():
    config = HMTConfig(backbone_config=tiny_model().config.to_dict(), segment_length=10, summary_fraction=0.5)
    assert config.summary_length == 5
    assert type(AutoModelForCausalLM.from_config(config)) is HMTForCausalLM
    assert type(AutoModel.from_config(config)) is HMTModel
    with pytest.raises(ValueError, match="backbone_config"):
        HMTForCausalLM(HMTConfig())


def test_from_backbone_copies_weights_and_trains_only_memory():
    backbone = tiny_model()
    model = HMTForCausalLM.from_backbone(backbone, segment_length=8)
    for (name, a), (_, b) in zip(model.backbone.state_dict().items(), backbone.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "memory.memory_init",
        "memory.summary_embedding",
        "memory.recall_query.weight",
        "memory.recall_key.weight",
    }
    # official init: memory embeddings ~ N(0, std(input embeddings)^2)
    assert model.memory.memory_init.abs().max() > 0
    unfrozen = HMTForCausalLM.from_backbone(backbone, segment_length=8, freeze_backbone=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_lora_adapters_start_as_identity_and_train():
    plain = _hmt(seed=3)
    lora = _hmt(seed=3, lora_rank=4)
    lora.memory.load_state_dict(plain.memory.state_dict())  # LoRA's own init draws from the RNG first
    names = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert not any("base_layer" in n for n in names)
    ids = random_ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, plain(ids).logits, atol=ATOL, rtol=1e-4)
    with pytest.raises(ValueError, match="lora_target_modules"):
        _hmt(lora_rank=2, lora_target_modules=["no_such_module"])


# ---- the recurrence --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["llama_mha", "llama_gqa", "mistral", "qwen2"])
def test_forward_equals_reference_recurrence(shape):
    model = _hmt(
        shape, memory_scale=0.25 if shape == "qwen2" else 1.0, num_memory_tokens=3 if shape == "mistral" else 1
    )
    ids = random_ids(2, 37)  # 4 full segments + 5 tokens: bank of 3 evicts the oldest, sensory memory used
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits(model, ids), atol=ATOL, rtol=1e-4)


def test_stage_one_recurrence_without_recall():
    model = _hmt(use_recall=False, memory_scale=0.5, num_memory_tokens=2)
    assert not hasattr(model.memory, "recall_query")
    ids = random_ids(1, 29)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits(model, ids), atol=ATOL, rtol=1e-4)


def test_first_segment_is_the_backbone_with_the_memory_embedding_prefixed():
    """With an empty memory HMT is the backbone reading [P_0 ‖ tokens]: it has no gate that would make it equal to
    the plain backbone, so this (not plain equality) is what its initialisation defines."""
    model = _hmt()
    ids = random_ids(2, 8)
    with torch.no_grad():
        embeds = torch.cat([model.memory.memory_init.expand(2, -1, -1), model.backbone.get_input_embeddings()(ids)], 1)
        expected = model.backbone(inputs_embeds=embeds).logits[:, 1:]
        torch.testing.assert_close(model(ids).logits, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("use_recall", [True, False])
def test_segment_by_segment_equals_one_call(use_recall):
    model = _hmt(use_recall=use_recall)
    ids = random_ids(2, 40)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache()
        pieces = [model(ids[:, s : s + 8], cache=cache).logits for s in range(0, 40, 8)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=1e-4)
        assert cache.num_segments == 5 and cache.segment_position == 0 and cache.get_seq_length() == 40
        # Arbitrary pieces (crossing boundaries, inside the summary prefix): the last logits of each piece are those
        # of one call over the prefix, and the state ends the same.
        one_call = model.make_cache()
        model(ids, cache=one_call)
        cache = model.make_cache()
        start = 0
        for size in (3, 7, 1, 12, 2, 9, 6):
            last = model(ids[:, start : start + size], cache=cache).logits[:, -1]
            start += size
            torch.testing.assert_close(last, model(ids[:, :start]).logits[:, -1], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(cache.bank, one_call.bank, atol=ATOL, rtol=1e-4)


def test_token_by_token_decode_equals_prefix_forward():
    model = _hmt(num_memory_tokens=2)
    ids = random_ids(1, 26)
    cache = model.make_cache()
    with torch.no_grad():
        model(ids[:, :9], cache=cache)  # crosses the first boundary; one token into segment 1's summary prefix
        for t in range(9, 26):
            step = model(ids[:, t : t + 1], cache=cache).logits[:, -1]
            torch.testing.assert_close(step, model(ids[:, : t + 1]).logits[:, -1], atol=ATOL, rtol=1e-4)


def test_generate_uses_hmt_cache_and_matches_greedy_forward():
    model = _hmt()
    model.generation_config.eos_token_id = None
    ids = random_ids(2, 13)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        sequence = ids
        for _ in range(12):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, sequence)
        # a user cache is honoured (continuation: the same cache carries the memory into a second generate)
        cache = model.make_cache()
        first = model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
        assert cache.get_seq_length() == first.shape[1] - 1
        second = model.generate(first, max_new_tokens=8, do_sample=False, cache=cache)
        assert torch.equal(second, out[:, : second.shape[1]])
        with pytest.raises(ValueError, match="HMTCache"):
            model.generate(ids, max_new_tokens=2, cache=DynamicCache())


# ---- memory bank ------------------------------------------------------------------------------------------------------


def test_bank_is_bounded_and_evicts_the_oldest():
    model = _hmt(num_memories=3)
    ids = random_ids(1, 6 * 8)
    with torch.no_grad():
        small, large = model.make_cache(), model.make_cache(num_memories=100)
        model(ids, cache=small)
        model(ids, cache=large)
    assert small.num_memories == 3 and large.num_memories == 6 and small.num_segments == 6
    # the large bank holds every m_n; m_n does not depend on the capacity for the first 4 segments (bank <= 3)
    torch.testing.assert_close(small.bank[:, :1], large.bank[:, 3:4], atol=ATOL, rtol=1e-4)
    assert small.memory_bytes() > 0 and "memories=3/3" in repr(small)
    bank = torch.randn(2, 3, 1, 4)
    grown = append_to_bank(bank, torch.ones(2, 1, 4), capacity=3)
    assert (
        grown.shape == (2, 3, 1, 4)
        and torch.equal(grown[:, :2], bank[:, 1:])
        and torch.equal(grown[:, 2], torch.ones(2, 1, 4))
    )
    with pytest.raises(ValueError, match="capacity"):
        append_to_bank(bank, torch.ones(2, 1, 4), capacity=0)
    with pytest.raises(ValueError, match="num_memories"):
        model.make_cache(num_memories=0)
    with pytest.raises(ValueError, match="bank"):
        recall(torch.ones(1, 1, 4), torch.ones(1, 0, 1, 4), torch.ones(2, 4), torch.ones(2, 4))


def test_recall_is_a_convex_combination_of_the_bank():
    bank = torch.randn(2, 5, 2, 6)
    out = recall(torch.randn(2, 1, 6), bank, torch.randn(3, 6), torch.randn(3, 6))
    assert out.shape == (2, 2, 6)
    # identical memories -> the recall returns that memory whatever the weights
    same = torch.randn(1, 1, 2, 6).expand(2, 5, 2, 6)
    torch.testing.assert_close(recall(torch.randn(2, 1, 6), same, torch.randn(3, 6), torch.randn(3, 6)), same[:, 0])
    # one memory token per segment: HMT's P = softmax((S W_q)(M W_k)^T / sqrt(h)) M
    flat, query, w_q, w_k = torch.randn(2, 5, 6), torch.randn(2, 1, 6), torch.randn(3, 6), torch.randn(3, 6)
    expected = torch.softmax((query @ w_q.T) @ (flat @ w_k.T).transpose(1, 2) / math.sqrt(3), -1) @ flat
    torch.testing.assert_close(recall(query, flat.unsqueeze(2), w_q, w_k), expected)


def test_beam_search_reorders_the_state():
    model = _hmt()
    model.generation_config.eos_token_id = None
    ids = random_ids(1, 10)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=9, num_beams=2, do_sample=False)
    assert out.shape == (1, 19)


# ---- bad inputs -------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = _hmt()
    ids = random_ids(2, 10)
    with pytest.raises(ValueError, match="at least one token"):
        model(ids[:, :0])
    with pytest.raises(ValueError, match="padding inside a row"):
        model(ids, attention_mask=torch.tensor([[1] * 4 + [0] + [1] * 5, [1] * 10]))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=torch.zeros(2, 10, 64))
    with pytest.raises(ValueError, match="HMTCache"):
        model(ids, cache=DynamicCache())
    cache = model.make_cache()
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        model(ids[:1], cache=cache)
    other = _hmt(segment_length=6)
    with pytest.raises(ValueError, match="different HMT config"):
        other(ids, cache=model.make_cache())
    with pytest.raises(ValueError, match="HMTConfig"):
        HMTCache(tiny_model().config)
    # mismatched backbone config: a backbone whose shape differs from the wrapper's backbone_config
    from hf_longmem.modeling.backbone import check_backbone_matches

    with pytest.raises(ValueError, match="hidden_size"):
        check_backbone_matches(model.config.backbone_config, tiny_model(hidden_size=32))
    with pytest.raises(ValueError, match="backbone must be"):
        HMTForCausalLM.from_backbone(object())
    with pytest.raises(NotImplementedError):
        cache.crop(3)


# ---- training and round trip ------------------------------------------------------------------------------------------


def test_gradients_reach_memory_and_lora_only():
    model = _hmt(lora_rank=2).train()
    ids = random_ids(2, 30)
    model(ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:  # lora_A gets zero gradient at init (lora_B = 0), but it is in the graph
            assert parameter.grad is not None and ("lora_A" in name or parameter.grad.abs().sum() > 0), name
        else:
            assert parameter.grad is None, name
    # the recall is trained through later segments: W_k and the stored memories receive gradient
    assert model.memory.recall_key.weight.grad.abs().sum() > 0


def test_fresh_process_roundtrip_with_lora(tmp_path):
    model = _hmt(lora_rank=2)
    with torch.no_grad():  # make the adapters non-trivial so that loading them is checked
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    # 21 tokens are 3 segments of 8, each one chain through the backbone (and the memory recall between them)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    modules = assert_fresh_process_roundtrip(model, tmp_path, random_ids(1, 21), sequential_ops=3 * 2 * linears)
    assert modules["model_module"] == "hf_longmem.modeling.hmt.modeling_hmt"
    assert modules["config_module"] == "hf_longmem.modeling.hmt.configuration_hmt"
    loaded = HMTForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.lora_rank == 2 and loaded.trainable_parameter_count() == model.trainable_parameter_count()


# ---- transformers conformance (tests/modeling/conformance.py) ---------------------------------------------------------


class HMTTester(ModelTester):
    """A 2-layer Llama backbone; 11 tokens finish one segment (8), so the second recalls from the bank."""

    model_class = HMTForCausalLM
    base_model_class = LlamaForCausalLM
    num_hidden_states = 3
    doc = "docs/hmt.md"

    def get_config(self, **overrides):
        backbone = tiny_backbone_config(tie_word_embeddings=overrides.pop("tie_word_embeddings", False))
        fields = dict(segment_length=8, sensory_length=2, num_memories=3)
        fields.update(overrides)
        return HMTConfig(backbone_config=backbone, **fields)

    def prepare_model(self, model):
        randomize_(model.backbone)
        model.memory.reset_parameters(0.2)
        return model


class TestHMTConformance(ConformanceSuite):
    tester = HMTTester()


def test_left_padded_beam_search_equals_rows_alone():
    """Padding longer than a segment (10 > 8) and beam search (the cache's row groups are reordered and repeated):
    every row of the padded batch generates what it generates alone."""
    model = HMTTester().create_model()
    ids = HMTTester().input_ids(batch=3, length=19, seed=4)
    pads = [0, 10, 3]
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    options = dict(
        max_new_tokens=5,
        min_new_tokens=5,
        num_beams=2,
        num_return_sequences=2,
        pad_token_id=0,
        eos_token_id=None,
        do_sample=False,
    )
    with torch.no_grad():
        together = model.generate(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, **options)
        for row, pad in enumerate(pads):
            alone = model.generate(input_ids=ids[row : row + 1, pad:], **options)
            torch.testing.assert_close(together[2 * row : 2 * row + 2, pad:], alone, rtol=0, atol=0)
