"""LongMem (modeling/longmem): equivalences, generate with its memory cache, memorize, round trip, bad inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hf_longmem.modeling.longmem as longmem_pkg
from hf_longmem.memory.memory_bank import ChunkMemoryBank
from hf_longmem.modeling.longmem import LongMemBankCache, LongMemConfig, LongMemForCausalLM, LongMemModel
from hf_longmem.modeling.longmem.sidenet import joint_memory_attention
from tests.helpers.tiny_models import random_ids, tiny_model
from tests.modeling.conformance import ConformanceSuite, ModelTester, randomize_, tiny_backbone_config

SMALL = dict(
    segment_length=16, chunk_size=4, memory_size=64, topk_chunks=3, layer_reduction_factor=1, memory_layer_index=1
)


def _longmem(shape="llama_gqa", init="copy", seed=0, **overrides):
    backbone = tiny_model(shape, seed=seed, num_hidden_layers=3)
    model = LongMemForCausalLM.from_backbone(backbone, **{**SMALL, "sidenet_init": init, **overrides}).eval()
    if init == "copy":  # a non-trivial gate, so both branches matter
        with torch.no_grad():
            model.model.layers[1].self_attn.memory_gate.copy_(torch.linspace(-1.0, 1.0, 4))
    return backbone, model


@pytest.mark.parametrize("shape", ["llama_gqa", "llama_mha", "mistral", "qwen2"])
def test_untrained_wrapper_equals_backbone(shape):
    """sidenet_init="zero_output": every SideNet update is 0, so logits are the backbone's on each segment."""
    backbone, model = _longmem(shape, init="zero_output")
    ids = random_ids(2, 40)
    with torch.no_grad():
        out = model(ids)
        expected = torch.cat([backbone(ids[:, s : s + 16]).logits for s in range(0, 40, 16)], dim=1)
    torch.testing.assert_close(out.logits, expected, atol=2e-5, rtol=1e-4)
    assert not out.cache.bank.is_empty()  # the memory was read, and it still equals the backbone
    assert type(AutoModelForCausalLM.from_config(model.config)) is LongMemForCausalLM
    config = AutoConfig.for_model("longmem", backbone_config=backbone.config.to_dict(), layer_reduction_factor=3)
    assert isinstance(config, LongMemConfig) and config.num_sidenet_layers == 1


def test_first_segment_of_copy_init_is_the_sidenet_without_memory():
    """Empty memory: the memory layer is plain local attention (no gate), as in the official code."""
    _, model = _longmem()
    ids = random_ids(1, 16)
    with torch.no_grad():
        with_gate = model(ids).logits
        model.model.layers[1].self_attn.memory_gate.fill_(30.0)  # would silence local attention if memory existed
        torch.testing.assert_close(model(ids).logits, with_gate)
        longer = model(random_ids(1, 32)).logits[:, 16:]
        model.model.layers[1].self_attn.memory_gate.fill_(-30.0)
        assert (model(random_ids(1, 32)).logits[:, 16:] - longer).abs().max() > 1e-3  # memory matters later


def test_joint_attention_blend():
    g = torch.Generator().manual_seed(0)
    q, local = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 3, 4, generator=g)
    mk, mv = torch.randn(1, 2, 3, 5, 4, generator=g), torch.randn(1, 2, 3, 5, 4, generator=g)
    mask = torch.ones(1, 2, 3, 5, dtype=torch.bool)
    mask[0, 0, 1] = False  # this query retrieved nothing: local only
    mask[0, 1, 2, 3:] = False
    out = joint_memory_attention(q, local, mk, mv, mask, torch.tensor([0.0, 2.0]), 0.5)
    torch.testing.assert_close(out[0, 0, 1], local[0, 0, 1])
    probs = torch.softmax(torch.einsum("d,md->m", q[0, 1, 2], mk[0, 1, 2, :3]) * 0.5, dim=0)
    gate = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(out[0, 1, 2], gate * probs @ mv[0, 1, 2, :3] + (1 - gate) * local[0, 1, 2])


def test_segment_by_segment_and_decode_equal_one_call():
    _, model = _longmem()
    ids = random_ids(2, 53, seed=3)
    with torch.no_grad():
        full = model(ids)
        assert full.cache.bank.num_chunks().tolist() == [12, 12]  # 3 finished segments of 16 tokens, chunks of 4
        cache, pieces = model.make_cache(), []
        for start, stop in ((0, 5), (5, 16), (16, 40), (40, 41)):
            pieces.append(model(ids[:, start:stop], cache=cache).logits)
        for position in range(41, 53):  # token by token, across the memory write at 48
            pieces.append(model(ids[:, position : position + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cache.bank.keys, full.cache.bank.keys)
    assert cache.get_seq_length() == 53 and cache.segment_fill == 5


def test_generate_uses_its_memory_cache_by_default_and_matches_greedy():
    _, model = _longmem()
    ids = random_ids(1, 30, seed=4)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache, step, tokens = model.make_cache(), ids, []
    with torch.no_grad():
        for _ in range(6):
            step = model(step, cache=cache).logits[:, -1:].argmax(-1)
            tokens.append(step)
    assert torch.equal(out[:, 30:], torch.cat(tokens, dim=1))
    user_cache = model.make_cache()
    again = model.generate(ids, max_new_tokens=6, do_sample=False, cache=user_cache, pad_token_id=0)
    assert torch.equal(again, out) and user_cache.get_seq_length() == 35
    beams = model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (1, 33)


def test_left_padded_rows_equal_rows_alone_with_memory_beams_and_a_memorized_bank():
    """Padding longer than a segment, three segments, beam search (row groups reordered and repeated) and a bank
    filled by ``memorize``: every row of the padded batch generates what it generates alone, and padding never enters
    the bank (each group's bank holds exactly the row's own tokens)."""
    _, model = _longmem()
    ids = random_ids(3, 40, seed=5)
    pads = [0, 18, 5]
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    padded = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        out = model(padded, attention_mask=mask)
        for row, pad in enumerate(pads):
            alone = model(ids[row : row + 1, pad:])
            torch.testing.assert_close(out.logits[row : row + 1, pad:], alone.logits, rtol=0, atol=0)
            (group,) = [cache for rows, _, cache in out.cache.row_groups if row in rows.tolist()]
            assert group.bank.num_tokens().tolist() == alone.cache.bank.num_tokens().tolist()
    options = dict(
        max_new_tokens=4,
        min_new_tokens=4,
        num_beams=2,
        num_return_sequences=2,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    document = random_ids(1, 20, seed=8)[0]
    with torch.no_grad():
        # a user cache has the rows generate runs: batch x beams
        together = model.generate(
            padded, attention_mask=mask, cache=model.memorize([document], batch_size=6), **options
        )
        for row, pad in enumerate(pads):
            alone = model.generate(ids[row : row + 1, pad:], cache=model.memorize([document], batch_size=2), **options)
            torch.testing.assert_close(together[2 * row : 2 * row + 2, pad:], alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="padding inside a row"):
        model(ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([20]), 0))
    right = torch.ones_like(ids)  # right padding (training batches): real tokens give what they give alone
    right[1, 25:] = 0
    with torch.no_grad():
        logits = model(ids.masked_fill(right == 0, 0), attention_mask=right).logits
        # other shapes (2 x 40 vs 1 x 25 tokens) block the float32 sums differently: float32 tolerance, not exact
        torch.testing.assert_close(logits[1, :25], model(ids[1:, :25]).logits[0], atol=2e-5, rtol=1e-4)


def test_memorize_fills_the_bank_like_a_forward_and_feeds_generate():
    _, model = _longmem()
    doc = random_ids(1, 32, seed=6)
    cache = model.memorize([doc[0], doc[0, :10].tolist()], batch_size=2)
    bank = cache.bank
    assert bank.batch_size == 2 and bank.num_tokens().tolist() == [42, 42]  # 32 + 10 tokens, last chunk partial
    with torch.no_grad():
        reference = model(doc).cache.bank  # the same document through forward writes the same chunks
    torch.testing.assert_close(bank.keys[:1, :, :8], reference.keys[:, :, :8])
    prompt = random_ids(2, 8, seed=7)
    with torch.no_grad():
        remembered = model(prompt, cache=cache).logits
        plain = model(prompt).logits
    assert (remembered - plain).abs().max() > 1e-3
    assert model.generate(prompt, max_new_tokens=2, cache=model.memorize([doc[0]], batch_size=2)).shape == (2, 10)


def test_only_the_sidenet_trains():
    backbone, model = _longmem(init="zero_output")
    model.train()
    loss = model(random_ids(2, 40), labels=random_ids(2, 40, seed=1)).loss
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained and all(name.startswith(("model.layers.", "model.norm.")) for name in trained)
    assert model.trainable_parameter_count() == sum(p.numel() for p in model.model.layers.parameters()) + 64


def test_bad_inputs():
    backbone, model = _longmem()
    with pytest.raises(ValueError, match="empty document"):
        model.memorize([[]])
    with pytest.raises(ValueError, match="texts"):
        model.memorize([])
    with pytest.raises(ValueError, match="tokenizer"):
        model.memorize(["a document"])
    with pytest.raises(ValueError, match="layer_reduction_factor"):
        LongMemConfig(backbone_config=backbone.config.to_dict(), layer_reduction_factor=2)  # 3 layers
    with pytest.raises(ValueError, match="memory_size"):
        LongMemConfig(backbone_config=backbone.config.to_dict(), memory_size=10, chunk_size=4)
    with pytest.raises(ValueError, match="memory_layer_index"):
        LongMemConfig(backbone_config=backbone.config.to_dict(), layer_reduction_factor=1, memory_layer_index=3)
    with pytest.raises(ValueError, match="sidenet_init"):
        LongMemConfig(backbone_config=backbone.config.to_dict(), sidenet_init="random")
    with pytest.raises(ValueError, match="bank"):  # a bank from a model of another shape
        LongMemBankCache(model.config, bank=ChunkMemoryBank(num_heads=3, head_dim=16, chunk_size=4, max_tokens=64))
    with pytest.raises(ValueError, match="Llama-family"):
        LongMemForCausalLM.from_backbone(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)))
    with pytest.raises(ValueError, match="cache"):
        model(random_ids(1, 4), cache=model.make_cache().backbone_cache)
    cache = model.make_cache()
    model(random_ids(2, 4), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(random_ids(1, 4), cache=cache)
    with pytest.raises(ValueError, match="middle of a sequence"):
        model.memorize([[5, 6, 7]], cache=cache)
    assert longmem_pkg.__all__


# ---- transformers conformance (tests/modeling/conformance.py) ---------------------------------------------------------


class LongMemTester(ModelTester):
    """A 2-layer Llama backbone, a 2-layer SideNet (memory in layer 1); 11 tokens fill one segment (8) and start the
    next, so the second segment reads the bank."""

    model_class = LongMemForCausalLM
    base_model_class = LongMemModel
    num_hidden_states = 3
    doc = "docs/longmem.md"

    def get_config(self, **overrides):
        backbone = tiny_backbone_config(tie_word_embeddings=overrides.pop("tie_word_embeddings", False))
        fields = dict(
            segment_length=8,
            chunk_size=2,
            memory_size=16,
            topk_chunks=2,
            layer_reduction_factor=1,
            memory_layer_index=1,
            sidenet_init="copy",
        )
        fields.update(overrides)
        return LongMemConfig(backbone_config=backbone, **fields)

    def prepare_model(self, model):
        randomize_(model.backbone)
        model.model.init_sidenet_from_backbone()
        with torch.no_grad():  # a non-trivial gate, so both branches matter
            model.model.layers[1].self_attn.memory_gate.copy_(torch.linspace(-1.0, 1.0, 4))
        return model


class TestLongMemConformance(ConformanceSuite):
    tester = LongMemTester()
