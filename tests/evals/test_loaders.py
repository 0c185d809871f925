"""Loaders of SCBench, LongBench and InfiniteBench JSONL files: fixtures in the official schema, malformed files."""

from __future__ import annotations

import json

import pytest

from hf_longmem.evals import loaders
from hf_longmem.evals.metrics import qa_f1, score

SCBENCH_ROWS = [
    {
        "id": 0,
        "context": 'JSON data: {"a1": "v1", "b2": "v2"}',
        "multi_turns": [
            {"input": 'Key: "a1"\nThe value associated with the specified key is:', "answer": "v1"},
            {"input": 'Key: "b2"\nThe value associated with the specified key is:', "answer": "v2"},
        ],
        "lang": "en",
    },
    {
        "id": 1,
        "context": "A long novel.",
        "multi_turns": [{"input": "Who wins?", "answer": ["Alice"], "options": ["Bob", "Alice", "Carol", "Dan"]}],
    },
]
LONGBENCH_ROWS = [
    {
        "input": "Which city is the capital?",
        "context": "Passage 1: Paris is the capital of France.",
        "answers": ["Paris"],
        "length": 9,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": "abc123",
    },
    {
        "input": "What type of question is this?",
        "context": "Examples ...",
        "answers": ["Location"],
        "length": 3,
        "dataset": "trec",
        "language": "en",
        "all_classes": ["Location", "Number"],
        "_id": "def456",
    },
]
INFINITEBENCH_ROWS = [
    {
        "id": 0,
        "context": "noise The pass key is 71432. noise",
        "input": "What is the pass key?",
        "answer": 71432,
        "options": [],
    },
    {
        "id": 1,
        "context": "A book.",
        "input": "Which is right?",
        "answer": ["the second"],
        "options": ["the first", "the second", "the third", "the fourth"],
    },
]


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_scbench_round_trip(tmp_path):
    samples = loaders.load_scbench(_write(tmp_path, "scbench_kv.jsonl", SCBENCH_ROWS))
    assert [s.id for s in samples] == ["scbench_kv-0", "scbench_kv-1"] and samples[0].task == "scbench_kv"
    for sample, row in zip(samples, SCBENCH_ROWS):
        assert sample.context == row["context"] and len(sample.turns) == len(row["multi_turns"])
        for turn, raw in zip(sample.turns, row["multi_turns"]):
            assert raw["input"] in turn.query and turn.query.startswith("\n")
            assert turn.answers == (raw["answer"] if isinstance(raw["answer"], list) else [raw["answer"]])
    assert "B. Alice" in samples[1].turns[0].query and samples[0].meta["lang"] == "en"
    assert score(" The value is v1.", samples[0].turns[0].answers, samples[0].meta["metric"]) == 1.0


def test_longbench_round_trip(tmp_path):
    samples = loaders.load_longbench(_write(tmp_path, "hotpotqa.jsonl", LONGBENCH_ROWS))
    assert [s.task for s in samples] == ["hotpotqa", "trec"] and samples[0].id == "hotpotqa-abc123"
    for sample, row in zip(samples, LONGBENCH_ROWS):
        assert sample.context == row["context"] and sample.turns[0].answers == row["answers"]
        assert row["input"] in sample.turns[0].query and sample.meta["original_length"] == row["length"]
    assert samples[0].meta["metric"] == "qa_f1" and samples[1].meta["all_classes"] == ["Location", "Number"]
    custom = loaders.load_longbench(_write(tmp_path, "x.jsonl", LONGBENCH_ROWS[:1]), query_template="\nQ: {input}\nA:")
    assert custom[0].turns[0].query == "\nQ: Which city is the capital?\nA:"


def test_infinitebench_round_trip(tmp_path):
    (passkey,) = loaders.load_infinitebench(_write(tmp_path, "passkey.jsonl", INFINITEBENCH_ROWS[:1]))
    assert passkey.turns[0].answers == ["71432"] and passkey.meta["metric"] == "first_int"
    (choice,) = loaders.load_infinitebench(_write(tmp_path, "longbook_choice_eng.jsonl", INFINITEBENCH_ROWS[1:]))
    assert choice.turns[0].answers == ["the second", "B"] and "D. the fourth" in choice.turns[0].query
    assert choice.context == "A book." and choice.id == "longbook_choice_eng-1"


@pytest.mark.parametrize(
    ("loader", "rows", "match"),
    [
        (loaders.load_scbench, ["{oops"], "line 1 is not valid JSON"),
        (loaders.load_scbench, [[1, 2]], "must be a JSON object"),
        (loaders.load_scbench, [{"context": "c"}], "missing field 'multi_turns'"),
        (loaders.load_scbench, [{"context": "c", "multi_turns": []}], "'multi_turns' is empty"),
        (
            loaders.load_scbench,
            [{"context": "c", "multi_turns": [{"input": "q"}]}],
            r"multi_turns\[0\] has no 'answer'",
        ),
        (
            loaders.load_scbench,
            [{"context": 3, "multi_turns": [{"input": "q", "answer": "a"}]}],
            "'context' must be str",
        ),
        (loaders.load_longbench, [LONGBENCH_ROWS[0], {**LONGBENCH_ROWS[0], "answers": "Paris"}], "line 2.*'answers'"),
        (loaders.load_longbench, [{"input": "q", "answers": ["a"]}], "missing field 'context'"),
        (loaders.load_longbench, [{**LONGBENCH_ROWS[0], "answers": []}], "non-empty list"),
        (loaders.load_infinitebench, [{"context": "c", "input": "q"}], "missing field 'answer'"),
        (loaders.load_infinitebench, [{"context": "c", "input": "q", "answer": [{"x": 1}]}], "'answer' must be"),
        (loaders.load_infinitebench, [{"context": "c", "input": "q", "answer": "a", "options": "A"}], "'options'"),
    ],
)
def test_malformed_files_are_rejected(tmp_path, loader, rows, match):
    with pytest.raises(ValueError, match=match):
        loader(_write(tmp_path, "bad.jsonl", rows))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        loaders.load_longbench(tmp_path / "none.jsonl")


def test_qa_f1():
    assert qa_f1("The cat sat.", ["a cat sat on the mat"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert qa_f1("Paris", ["London", "paris!"]) == 1.0 and qa_f1("", ["x"]) == 0.0
