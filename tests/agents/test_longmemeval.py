"""LongMemEval loader and replay, the synthetic generator (same schema), and the evaluation runner."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

import hf_longmem
from hf_longmem.agents import MemoryStore
from hf_longmem.agents.evaluate import PASSKEY_READER, evaluate_agent, main
from hf_longmem.agents.longmemeval import (
    QUESTION_TYPES,
    ingest_haystack,
    is_abstention,
    load_longmemeval,
    parse_date,
)
from hf_longmem.agents.policy import RetrievalPolicy
from hf_longmem.agents.synthetic import fact_subject, synthetic_chat_history

OFFICIAL_FIELDS = {
    "question_id",
    "question_type",
    "question",
    "answer",
    "question_date",
    "haystack_session_ids",
    "haystack_dates",
    "haystack_sessions",
    "answer_session_ids",
}


def _official_item(qid="e47becba", qtype="single-session-user"):
    """An item shaped like longmemeval_s.json (content invented)."""
    return {
        "question_id": qid,
        "question_type": qtype,
        "question": "What degree did I graduate with?",
        "answer": "Business Administration",
        "question_date": "2023/05/30 (Tue) 23:40",
        "haystack_session_ids": ["sharegpt_yywfMhb_0", "answer_280352e9"],
        "haystack_dates": ["2023/05/20 (Sat) 02:21", "2023/05/25 (Thu) 10:05"],
        "haystack_sessions": [
            [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did..."}],
            [
                {
                    "role": "user",
                    "content": "I graduated with a degree in Business Administration.",
                    "has_answer": True,
                },
                {"role": "assistant", "content": "Congratulations!"},
                {"role": "user", "content": "Thanks, it took a while.", "has_answer": False},
            ],
        ],
        "answer_session_ids": ["answer_280352e9"],
    }


@pytest.fixture(scope="module")
def default_model():
    return hf_longmem.load_default_model()


def test_loader_validates_the_official_schema(tmp_path):
    path = tmp_path / "longmemeval_s.json"
    path.write_text(json.dumps([_official_item(), _official_item("e47becba_abs", "multi-session")]))
    items = load_longmemeval(path)
    assert [is_abstention(i) for i in items] == [False, True]
    assert [i["question_id"] for i in load_longmemeval(path, question_types=["multi-session"])] == ["e47becba_abs"]
    assert parse_date("2023/05/20 (Sat) 02:21") == datetime(2023, 5, 20, 2, 21, tzinfo=timezone.utc)
    broken = _official_item()
    broken["haystack_dates"] = ["2023/05/20 (Sat) 02:21"]
    path.write_text(json.dumps([broken]))
    with pytest.raises(ValueError, match="differ in length"):
        load_longmemeval(path)
    del broken["question_date"]
    path.write_text(json.dumps([broken]))
    with pytest.raises(ValueError, match="`question_date`"):
        load_longmemeval(path)
    path.write_text(json.dumps([_official_item()]))
    with pytest.raises(ValueError, match="`question_types`"):
        load_longmemeval(path, question_types=["multi_session"])
    with pytest.raises(ValueError, match="`path`"):
        load_longmemeval(tmp_path / "missing.json")


def test_ingest_turns_and_sessions():
    store = MemoryStore()
    assert ingest_haystack(_official_item(), store, RetrievalPolicy()) == 3  # user turns only
    hit = store.search("what degree did I graduate with", k=1)[0]
    assert hit.session_id == "answer_280352e9" and hit.metadata == {"turn": 1, "role": "user", "has_answer": True}
    assert hit.timestamp == parse_date("2023/05/25 (Thu) 10:05").timestamp()
    sessions = MemoryStore()
    assert ingest_haystack(_official_item(), sessions, RetrievalPolicy(), granularity="session") == 2
    assert sessions.get_all(filter={"session_id": "answer_280352e9"})[0].text.endswith("it took a while.")
    with pytest.raises(ValueError, match="`granularity`"):
        ingest_haystack(_official_item(), store, RetrievalPolicy(), granularity="word")


def test_synthetic_history_has_the_official_schema_and_plants_what_it_says(default_model, tmp_path):
    _, tokenizer = default_model
    items = synthetic_chat_history(tokenizer, 32, seed=3, update_fraction=0.2, num_questions=50, session_tokens=256)
    assert len(items) == 50 and all(set(i) == OFFICIAL_FIELDS for i in items)
    types = [i["question_type"] for i in items]
    assert types.count("knowledge-update") == types.count("temporal-reasoning") == round(0.2 * 32)
    assert sum(map(is_abstention, items)) == 4 and set(types) <= set(QUESTION_TYPES)
    sessions = items[0]["haystack_sessions"]
    lengths = [
        len(tokenizer(" ".join(t["content"] for t in s), add_special_tokens=False)["input_ids"]) for s in sessions
    ]
    assert len(sessions) == 32 and min(lengths) >= 256 and 8192 <= sum(lengths) <= 32 * 256 + 32 * 60
    facts = [t["content"] for s in sessions for t in s if t["role"] == "user" and fact_subject(t["content"])]
    assert len(facts) == 32 + 6 and len({fact_subject(f) for f in facts}) == 32
    unk = tokenizer.unk_token_id
    assert all(unk not in tokenizer(t["content"])["input_ids"] for s in sessions for t in s)
    for item in items:
        marked = [
            (sid, t["content"])
            for sid, s in zip(item["haystack_session_ids"], item["haystack_sessions"])
            for t in s
            if t.get("has_answer")
        ]
        if is_abstention(item):
            assert marked == [] and item["answer_session_ids"] == []
            assert all(fact_subject(f) not in item["question"] for f in facts)
        else:
            assert len(marked) == 1 and marked[0][0] in item["answer_session_ids"]
            assert f"The pass key is {item['answer']}." in marked[0][1]
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps(items))
    assert load_longmemeval(path) == items  # a valid LongMemEval file
    assert synthetic_chat_history(tokenizer, 32, seed=3, update_fraction=0.2) == items
    assert synthetic_chat_history(tokenizer, 32, seed=4, update_fraction=0.2) != items
    with pytest.raises(ValueError, match="`num_sessions`"):
        synthetic_chat_history(tokenizer, 80)


def test_evaluation_supersede_beats_add_only_on_updates(default_model):
    model, tokenizer = default_model
    items = synthetic_chat_history(
        tokenizer, 8, seed=0, update_fraction=0.25, num_questions=10, num_abstention=1, session_tokens=64
    )
    kwargs = dict(k=1, progress=False, abstain_below=4.0, **PASSKEY_READER)
    supersede = evaluate_agent(
        items, model, tokenizer, policy_factory=lambda: RetrievalPolicy(supersede_key=fact_subject), **kwargs
    )
    add_only = evaluate_agent(items, model, tokenizer, policy_factory=RetrievalPolicy, **kwargs)
    s, a = supersede["summary"], add_only["summary"]
    assert s["retrieval"]["recall_any@1"] == 1.0 and s["max_prompt_tokens"] <= 512
    assert s["qa"]["knowledge-update"]["accuracy"] == 1.0 and s["qa"]["temporal-reasoning"]["accuracy"] == 1.0
    assert a["qa"]["knowledge-update"]["accuracy"] < s["qa"]["knowledge-update"]["accuracy"]
    full = evaluate_agent(items, model, tokenizer, mode="full_history", progress=False, **PASSKEY_READER)
    assert full["summary"]["mean_prompt_tokens"] > 4 * s["mean_prompt_tokens"]


def test_command_line_writes_json_and_tables_it(tmp_path, capsys):
    out = tmp_path / "r.json"
    result = main(["--synthetic", "--num-sessions", "4", "--num-questions", "4", "--k", "1", "--output", str(out)])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    main(["--table", str(out)])
    table = capsys.readouterr().out.splitlines()[-1]
    overall = result["summary"]["qa"]["overall"]
    assert table.startswith("| r |") and f"{100 * overall['accuracy']:.0f} ({overall['count']})" in table
