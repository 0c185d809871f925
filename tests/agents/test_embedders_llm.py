"""Embedders (hashing, LM hidden states), top-k, and the LLM interface."""

from __future__ import annotations

import pytest
import torch

import hf_longmem
from hf_longmem.agents import HashingEmbedder, LMEmbedder, top_k
from hf_longmem.agents.llm import FunctionLLM, TransformersLLM


@pytest.fixture(scope="module")
def default_model():
    return hf_longmem.load_default_model()


def test_hashing_embedder_is_deterministic_unit_and_lexical():
    emb = HashingEmbedder(dim=256)
    texts = ["my cat is called Tom", "My cat is called Tom!", "the weather in Lisbon", ""]
    a, b = emb.embed(texts), HashingEmbedder(dim=256).embed(texts)
    assert a.shape == (4, 256) and torch.equal(a, b)
    assert torch.allclose(a[:3].norm(dim=-1), torch.ones(3)) and a[3].abs().sum() == 0
    assert torch.allclose(a[0], a[1])  # case and punctuation do not matter
    assert a[0] @ a[1] > a[0] @ a[2]
    assert emb.config() == {"type": "hashing", "dim": 256, "ngram": 2}
    with pytest.raises(ValueError, match="`dim`"):
        HashingEmbedder(dim=4)
    with pytest.raises(ValueError, match="`texts`"):
        emb.embed("not a list")


def test_top_k_orders_by_score_and_breaks_ties_by_index():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    scores, order = top_k(torch.tensor([1.0, 0.0]), keys, 3)
    assert order.tolist() == [0, 2, 3] and scores.tolist() == pytest.approx([1.0, 1.0, 0.6])
    assert top_k(torch.tensor([1.0, 0.0]), keys, 10)[1].shape == (4,)
    assert top_k(torch.tensor([1.0, 0.0]), torch.zeros(0, 2), 3)[1].numel() == 0


def test_lm_embedder_batches_equal_single_texts(default_model):
    model, tokenizer = default_model
    emb = LMEmbedder(model, tokenizer, layer=-1, batch_size=3)
    texts = ["The pass key is 123", "Remember it", "What is the pass key ? The pass key is"]
    batched = emb.embed(texts)
    single = torch.cat([emb.embed([t]) for t in texts])
    assert batched.shape == (3, model.config.hidden_size)
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert emb.config()["layer"] == -1
    with pytest.raises(ValueError, match="`layer`"):
        LMEmbedder(model, tokenizer, layer=99)


def test_transformers_llm_answers_a_pass_key(default_model):
    model, tokenizer = default_model
    llm = TransformersLLM(model, tokenizer)
    prompt = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
        "you about the important information there. The pass key is 48213. Remember it. 48213 is the pass key."
        "\nWhat is the pass key? The pass key is"
    )
    assert llm.generate(prompt, 8).strip().startswith("48213")
    assert llm.last_prompt_tokens == len(tokenizer(prompt)["input_ids"])
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        llm.generate(prompt, 0)


def test_function_llm_records_calls():
    llm = FunctionLLM(lambda prompt, n: prompt[::-1][:n])
    assert llm.generate("abc", 2) == "cb" and llm.calls == [("abc", 2)]
    with pytest.raises(ValueError, match="`prompt`"):
        llm.generate(3, 2)


def test_store_with_an_lm_embedder_round_trips_only_with_that_embedder(default_model, tmp_path):
    from hf_longmem.agents import MemoryStore

    model, tokenizer = default_model
    emb = LMEmbedder(model, tokenizer)
    store = MemoryStore(embedder=emb)
    a = store.add("The pass key is 123", session_id="s", timestamp=0)
    store.add("The grass is green", session_id="s", timestamp=0)
    hits = store.search("The pass key is 123", k=2)
    assert hits[0].id == a and hits[0].score == pytest.approx(1.0, abs=1e-5) and -1 <= hits[1].score <= 1
    store.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="embedder"):
        MemoryStore.from_pretrained(tmp_path)
    assert MemoryStore.from_pretrained(tmp_path, embedder=emb).search("The pass key is 123", k=1)[0].id == a
