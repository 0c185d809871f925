"""MemoryAgent with the embedded model: retrieval feeds the reader, the budget holds, as_of for dated questions."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

import hf_longmem
from hf_longmem.agents import MemoryStore
from hf_longmem.agents.agent import MemoryAgent, date_in_question
from hf_longmem.agents.evaluate import PASSKEY_READER
from hf_longmem.agents.policy import RetrievalPolicy
from hf_longmem.agents.synthetic import FACT_TEMPLATE, fact_subject


@pytest.fixture(scope="module")
def default_model():
    return hf_longmem.load_default_model()


def _day(d: int) -> datetime:
    return datetime(2024, 1, d, 9, tzinfo=timezone.utc)


@pytest.fixture
def agent(default_model):
    model, tokenizer = default_model
    store = MemoryStore()
    agent = MemoryAgent(
        model,
        tokenizer,
        store,
        RetrievalPolicy(supersede_key=fact_subject),
        k=1,
        max_new_tokens=8,
        write_back=False,
        **PASSKEY_READER,
    )
    for day, (subject, value) in enumerate([("tiger", 48213), ("apple", 90417), ("river", 33508)], start=1):
        agent.remember(FACT_TEMPLATE.format(subject=subject, value=value), session_id=f"s{day}", timestamp=_day(day))
        agent.remember("The grass is green. The sky is blue.", session_id=f"s{day}", timestamp=_day(day))
    return agent


def test_the_retrieved_memory_answers_the_question(agent):
    for subject, value in [("tiger", "48213"), ("apple", "90417"), ("river", "33508")]:
        reply = agent.answer(f"What is the pass key of {subject}?", now=_day(9))
        assert [m.session_id for m in reply.shown] == [f"s{['tiger', 'apple', 'river'].index(subject) + 1}"]
        assert reply.text.strip() == value, reply.text  # PASSKEY_READER's intro: the model stops after the key


def test_the_passkey_reader_stops_after_the_key(default_model):
    # Keys the model ran past ("24605555") with the pass-key task's own intro on these short prompts (synthetic set,
    # seed 1); PASSKEY_READER's needle intro makes it stop.
    model, tokenizer = default_model
    agent = MemoryAgent(model, tokenizer, MemoryStore(), k=1, max_new_tokens=8, write_back=False, **PASSKEY_READER)
    facts = [("rabbit", "24605"), ("engine", "26007"), ("zebra", "81998"), ("lantern", "13913")]
    for day, (subject, value) in enumerate(facts, start=1):
        agent.remember(FACT_TEMPLATE.format(subject=subject, value=value), session_id=f"s{day}", timestamp=_day(day))
    for subject, value in facts:
        assert agent.answer(f"What is the pass key of {subject}?", now=_day(9)).text.strip() == value


def test_an_update_supersedes_and_a_dated_question_reads_the_past(agent):
    agent.remember(FACT_TEMPLATE.format(subject="tiger", value=11111), session_id="s5", timestamp=_day(5))
    assert len(agent.store) == 6  # superseded, not added
    assert agent.answer("What is the pass key of tiger?", now=_day(9)).text.startswith("11111")
    past = agent.answer("What was the pass key of tiger on 2024/01/03?", now=_day(9))
    assert past.as_of == date_in_question("2024/01/03").timestamp()
    assert past.shown[0].text.startswith("tiger : The pass key is 48213") and past.text.startswith("48213")
    assert date_in_question("on 2024-01-03, or so") == datetime(2024, 1, 3, 23, 59, 59, 999999, tzinfo=timezone.utc)
    assert date_in_question("no date here") is None


def test_the_prompt_stays_under_the_token_budget(default_model):
    model, tokenizer = default_model
    store = MemoryStore()
    for i in range(30):
        store.add(f"The grass is green. note {i} : the pass key is {10000 + i}.", session_id=f"s{i}", timestamp=i)
    agent = MemoryAgent(model, tokenizer, store, k=30, max_prompt_tokens=120, max_new_tokens=4, write_back=False)
    reply = agent.answer("What is the pass key?", now=100)
    assert 0 < len(reply.shown) < 30
    assert reply.prompt_tokens <= 120
    assert [m.timestamp for m in reply.shown] == sorted(m.timestamp for m in reply.shown)  # chronological
    with pytest.raises(ValueError, match="`max_prompt_tokens`"):
        MemoryAgent(model, tokenizer, store, max_prompt_tokens=3).answer("What is the pass key?", now=100)


def test_abstention_and_write_back(default_model):
    model, tokenizer = default_model
    store = MemoryStore()
    for subject in ["tiger", "apple", "river", "candle"]:
        store.add(f"{subject} : The pass key is 48213.", session_id="s1" if subject == "tiger" else "s0", timestamp=0)
    agent = MemoryAgent(model, tokenizer, store, k=1, max_new_tokens=4, abstain_below=1.0)
    assert agent.answer("What is the pass key of zebra?", now=1).abstained  # no memory shares a rare word
    text = agent.chat("What is the pass key of tiger?", now=2, session_id="s2")
    assert not agent.last_reply.abstained and agent.last_reply.shown[0].session_id == "s1"
    written = store.get_all(filter={"session_id": "s2"})
    assert written[0].text == "What is the pass key of tiger?" and written[0].metadata == {"role": "user"}
    assert (len(written) == 2) == bool(text)
    with pytest.raises(ValueError, match="`prompt_template`"):
        MemoryAgent(model, tokenizer, store, prompt_template="no slot")
