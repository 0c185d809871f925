"""CMT around a frozen LM (modeling/cmt): parity with the backbone, cache/segment equivalences, bank bounds, I/O."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import hf_longmem.modeling  # noqa: F401  (registers the architectures)
from hf_longmem.evals.vocab import build_tokenizer
from hf_longmem.modeling.cmt import BankSignature, CMTCache, CMTConfig, CMTForCausalLM, DocumentMemoryBank
from hf_longmem.modeling.cmt.document_bank import BANK_FILE
from hf_longmem.modeling.cmt.documents import as_token_pieces, split_text
from tests.helpers.remote_roundtrip import assert_fresh_process_roundtrip
from tests.modeling.conformance import ConformanceSuite, ModelTester, randomize_, tiny_backbone_config

VOCAB = 64
SHAPES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
}


def _backbone(kind: str = "llama", seed: int = 0):
    config_cls, model_cls, extra = SHAPES[kind]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _cmt(kind: str = "llama", randomize: bool = True, **kwargs):
    """A CMT model whose compressor is randomised (LoRA B non-zero) so that memories depend on it."""
    backbone = _backbone(kind)
    kwargs = {"num_memory_tokens": 3, "memory_top_k": 2, "max_memories": 16, "max_document_tokens": 12, **kwargs}
    model = CMTForCausalLM.from_backbone(backbone, **kwargs).eval()
    if randomize:
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in model.compressor.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model, backbone


def _docs(seed: int = 2, count: int = 5):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (count,), generator=generator).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


# ----------------------------------------------------------------------------------------------------------------------
# Config and registration
# ----------------------------------------------------------------------------------------------------------------------


def test_registered_and_config_validation():
    config = AutoConfig.for_model("cmt", backbone_config=_backbone().config.to_dict())
    assert isinstance(config, CMTConfig) and config.retrieval_dim == 32
    assert type(AutoModelForCausalLM.from_config(config)) is CMTForCausalLM
    for bad in (
        {"num_memory_tokens": 0},
        {"memory_top_k": -1},
        {"retrieval_temperature": 0.0},
        {"max_memories": 0},
        {"freeze_backbone": False},
        {"lora_target_modules": []},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CMTConfig(backbone_config=_backbone().config, **bad)
    with pytest.raises(ValueError, match="lora_target_modules"):
        CMTForCausalLM(CMTConfig(backbone_config=_backbone().config, lora_target_modules=["nope"]))


def test_only_memory_parts_train_and_backbone_state_dict_is_untouched():
    model, backbone = _cmt()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model.trainable_parameter_count() == sum(p.numel() for p in model.compressor.parameters())
    assert set(model.backbone.state_dict()) == set(backbone.state_dict())


# ----------------------------------------------------------------------------------------------------------------------
# Parity: empty memory == backbone; segments == one call; generate == greedy loop; padded == unpadded
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SHAPES))
def test_empty_memory_equals_backbone(kind):
    model, backbone = _cmt(kind)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, backbone(ids).logits, atol=0, rtol=0)
        expected = backbone.generate(ids, max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(model.generate(ids, max_new_tokens=5, do_sample=False), expected)
        # memory_top_k=0 reads nothing even from a full bank
        model.memorize(_docs())
        model.config.memory_top_k = 0
        torch.testing.assert_close(model(ids).logits, backbone(ids).logits, atol=0, rtol=0)
        model.config.memory_top_k = 2
        assert (model(ids).logits - backbone(ids).logits).abs().max() > 1e-3  # memory is read again


def test_segment_by_segment_equals_one_call():
    model, _ = _cmt()
    model.memorize(_docs())
    ids = torch.randint(3, VOCAB, (2, 11))
    question = ids[:, :5]
    with torch.no_grad():
        full_cache = model.prime_cache(CMTCache(config=model.config.backbone_config), question)
        full = model(ids, cache=full_cache).logits
        cache = model.prime_cache(CMTCache(config=model.config.backbone_config), question)
        assert cache.prefix_length == 2 * 3 and cache.get_seq_length() == 6
        pieces = [model(ids[:, :4], cache=cache).logits, model(ids[:, 4:8], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(8, 11)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 6 + 11


def test_generate_uses_its_default_cache_and_equals_a_greedy_loop():
    model, _ = _cmt()
    model.memorize(_docs())
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        assert isinstance(out.cache, CMTCache) and out.cache.prefix_length == 6
        assert out.cache.retrieved_doc_ids[0][0] in model.memory_bank.doc_ids
        cache, tokens, step = CMTCache(config=model.config.backbone_config), ids, ids
        for _ in range(6):
            step = model(step, cache=cache).logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, step], dim=1)
        torch.testing.assert_close(out.sequences, tokens)
        # a user-supplied CMTCache is honoured (here: read no memory -> the backbone's tokens)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, cache=CMTCache(model.config.backbone_config, 0))
        torch.testing.assert_close(plain, model.backbone.generate(ids, max_new_tokens=6, do_sample=False))


def test_left_padded_batch_equals_rows_alone():
    model, _ = _cmt()
    model.memorize(_docs())
    rows = [torch.randint(3, VOCAB, (n,)) for n in (7, 4)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 7 - len(row) :], mask[r, 7 - len(row) :] = row, 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)[:, 7:]
        for r, row in enumerate(rows):
            alone = model.generate(row[None], max_new_tokens=4, do_sample=False)[:, len(row) :]
            torch.testing.assert_close(batched[r : r + 1], alone)


# ----------------------------------------------------------------------------------------------------------------------
# memorize(): chunks, padding and splitting
# ----------------------------------------------------------------------------------------------------------------------


def test_memorize_in_pieces_equals_memorize_at_once_and_padding_is_invisible():
    docs = _docs(count=6)
    once, _ = _cmt()
    once.memorize(docs, batch_size=16)
    pieces, _ = _cmt()
    pieces.memorize(docs[:2], batch_size=1)
    pieces.memorize(docs[2:], batch_size=3)
    torch.testing.assert_close(pieces.memory_bank.memories, once.memory_bank.memories, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pieces.memory_bank.keys, once.memory_bank.keys, atol=2e-5, rtol=1e-4)
    assert pieces.memory_bank.doc_ids == once.memory_bank.doc_ids == [f"doc-{i}" for i in range(6)]


def test_long_documents_are_split_at_sentence_ends():
    tokenizer = build_tokenizer()
    text = (
        "The grass is green. " * 3 + "The pass key is 71432. Remember it. 71432 is the pass key. " + "Here we go. " * 4
    )
    pieces = split_text(text, tokenizer, max_tokens=20)
    assert all(len(p) <= 20 and p[0] == tokenizer.bos_token_id for p in pieces)
    assert sum((p[1:] for p in pieces), []) == tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = [tokenizer.decode(p[1:]) for p in pieces]
    assert all(d.rstrip().endswith(".") for d in decoded)
    assert any("The pass key is 71432." in d for d in decoded)
    backbone = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model = CMTForCausalLM.from_backbone(backbone, num_memory_tokens=2, max_document_tokens=20)
    names = model.memorize([text, "Short one."], tokenizer=tokenizer, doc_ids=["story", "short"])
    assert names[-1] == "short" and len(model.memory_bank) == len(names) == len(pieces) + 1
    assert all(n.startswith("story#") for n in names[:-1])


def test_memorize_bad_inputs():
    model, _ = _cmt()
    for documents, match in (
        ([], "non-empty"),
        ([[]], r"documents\[0\] is empty"),
        (["  "], "tokenizer"),
        ([[1, -2]], "non-negative"),
        (torch.zeros(2, 3), "integer ids"),
    ):
        with pytest.raises(ValueError, match=match):
            model.memorize(documents)
    with pytest.raises(ValueError, match=r"documents\[1\] is empty"):
        as_token_pieces(["a b.", " "], build_tokenizer(), 8)
    with pytest.raises(ValueError, match="batch_size"):
        model.memorize([[3, 4]], batch_size=0)
    with pytest.raises(ValueError, match="doc_ids"):
        model.memorize([[3, 4]], doc_ids=["a", "b"])


# ----------------------------------------------------------------------------------------------------------------------
# The bank: bounds, eviction, bad inputs, persistence
# ----------------------------------------------------------------------------------------------------------------------


def _signature(**kw):
    return BankSignature(
        **{"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "num_memory_tokens": 3, "retrieval_dim": 5, **kw}
    )


def test_bank_bounds_eviction_and_search():
    bank = DocumentMemoryBank(_signature(), capacity=4)
    memories = torch.arange(6).float().view(6, 1, 1, 1, 1, 1).expand(6, 2, 2, 2, 3, 4).contiguous()
    keys = torch.eye(6, 5)  # memory 5 has a zero key
    assert bank.add(memories[:3], keys[:3]) == ["doc-0", "doc-1", "doc-2"]
    bank.add(memories[3:], keys[3:], ["d", "e", "f"])
    assert len(bank) == 4 and bank.doc_ids == ["doc-2", "d", "e", "f"] and bank.num_evicted == 2
    assert bank.memories[:, 0, 0, 0, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    indices, scores = bank.search(torch.tensor([[0, 0, 0, 1.0, 0], [0, 0, 1.0, 0, 0]]), k=9)
    assert indices.shape == (2, 4) and indices[:, 0].tolist() == [1, 0] and scores[0, 0] == pytest.approx(1.0)
    assert bank.memory_bytes() == 4 * (2 * 2 * 2 * 3 * 4 + 5) * 4
    bank.add(memories, keys)  # one call larger than the capacity keeps its newest
    assert bank.doc_ids == ["doc-8", "doc-9", "doc-10", "doc-11"]


def test_bank_bad_inputs():
    with pytest.raises(ValueError, match="capacity"):
        DocumentMemoryBank(_signature(), capacity=0)
    bank = DocumentMemoryBank(_signature(), capacity=4)
    with pytest.raises(ValueError, match="empty"):
        bank.search(torch.randn(1, 5), k=1)
    with pytest.raises(ValueError, match="memories must have shape"):
        bank.add(torch.zeros(1, 2, 2, 2, 4, 4), torch.zeros(1, 5))  # oversized memory (4 slots, not 3)
    with pytest.raises(ValueError, match="keys must have shape"):
        bank.add(torch.zeros(1, 2, 2, 2, 3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="doc_ids"):
        bank.add(torch.zeros(1, 2, 2, 2, 3, 4), torch.zeros(1, 5), ["a", "b"])
    bank.add(torch.zeros(1, 2, 2, 2, 3, 4), torch.ones(1, 5))
    for k in (0, True):
        with pytest.raises(ValueError, match="k must"):
            bank.search(torch.randn(1, 5), k=k)
    with pytest.raises(ValueError, match="queries"):
        bank.search(torch.randn(1, 4), k=1)


def test_bank_save_load_atomic_and_signature_checked(tmp_path):
    bank = DocumentMemoryBank(_signature(), capacity=3)
    bank.add(torch.randn(3, 2, 2, 2, 3, 4), torch.randn(3, 5), ["a", "b", "c"])
    path = bank.save(tmp_path)
    assert path.name == BANK_FILE and [p.name for p in tmp_path.iterdir()] == [BANK_FILE]
    loaded = DocumentMemoryBank.load(tmp_path, _signature())
    torch.testing.assert_close(loaded.memories, bank.memories)
    torch.testing.assert_close(loaded.keys, bank.keys)
    assert loaded.doc_ids == ["a", "b", "c"] and loaded.capacity == 3
    assert DocumentMemoryBank.load(path, capacity=2).doc_ids == ["b", "c"]
    with pytest.raises(ValueError, match="num_kv_heads is 2, the model needs 4"):
        DocumentMemoryBank.load(path, _signature(num_kv_heads=4))
    with pytest.raises(FileNotFoundError):
        DocumentMemoryBank.load(tmp_path / "missing.safetensors")


def test_bank_of_another_backbone_is_refused(tmp_path):
    model, _ = _cmt()
    model.memorize(_docs(count=2))
    model.save_memory(tmp_path)
    other = CMTForCausalLM.from_backbone(_backbone(), num_memory_tokens=4)
    with pytest.raises(ValueError, match="num_memory_tokens is 3, the model needs 4"):
        other.load_memory(tmp_path)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="hidden_size"):
        from hf_longmem.modeling.backbone import check_backbone_matches

        check_backbone_matches(model.config.backbone_config, wider)


# ----------------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------------


def test_fresh_process_roundtrip_with_memory(tmp_path):
    model, backbone = _cmt()
    model.memorize(_docs())
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert (model(ids).logits - backbone(ids).logits).abs().max() > 1e-3
    modules = assert_fresh_process_roundtrip(model, tmp_path / "ckpt", ids)
    assert modules["model_module"] == "hf_longmem.modeling.cmt.modeling_cmt"
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["model_type"] == "cmt" and saved["backbone_config"]["model_type"] == "llama"
    # in process: the compressor weights come back, so fresh memories are the same
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    for name, tensor in model.compressor.state_dict().items():
        torch.testing.assert_close(loaded.compressor.state_dict()[name], tensor)
    assert loaded.memory_bank.doc_ids == model.memory_bank.doc_ids
    loaded.forget()
    loaded.memorize(_docs())
    torch.testing.assert_close(loaded.memory_bank.memories, model.memory_bank.memories, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Training objective
# ----------------------------------------------------------------------------------------------------------------------


def test_training_loss_trains_the_compressor_only():
    model, _ = _cmt(randomize=False)
    model.train()
    docs = torch.randint(3, VOCAB, (6, 8))
    batch = {
        "document_ids": docs,
        "document_mask": torch.ones_like(docs),
        "document_owner": torch.tensor([0, 0, 0, 1, 1, 1]),
        "gold_document": torch.tensor([1, 5]),
        "question_ids": torch.randint(3, VOCAB, (2, 4)),
        "question_mask": torch.ones(2, 4, dtype=torch.long),
        "qa_ids": torch.randint(3, VOCAB, (2, 7)),
        "qa_mask": torch.ones(2, 7, dtype=torch.long),
    }
    labels = batch["qa_ids"].clone()
    labels[:, :4] = -100
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        out = model.memory_training_loss(
            **batch, qa_labels=labels, document_weight=1.0, generator=torch.Generator().manual_seed(0)
        )
        assert out["document_loss"] > 0 and out["retrieval_accuracy"] <= 1
        optimizer.zero_grad()
        out["loss"].backward()
        if not losses:
            assert model.compressor.lora["model__layers__0__self_attn__k_proj"].lora_B.grad.abs().sum() > 0
            assert all(p.grad is None for p in model.backbone.parameters())
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="gold_document"):
        model.memory_training_loss(**{**batch, "gold_document": torch.tensor([4, 5])}, qa_labels=labels)


# ---- transformers conformance (tests/modeling/conformance.py) ---------------------------------------------------------


class CMTTester(ModelTester):
    """A 2-layer Llama backbone with 5 compressed documents in the bank (top-2 are read: the prefix matters)."""

    model_class = CMTForCausalLM
    base_model_class = LlamaForCausalLM
    num_hidden_states = 3
    doc = "docs/cmt.md"
    stateful = False

    def get_config(self, **overrides):
        backbone = tiny_backbone_config(tie_word_embeddings=overrides.pop("tie_word_embeddings", False))
        fields = dict(num_memory_tokens=3, memory_top_k=2, max_memories=16, max_document_tokens=12)
        fields.update(overrides)
        return CMTConfig(backbone_config=backbone, **fields)

    def prepare_model(self, model):
        randomize_(model.backbone)
        randomize_(model.compressor)
        vocab = model.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(3)
        model.memorize([torch.randint(4, vocab, (n,), generator=generator).tolist() for n in (5, 9, 12, 7, 10)])
        return model

    def reference_logits(self, model, prompt, sequences):
        """CMT continues a question with the memories retrieved for the question (the prompt), not for the whole
        sequence: one full forward over ``sequences`` after that prefix."""
        cache = model.prime_cache(CMTCache(config=model.config.backbone_config), prompt)
        with torch.no_grad():
            return model(input_ids=sequences, cache=cache).logits

    def training_loss(self, model, ids):
        """CMT's objective (the backbone is frozen; compressor, LoRA and key projection learn): 4 documents, two per
        sample, questions = the first tokens of ``ids``, answers = the rest; every term on (document, distillation)."""
        vocab = model.config.get_text_config().vocab_size
        documents = torch.randint(4, vocab, (4, 9), generator=torch.Generator().manual_seed(4))
        document_mask = torch.ones_like(documents)
        document_mask[1, :3] = 0
        qa_labels = ids.clone()
        qa_labels[:, :5] = -100
        return model.memory_training_loss(
            documents,
            document_mask,
            torch.tensor([0, 0, 1, 1]),
            torch.tensor([1, 2]),
            ids[:, :5],
            torch.ones_like(ids[:, :5]),
            ids,
            torch.ones_like(ids),
            qa_labels,
            document_weight=0.5,
            distill_weight=0.5,
            generator=torch.Generator().manual_seed(5),
        )["loss"]


class TestCMTConformance(ConformanceSuite):
    tester = CMTTester()
