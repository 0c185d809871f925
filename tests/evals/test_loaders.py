"""Loaders of SCBench, LongBench and InfiniteBench JSONL files: fixtures in the official schema, malformed files."""

from __future__ import annotations

import json

import pytest

from hf_longmem.evals import loaders
from hf_longmem.evals.metrics import metric_for, metric_options, qa_f1, score
from hf_longmem.evals.official_metrics import (
    INFINITEBENCH_MAX_NEW_TOKENS,
    INFINITEBENCH_METRICS,
    LONGBENCH_MAX_NEW_TOKENS,
    LONGBENCH_METRICS,
    SCBENCH_MAX_NEW_TOKENS,
    SCBENCH_METRICS,
    longbench_report,
)
from hf_longmem.evals.schema import Sample

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
            expected = raw["answer"] if isinstance(raw["answer"], list) else [raw["answer"]]
            assert turn.answers == expected + (["B"] if "options" in raw else [])  # choice turns: text and letter
    assert "B. Alice" in samples[1].turns[0].query and samples[0].meta["lang"] == "en"
    assert samples[0].meta["metric"] == "scbench_kv_retrieval" and samples[0].turns[0].max_new_tokens == 150
    assert score(" The value is v1.", samples[0].turns[0].answers, samples[0].meta["metric"]) == 1.0


def test_longbench_round_trip(tmp_path):
    samples = loaders.load_longbench(_write(tmp_path, "hotpotqa.jsonl", LONGBENCH_ROWS))
    assert [s.task for s in samples] == ["hotpotqa", "trec"] and samples[0].id == "hotpotqa-abc123"
    for sample, row in zip(samples, LONGBENCH_ROWS):
        assert sample.context == row["context"] and sample.turns[0].answers == row["answers"]
        assert row["input"] in sample.turns[0].query and sample.meta["original_length"] == row["length"]
    assert samples[0].meta["metric"] == "longbench_qa_f1" and samples[1].meta["all_classes"] == ["Location", "Number"]
    assert samples[1].meta["metric"] == "longbench_classification"
    assert samples[1].meta["metric_options"] == {"first_line": True, "all_classes": ["Location", "Number"]}
    custom = loaders.load_longbench(_write(tmp_path, "x.jsonl", LONGBENCH_ROWS[:1]), query_template="\nQ: {input}\nA:")
    assert custom[0].turns[0].query == "\nQ: Which city is the capital?\nA:"


def test_infinitebench_round_trip(tmp_path):
    (passkey,) = loaders.load_infinitebench(_write(tmp_path, "passkey.jsonl", INFINITEBENCH_ROWS[:1]))
    assert passkey.turns[0].answers == ["71432"] and passkey.meta["metric"] == "passkey"
    assert passkey.turns[0].max_new_tokens == 6
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
        loader(_write(tmp_path, "passkey.jsonl", rows))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        loaders.load_longbench(tmp_path / "none.jsonl")


def test_qa_f1():
    assert qa_f1("The cat sat.", ["a cat sat on the mat"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert qa_f1("Paris", ["London", "paris!"]) == 1.0 and qa_f1("", ["x"]) == 0.0


def _longbench_row(dataset: str, **extra) -> dict:
    answers = {
        "passage_retrieval_en": ["Paragraph 3"],
        "passage_retrieval_zh": ["段落3"],
        "passage_count": ["5"],
        "trec": ["Location"],
        "lsht": ["农业"],
    }.get(dataset, ["Paris"])
    classes = {"trec": ["Location", "Number"], "lsht": ["农业", "体育"]}.get(dataset)
    row = {"input": "q", "context": "c", "answers": answers, "length": 5000, "dataset": dataset}
    return {**row, "language": "en", "all_classes": classes, "_id": dataset, **extra}


@pytest.mark.parametrize("dataset", sorted(LONGBENCH_METRICS))
def test_longbench_official_metric_per_dataset(tmp_path, monkeypatch, dataset):
    """dataset2metric, the first-line cut of trec / triviaqa / samsum / lsht, all_classes and dataset2maxlen."""
    monkeypatch.setattr(loaders, "jieba_available", lambda: True)  # the zh datasets are checked, not scored, here
    (sample,) = loaders.load_longbench(_write(tmp_path, f"{dataset}_e.jsonl", [_longbench_row(dataset)]))
    assert sample.meta["metric"] == LONGBENCH_METRICS[dataset] and sample.task == dataset
    options = sample.meta.get("metric_options", {})
    assert options.get("first_line", False) == (dataset in {"trec", "triviaqa", "samsum", "lsht"})
    assert ("all_classes" in options) == (dataset in {"trec", "lsht"})
    assert (
        sample.turns[0].max_new_tokens == LONGBENCH_MAX_NEW_TOKENS[dataset] and sample.meta["length_bucket"] == "4-8k"
    )


def test_longbench_scored_as_the_runner_does(tmp_path):
    """trec: the first line of the prediction, classification against all_classes (metric_for + metric_options)."""
    (sample,) = loaders.load_longbench(_write(tmp_path, "trec.jsonl", [_longbench_row("trec")]))
    turn = sample.turns[0]
    name = metric_for(sample.task, sample.meta, turn)
    assert score("Location\nNumber", turn.answers, name, **metric_options(sample.meta, name)) == 1.0
    assert score("Location Number", turn.answers, name, **metric_options(sample.meta, name)) == 0.5


@pytest.mark.parametrize(
    ("row", "name", "match"),
    [
        (_longbench_row("trec", all_classes=None), "trec", "all_classes"),
        (_longbench_row("passage_retrieval_en", answers=["the third"]), "x", "must name a paragraph"),
        (_longbench_row("not_a_dataset"), "x", "no official scorer.*metric="),
        (_longbench_row("hotpotqa", length="long"), "x", "'length' must be int"),
    ],
)
def test_longbench_rows_the_official_scorer_cannot_score(tmp_path, row, name, match):
    with pytest.raises(ValueError, match=match):
        loaders.load_longbench(_write(tmp_path, f"{name}.jsonl", [row]))


def test_longbench_official_prompt_errors(tmp_path):
    path = _write(tmp_path, "x.jsonl", [_longbench_row("mine")])
    with pytest.raises(ValueError, match="no official prompt for 'mine'"):
        loaders.load_longbench(path, metric="exact_match", official_prompt=True)
    with pytest.raises(ValueError, match="not both"):
        loaders.load_longbench(path, official_prompt=True, query_template="{input}")


def test_loader_metric_override(tmp_path):
    (sample,) = loaders.load_longbench(_write(tmp_path, "x.jsonl", [_longbench_row("mine")]), metric="exact_match")
    assert sample.meta["metric"] == "exact_match" and "metric_options" not in sample.meta
    with pytest.raises(ValueError, match="unknown `metric` 'nope'"):
        loaders.load_infinitebench(_write(tmp_path, "passkey.jsonl", INFINITEBENCH_ROWS[:1]), metric="nope")


@pytest.mark.parametrize("task", sorted(INFINITEBENCH_METRICS))
def test_infinitebench_official_metric_per_task(tmp_path, task):
    row = {"id": 3, "context": "c", "input": "q", "answer": ["42"], "options": []}
    if task in ("code_debug", "longbook_choice_eng"):
        row.update(answer="func_b", options=["func_a", "func_b", "func_c", "func_d"])
    (sample,) = loaders.load_infinitebench(_write(tmp_path, f"{task}.jsonl", [row]))
    assert sample.meta["metric"] == INFINITEBENCH_METRICS[task]
    assert sample.turns[0].max_new_tokens == INFINITEBENCH_MAX_NEW_TOKENS.get(task, 32)
    if row["options"]:
        assert sample.turns[0].answers == ["func_b", "B"]
        assert score("B. func_b", sample.turns[0].answers, sample.meta["metric"]) == 1.0


def test_infinitebench_official_labels(tmp_path):
    row = {"id": 0, "context": "c", "input": "q", "answer": [[1, 3, 4]], "options": []}
    (calc,) = loaders.load_infinitebench(_write(tmp_path, "math_calc.jsonl", [row]))
    assert calc.turns[0].answers == ["1", "3", "4"] and score("1 3 5", calc.turns[0].answers, "math_calc") == 2 / 3
    (renamed,) = loaders.load_infinitebench(_write(tmp_path, "passkey.jsonl", INFINITEBENCH_ROWS[:1]), task="pk")
    assert renamed.task == "pk" and renamed.meta["metric"] == "passkey"  # the scorer of the file's stem
    with pytest.raises(ValueError, match="is none of the options"):
        bad = {**INFINITEBENCH_ROWS[1], "answer": ["missing"]}
        loaders.load_infinitebench(_write(tmp_path, "longbook_choice_eng.jsonl", [bad]))
    with pytest.raises(ValueError, match="no official scorer"):
        loaders.load_infinitebench(_write(tmp_path, "mystery.jsonl", INFINITEBENCH_ROWS[:1]))


@pytest.mark.parametrize("task", sorted(SCBENCH_METRICS))
def test_scbench_official_metric_per_task(tmp_path, task):
    (sample,) = loaders.load_scbench(_write(tmp_path, f"{task}.jsonl", SCBENCH_ROWS[:1]))
    assert sample.meta["metric"] == SCBENCH_METRICS[task]
    assert all(t.max_new_tokens >= SCBENCH_MAX_NEW_TOKENS[task] and t.metric is None for t in sample.turns)


def test_scbench_mixed_tasks_and_repoqa(tmp_path):
    row = {
        "id": 0,
        "context": "A long novel. The pass key is 123.",
        "multi_turns": [
            {"input": "Summarise.", "answer": "A novel.", "task": "scbench_summary"},
            {"input": "The pass key?", "answer": "123", "task": "scbench_passkey"},
        ],
    }
    (sample,) = loaders.load_scbench(_write(tmp_path, "scbench_summary_with_needles.jsonl", [row]))
    assert [t.metric for t in sample.turns] == ["rouge_lsum", "passkey"] and sample.meta["metric"] is None
    assert [t.max_new_tokens for t in sample.turns] == [200, 15]
    assert [metric_for(sample.task, sample.meta, t) for t in sample.turns] == ["rouge_lsum", "passkey"]
    assert Sample.from_dict(json.loads(json.dumps(sample.to_dict()))) == sample  # Turn.metric round-trips
    repoqa = {"id": 0, "context": "def f(): pass", "multi_turns": [{"input": "f?", "answer": "def f(): pass"}]}
    with pytest.raises(ValueError, match="scbench_repoqa.*metric="):
        loaders.load_scbench(_write(tmp_path, "scbench_repoqa.jsonl", [repoqa]))
    (explicit,) = loaders.load_scbench(_write(tmp_path, "scbench_repoqa.jsonl", [repoqa]), metric="exact_match")
    assert explicit.meta["metric"] == "exact_match"


def test_longbench_report(tmp_path):
    """eval.py's scorer (round(100 * mean, 2) per dataset) and scorer_e (length buckets, NaN when empty)."""
    rows = [_longbench_row("hotpotqa", _id=str(i), length=n) for i, n in enumerate((100, 5000, 6000))]
    rows.append(_longbench_row("trec", _id="t", length=9000))
    samples = loaders.load_longbench(_write(tmp_path, "mixed.jsonl", rows))
    records = [{"sample_id": s.id, "score": v, "cache": "full"} for s, v in zip(samples, (1.0, 0.5, 0.0, 1 / 3))]
    assert longbench_report(samples, records) == {"hotpotqa": 50.0, "trec": 33.33}
    buckets = longbench_report(samples, records, by_length=True)
    assert buckets["hotpotqa"] == {"0-4k": 100.0, "4-8k": 25.0, "8k+": pytest.approx(float("nan"), nan_ok=True)}
    assert buckets["trec"]["8k+"] == 33.33
    with pytest.raises(ValueError, match="several caches"):
        longbench_report(samples, records + [{**records[0], "cache": "snapkv"}])
    with pytest.raises(ValueError, match="no LongBench sample"):
        longbench_report(samples[:1], records)
