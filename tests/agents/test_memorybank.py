"""MemoryBankPolicy: retention exp(-t/S), reinforcement on recall, archiving (never destroying), summaries."""

from __future__ import annotations

import math

import pytest

from hf_longmem.agents import MemoryStore
from hf_longmem.agents.llm import FunctionLLM
from hf_longmem.agents.memorybank import DAY, MemoryBankPolicy, retention


def test_retention_is_monotone_in_time_and_strength():
    days = [0.0, 0.5, 1, 2, 5, 10, 30]
    strengths = [1, 2, 3, 5, 10]
    for s in strengths:
        values = [retention(t, s) for t in days]
        assert values[0] == 1.0 and all(a > b for a, b in zip(values, values[1:]))
    for t in days[1:]:
        values = [retention(t, s) for s in strengths]
        assert all(a < b for a, b in zip(values, values[1:]))
    # The official `math.exp(-t / 5*S)` gives exp(-20) here: strength must slow forgetting, not speed it up.
    assert retention(10, 10) == pytest.approx(math.exp(-1)) and retention(10, 10) > retention(10, 1)
    with pytest.raises(ValueError, match="`strength`"):
        retention(1, 0)


def test_a_recalled_memory_outlives_an_unrecalled_one_and_forgetting_archives():
    store = MemoryStore()
    policy = MemoryBankPolicy(mode="threshold", threshold=0.05, auto_forget=False)
    cat = policy.ingest(store, "my cat is called Tom", session_id="d0", timestamp=0)
    car = policy.ingest(store, "my car is a red Fiat", session_id="d0", timestamp=0)
    assert store.get_state(cat) == {"strength": 1.0, "last_recall": 0.0}
    hits = policy.retrieve(store, "what is my cat called", 1, now=2 * DAY)
    assert [h.id for h in hits] == [cat]
    assert store.get_state(cat) == {"strength": 2.0, "last_recall": 2 * DAY}
    assert policy.retention_of(store, cat, 5 * DAY) == pytest.approx(math.exp(-3 / 2))
    assert policy.retention_of(store, car, 5 * DAY) == pytest.approx(math.exp(-5))
    assert policy.forget(store, 5 * DAY) == [car]
    # Forgotten: out of retrieval, but kept, recorded and revivable.
    assert [h.id for h in policy.retrieve(store, "what car do I drive", 2, now=5 * DAY)] == [cat]
    assert store.get(car).text == "my car is a red Fiat" and store.get(car).status == "archived"
    assert ("archive", 5 * DAY) in store.events(car)
    policy.revive(store, car, 6 * DAY)
    assert store.search("what car do I drive", 1)[0].id == car


def test_stochastic_forgetting_keeps_a_share_close_to_retention_and_is_seeded():
    def kept(seed):
        store = MemoryStore()
        policy = MemoryBankPolicy(seed=seed, auto_forget=False)
        for i in range(300):
            policy.ingest(store, f"note {i}", session_id="s", timestamp=0)
        return {r.text for r in store.get_all()} - {store.get(i).text for i in policy.forget(store, DAY)}

    first = kept(0)
    assert abs(len(first) / 300 - math.exp(-1)) < 0.09
    assert kept(0) == first and kept(1) != first


def test_auto_forget_runs_before_retrieval():
    store = MemoryStore()
    policy = MemoryBankPolicy(mode="threshold", threshold=0.5)
    old = policy.ingest(store, "an old note about tigers", session_id="s", timestamp=0)
    lemon = policy.ingest(store, "a note about lemons", session_id="s", timestamp=0)
    assert policy.retrieve(store, "tigers", 1, now=0.5 * DAY)[0].id == old  # R = exp(-0.5) = 0.61: kept, S = 2
    assert policy.retrieve(store, "tigers", 1, now=1.5 * DAY)[0].id == old  # R = exp(-1 / 2) = 0.61: kept, S = 3
    assert store.get(lemon).status == "archived"  # never recalled: R = exp(-1.5) = 0.22 at 1.5 days
    # At 5 days the tiger note has R = exp(-3.5 / 3) = 0.31 < 0.5: archived before the search runs.
    assert policy.retrieve(store, "tigers", 1, now=5.0 * DAY) == []
    assert store.get(old).status == "archived"


def test_session_summary_goes_through_the_llm_and_is_a_memory():
    store = MemoryStore()
    policy = MemoryBankPolicy(auto_forget=False)
    policy.ingest(store, "user: I adopted a kitten named Miso", session_id="2024-05-01", timestamp=0)
    policy.ingest(store, "user: Miso likes tuna", session_id="2024-05-01", timestamp=10)
    llm = FunctionLLM(lambda prompt, n: " The user adopted a kitten, Miso, who likes tuna. ")
    summary_id = policy.summarize_session(store, llm, "2024-05-01", now=DAY)
    prompt = llm.calls[0][0]
    assert prompt.startswith("Please summarize the following dialogue") and "Miso likes tuna" in prompt
    record = store.get(summary_id)
    assert record.text == "The user adopted a kitten, Miso, who likes tuna."
    assert record.metadata == {"kind": "summary", "summary_of": "2024-05-01"}
    assert store.get_state(summary_id)["strength"] == 1.0
    assert policy.summarize_overall(store, llm) == llm.fn("", 0).strip()
    assert "At 2024-05-01, the events are The user adopted" in llm.calls[-1][0]


@pytest.mark.parametrize(
    "kwargs, name",
    [({"mode": "random"}, "mode"), ({"threshold": 1.5}, "threshold"), ({"time_unit": 0}, "time_unit")],
)
def test_bad_options_name_the_option(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        MemoryBankPolicy(**kwargs)
