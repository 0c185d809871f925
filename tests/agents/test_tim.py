"""TiMPolicy: thoughts as triples, insert / merge / forget, LSH buckets for recall."""

from __future__ import annotations

import pytest

from hf_longmem.agents import MemoryStore
from hf_longmem.agents.llm import FunctionLLM
from hf_longmem.agents.tim import TiMPolicy, parse_triples


def _policy(reply: str = "", **kwargs) -> TiMPolicy:
    return TiMPolicy(FunctionLLM(lambda prompt, n: reply), **kwargs)


def test_parse_triples():
    text = "Triples:\n- Tom | lives in | Lisbon\nnot a triple\n* Tom | likes | fish |extra\n`Ana | owns | a cat`"
    assert parse_triples(text) == [("Tom", "lives in", "Lisbon"), ("Ana", "owns", "a cat")]


def test_insert_merge_forget_keep_one_memory_per_head_and_the_past():
    store, policy = MemoryStore(), _policy()
    ops = [
        policy.add_thought(store, "Tom", "lives in", "Lisbon", timestamp=1)[1],
        policy.add_thought(store, "Tom", "likes", "fish", timestamp=2)[1],
        policy.add_thought(store, "Tom", "lives in", "Porto", timestamp=3)[1],
        policy.add_thought(store, "Tom", "likes", "fish", timestamp=4)[1],
        policy.add_thought(store, "Ana", "owns", "a cat", timestamp=5)[1],
    ]
    assert ops == ["insert", "merge", "forget", "none", "insert"]
    tom = store.get_all(filter={"head": "Tom"})
    assert len(tom) == 1 and tom[0].text == "Tom: lives in Porto; likes fish"
    assert tom[0].metadata["relations"] == {"lives in": "Porto", "likes": "fish"}
    # Forgetting supersedes: the contradicted value stays in the memory's history.
    assert store.get(tom[0].id, as_of=2.5).text == "Tom: lives in Lisbon; likes fish"
    assert [r.op for r in store.history(tom[0].id)] == ["add", "update", "update"]


def test_post_thinking_goes_through_the_llm():
    store = MemoryStore()
    policy = _policy("Tom | lives in | Lisbon\nTom | likes | fish")
    assert [op for _, op in policy.post_think(store, "Where does Tom live?", "In Lisbon.", timestamp=1)] == [
        "insert",
        "merge",
    ]
    assert "Question: Where does Tom live?\nAnswer: In Lisbon." in policy.llm.calls[0][0]
    assert policy.ingest(store, "nothing to say", session_id="s", timestamp=2) != ""


def test_lsh_buckets_are_deterministic_and_recall_stays_in_the_bucket():
    store, policy = MemoryStore(), _policy(num_buckets=4)
    heads = [f"entity{i}" for i in range(24)]
    for i, head in enumerate(heads):
        policy.add_thought(store, head, "has value", f"v{i} and more words {i % 5}", timestamp=i)
    buckets = {r.metadata["bucket"] for r in store.get_all()}
    assert buckets <= set(range(4)) and len(buckets) > 1
    again = _policy(num_buckets=4)
    assert all(again.bucket(store, r.text) == r.metadata["bucket"] for r in store.get_all())
    for record in store.get_all()[:6]:
        hits = policy.retrieve(store, record.text, 3, now=100)
        assert hits[0].id == record.id
        assert all(h.metadata["bucket"] == record.metadata["bucket"] for h in hits)
    with pytest.raises(ValueError, match="`num_buckets`"):
        _policy(num_buckets=3)
