"""SCMPolicy: the controller, flash vs archived memory, raw/summary/drop under a budget that always terminates."""

from __future__ import annotations

import pytest

from hf_longmem.agents import MemoryStore
from hf_longmem.agents.llm import FunctionLLM
from hf_longmem.agents.scm import SCMPolicy, select_under_budget


def _upstream_loop_steps(raw, summary, first_choices, budget, max_steps=10_000):
    """Upstream's ``while shorten_history`` loop after its first round (core/chat.py: get_related_turn), with a cap."""
    lengths = [raw[i] if c == "raw" else summary[i] if c == "summary" else 0 for i, c in enumerate(first_choices)]
    flags = list(first_choices)
    for step in range(max_steps):
        if sum(lengths) <= budget:
            return step
        for i in range(len(flags)):
            if flags[i] == "raw":
                flags[i] = "summary"
            if flags[i] == "drop":
                lengths[i] = 0
            elif flags[i] == "summary":
                lengths[i] = summary[i]
            if sum(lengths) <= budget:
                break
    return None  # never fits: upstream loops forever


def test_budget_loop_terminates_where_upstream_loops_forever():
    raw, summary, first = [100, 100, 100], [60, 60, 60], ["summary", "summary", "raw"]
    assert _upstream_loop_steps(raw, summary, first, budget=50) is None  # the upstream case: summaries exceed budget
    choices = select_under_budget(raw, summary, first, budget=50)
    assert choices == ["drop", "drop", "drop"]
    # When summaries fit, raw turns become summaries least similar first and nothing more is dropped.
    assert select_under_budget([100, 100, 100], [10, 10, 10], ["raw", "raw", "raw"], budget=120) == [
        "summary",
        "summary",
        "raw",
    ]
    assert select_under_budget([100, 100], [10, 10], ["drop", "raw"], budget=100) == ["drop", "raw"]
    for budget in range(0, 400, 7):
        out = select_under_budget(raw, summary, first, budget)
        used = sum(raw[i] if c == "raw" else summary[i] if c == "summary" else 0 for i, c in enumerate(out))
        assert used <= budget or out == ["drop"] * 3


def _scripted(summary_words: int, answerable: set[str], needed: bool = True):
    """A fake LLM: summaries of ``summary_words`` words, the judge says yes when the content holds a word of
    ``answerable``, the controller says ``needed``."""

    def respond(prompt: str, max_new_tokens: int) -> str:
        if prompt.startswith("Below is a conversation"):
            return " ".join(["summary"] * summary_words)
        if prompt.startswith("Given the [user question], decide"):
            return "(A) yes" if needed else "(B) no"
        content = prompt.split("```")[1]
        return "(A) yes" if any(w in content for w in answerable) else "(B) no"

    return FunctionLLM(respond)


def _fill(store, policy, turns):
    for i, text in enumerate(turns):
        policy.ingest(store, text, session_id="s", timestamp=i)


def test_flash_memory_is_always_kept_and_archived_is_retrieved():
    store = MemoryStore()
    policy = SCMPolicy(_scripted(3, {"tiger"}), max_history_tokens=1000)
    _fill(store, policy, ["the tiger is called Tom", "the sky is blue", "I like green tea"])
    assert store.get_all()[0].metadata["summary"] == "summary summary summary"
    hits = policy.retrieve(store, "what is the tiger called", 1, now=10)
    assert [h.text for h in hits] == ["the tiger is called Tom", "I like green tea"]
    assert [h.metadata["scm_choice"] for h in hits] == ["raw", "flash"]


def test_controller_can_skip_memory():
    store = MemoryStore()
    policy = SCMPolicy(_scripted(3, set(), needed=False))
    _fill(store, policy, ["the tiger is called Tom", "hello"])
    assert policy.retrieve(store, "what time is it", 2, now=10) == [] and not policy.last_decision["needed"]


def test_over_budget_turns_are_judged_summarised_or_dropped_and_the_total_fits():
    long = " ".join(["word"] * 40)
    store = MemoryStore()
    policy = SCMPolicy(_scripted(5, {"tiger", "summary"}), max_history_tokens=60)
    _fill(store, policy, [f"tiger one {long}", f"tiger two {long}", f"lion three {long}", "ok"])
    hits = policy.retrieve(store, "tiger one two three", 3, now=10)
    used = sum(policy.llm.count_tokens(h.text) for h in hits)
    assert used <= 60
    choices = {h.text.split()[1] if h.metadata["scm_choice"] == "raw" else h.metadata["scm_choice"] for h in hits}
    assert "flash" in choices and "summary" in choices


def test_even_summaries_over_budget_terminate_with_the_flash_memory_cut():
    store = MemoryStore()
    policy = SCMPolicy(_scripted(50, {"tiger", "summary"}), max_history_tokens=20, max_pre_turn_tokens=5)
    _fill(store, policy, ["tiger " * 30, "tiger " * 30, "tiger " * 30])
    hits = policy.retrieve(store, "tiger", 2, now=10)
    assert [h.metadata["scm_choice"] for h in hits] == ["flash"]
    assert policy.llm.count_tokens(hits[0].text) == 20
    with pytest.raises(ValueError, match="`max_history_tokens`"):
        SCMPolicy(policy.llm, max_history_tokens=0)
    with pytest.raises(ValueError, match="`llm`"):
        SCMPolicy(lambda p, n: "")


def test_scm_drives_the_agent_prompt():
    import hf_longmem
    from hf_longmem.agents import MemoryAgent

    model, tokenizer = hf_longmem.load_default_model()
    store = MemoryStore()
    policy = SCMPolicy(_scripted(3, {"tiger"}), max_history_tokens=200)
    agent = MemoryAgent(model, tokenizer, store, policy, k=1, max_new_tokens=4, write_back=False)
    for i, text in enumerate(["tiger : The pass key is 48213.", "The grass is green.", "The sky is blue."]):
        agent.remember(text, session_id="s", timestamp=i)
    reply = agent.answer("What is the pass key of tiger?", now=10)
    assert [m.metadata["scm_choice"] for m in reply.shown] == ["raw", "flash"]
    assert "tiger : The pass key is 48213.\nThe sky is blue." in reply.prompt  # chronological
