"""BM25 scoring against a direct implementation of the formula, and LongMemEval's retrieval and QA metrics."""

from __future__ import annotations

import math

import pytest
import torch

from hf_longmem.agents import BM25Embedder, MemoryStore
from hf_longmem.agents.metrics import (
    answer_is_correct,
    ndcg_at_k,
    qa_accuracy_by_type,
    recall_all_at_k,
    recall_any_at_k,
    retrieval_metrics,
    session_ranking,
)


def _bm25_reference(query: list[str], docs: list[list[str]], k1=1.5, b=0.75) -> list[float]:
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    scores = []
    for doc in docs:
        total = 0.0
        for word in query:
            df = sum(word in d for d in docs)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = doc.count(word)
            total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(total)
    return scores


def test_bm25_scores_equal_the_formula():
    docs = ["the cat sat on the mat", "the dog ate my homework", "a cat and a dog", "tiger tiger burning bright"]
    query = "cat dog tiger the"
    emb = BM25Embedder(dim=1 << 16)  # no collisions among these few words
    got = emb.score(emb.embed([query])[0], emb.embed(docs))
    want = _bm25_reference(query.split(), [d.split() for d in docs])
    assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_bm25_store_ranks_the_rare_word_first():
    store = MemoryStore()
    for subject in ["tiger", "apple", "river", "candle"]:
        store.add(f"{subject} : the pass key is 12345 . remember it", session_id=subject, timestamp=0)
    store.add("the grass is green . the sky is blue", session_id="filler", timestamp=0)
    assert store.search("what is the pass key of river ?", k=1)[0].session_id == "river"
    with pytest.raises(ValueError, match="`k1`"):
        BM25Embedder(k1=0)


def test_retrieval_metrics_by_hand():
    ranking = ["a", "b", "c", "d"]
    assert recall_any_at_k(ranking, ["b", "c"], 1) == 0.0
    assert recall_any_at_k(ranking, ["b", "c"], 2) == 1.0
    assert recall_all_at_k(ranking, ["b", "c"], 2) == 0.0
    assert recall_all_at_k(ranking, ["b", "c"], 3) == 1.0
    assert ndcg_at_k(ranking, ["b", "c"], 3) == pytest.approx((1 / math.log2(3) + 1 / 2) / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(ranking, ["a"], 10) == 1.0
    assert set(retrieval_metrics(ranking, ["a"], ks=(1, 5))) == {
        "recall_any@1",
        "recall_all@1",
        "ndcg@1",
        "recall_any@5",
        "recall_all@5",
        "ndcg@5",
    }
    assert session_ranking(["s2", "s1", "s2", "s3", "s1"]) == ["s2", "s1", "s3"]
    with pytest.raises(ValueError, match="`correct`"):
        recall_any_at_k(ranking, [], 1)
    with pytest.raises(ValueError, match="`k`"):
        ndcg_at_k(ranking, ["a"], 0)


def test_answer_judge_and_accuracy_by_type():
    assert answer_is_correct("The pass key is 12345.", "12345")
    assert not answer_is_correct("123456", "12345")  # whole words only
    assert answer_is_correct("Sorry, I don't know.", "whatever", abstention=True)
    assert not answer_is_correct("12345", "whatever", abstention=True)
    table = qa_accuracy_by_type(
        [
            {"question_type": "knowledge-update", "abstention": False, "correct": True},
            {"question_type": "knowledge-update", "abstention": False, "correct": False},
            {"question_type": "single-session-user", "abstention": True, "correct": True},
        ]
    )
    assert table["knowledge-update"] == {"accuracy": 0.5, "count": 2}
    assert table["abstention"] == {"accuracy": 1.0, "count": 1} and "single-session-user" not in table
    assert table["overall"]["accuracy"] == pytest.approx(2 / 3) and table["overall_answerable"]["count"] == 2
    assert torch.is_tensor(BM25Embedder(dim=32).embed(["x"]))
