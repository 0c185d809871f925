"""AMemPolicy: note analysis, links (strengthen), neighbour evolution, retrieval of linked notes."""

from __future__ import annotations

import json
import re

import pytest

from hf_longmem.agents import MemoryStore
from hf_longmem.agents.amem import AMemPolicy, parse_json_object
from hf_longmem.agents.llm import FunctionLLM


def _scripted(evolve: bool = True):
    """Analysis: the content's words as keywords; evolution: link to the first neighbour, retag the new note, give
    every neighbour the context "updated <i>" and tags ["t<i>"] (wrapped in prose, as models do)."""

    def respond(prompt: str, max_new_tokens: int) -> str:
        if prompt.startswith("Generate a structured analysis"):
            words = prompt.rsplit("Content for analysis:\n", 1)[1].split()
            return json.dumps({"keywords": words[:3], "context": "about " + words[0], "tags": ["original"]})
        ids = re.findall(r"memory id:(\w+)", prompt)
        decision = {
            "should_evolve": evolve,
            "actions": ["strengthen", "update_neighbor"],
            "suggested_connections": [ids[0], "not-an-id"],
            "tags_to_update": ["linked"],
            "new_context_neighborhood": [f"updated {i}" for i in range(len(ids))],
            "new_tags_neighborhood": [[f"t{i}"] for i in range(len(ids))],
        }
        return "Here is my decision:\n```json\n" + json.dumps(decision) + "\n```"

    return FunctionLLM(respond)


def test_a_new_note_is_analysed_linked_and_evolves_its_neighbours():
    store = MemoryStore()
    policy = AMemPolicy(_scripted(), k_neighbors=1)
    unrelated = policy.ingest(store, "bread recipes need flour and yeast", session_id="s", timestamp=0)
    first = policy.ingest(store, "my tiger is called Tom", session_id="s", timestamp=1)
    assert store.get_state(first)["links"] == [unrelated]  # the only neighbour then
    new = policy.ingest(store, "Tom the tiger likes fish", session_id="s", timestamp=2)
    state = store.get_state(new)
    assert state["keywords"] == ["Tom", "the", "tiger"] and state["context"] == "about Tom"
    assert state["links"] == [first] and state["tags"] == ["linked"]  # strengthen; the bad id is ignored
    # update_neighbor rewrote the neighbour it was shown (the tiger note), not the first note ever written.
    neighbour = store.get_state(first)
    assert neighbour["context"] == "updated 0" and neighbour["tags"] == ["t0"]
    assert neighbour["evolution_history"] == [{"time": 2.0, "before": {"context": "about my", "tags": ["linked"]}}]
    # The bread note was the neighbour (and was rewritten) at time 1 only; upstream would rewrite it again at time 2
    # (its first note ever), whatever the neighbours were.
    assert [h["time"] for h in store.get_state(unrelated)["evolution_history"]] == [1.0]
    assert policy.evolutions == 2


def test_retrieval_adds_linked_notes_even_when_k_notes_matched():
    store = MemoryStore()
    policy = AMemPolicy(_scripted(), k_neighbors=1)
    policy.ingest(store, "bread recipes need flour and yeast", session_id="s", timestamp=0)
    tiger = policy.ingest(store, "my tiger is called Tom", session_id="s", timestamp=1)
    fish = policy.ingest(store, "Tom the tiger likes fish", session_id="s", timestamp=2)
    hits = policy.retrieve(store, "what does the tiger like to eat? fish", 1, now=3)
    assert [h.id for h in hits] == [fish, tiger]
    assert hits[1].metadata["is_neighbor"] is True and "is_neighbor" not in hits[0].metadata
    assert store.get_state(fish)["retrieval_count"] == 1 and store.get_state(tiger)["retrieval_count"] == 1


def test_no_evolution_and_unparsable_replies_fall_back():
    store = MemoryStore()
    policy = AMemPolicy(_scripted(evolve=False))
    a = policy.ingest(store, "my tiger is called Tom", session_id="s", timestamp=0)
    b = policy.ingest(store, "Tom the tiger likes fish", session_id="s", timestamp=1)
    assert store.get_state(b)["links"] == [] and store.get_state(a)["context"] == "about my"
    silent = AMemPolicy(FunctionLLM(lambda p, n: "no json here"))
    c = silent.ingest(store, "a note", session_id="s", timestamp=2)
    assert store.get_state(c) == {
        "keywords": [],
        "context": "General",
        "tags": [],
        "links": [],
        "retrieval_count": 0,
        "evolution_history": [],
    }
    assert parse_json_object('x {"a": {"b": 1}} y {"c": 2}') == {"a": {"b": 1}}
    assert parse_json_object("{broken") is None
    with pytest.raises(ValueError, match="`k_neighbors`"):
        AMemPolicy(silent.llm, k_neighbors=0)
