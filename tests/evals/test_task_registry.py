"""Invariants every registered task generator keeps, with the embedded word-level tokenizer and a BPE one."""

from __future__ import annotations

import pytest

from hf_longmem.evals import tasks
from hf_longmem.evals.haystack import count_tokens
from hf_longmem.evals.metrics import METRICS, metric_for, score
from hf_longmem.evals.schema import Sample
from hf_longmem.evals.vocab import build_tokenizer
from tests.evals.task_fixtures import bpe_tokenizer, write_qa_files

#: Lengths each task is checked at (the common-words list needs a long enough prompt for its few-shot example).
LENGTHS = {"common_words": {"word": 700, "bpe": 1500}, "path_traversal": {"word": 1500, "bpe": 3000}}


def perfect_answer(sample, turn) -> str:
    """What a model that solves the turn writes after the query, in the task's output format."""
    metric = metric_for(sample.task, sample.meta, turn)
    if metric == "answer_by_index":
        rest = "".join(f" Answer_{i + 2}: The answer is {a}." for i, a in enumerate(turn.answers[1:]))
        return f" The answer is {turn.answers[0]}.{rest}"
    if metric.startswith("route_"):
        return "\n" + turn.answers[0] + "\n</Route>"
    if metric == "alr2_answer":
        return " " + "\n".join(sample.meta["supporting_facts"]) + "\nAnswer: " + turn.answers[0]
    return " " + ", ".join(turn.answers)


@pytest.fixture(scope="module")
def toks():
    return {"word": build_tokenizer(extended=True), "bpe": bpe_tokenizer()}  # extended: fact_qa needs it


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    return write_qa_files(tmp_path_factory.mktemp("qa"))


def _options(name, qa_files):
    return {"path": qa_files[name.removeprefix("qa_")]} if name.startswith("qa_") else {}


@pytest.mark.parametrize("tok_name", ["word", "bpe"])
@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_task_is_seeded_fitted_and_scorable(name, tok_name, toks, qa_files):
    tok, options = toks[tok_name], _options(name, qa_files)
    length = LENGTHS.get(name, {}).get(tok_name, 600)
    a = tasks.generate_task(name, tok, length, 3, seed=5, **options)
    b = tasks.generate_task(name, tok, length, 3, seed=5, **options)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    shorter = tasks.generate_task(name, tok, length, 2, seed=5, **options)
    assert [s.to_dict() for s in shorter] == [s.to_dict() for s in a[:2]]
    other = tasks.generate_task(name, tok, length, 3, seed=6, **options)
    assert [s.to_dict() for s in other] != [s.to_dict() for s in a]
    assert len({s.id for s in a}) == 3 and all(s.task == name for s in a)
    assert [Sample.from_dict(s.to_dict()) for s in a] == a
    metric = metric_for(name)
    assert metric in METRICS
    for s in a:
        num_tokens = count_tokens(tok, s.context + s.turns[0].query)
        assert s.meta["num_tokens"] == num_tokens and s.meta["length"] == length
        assert 0.9 * length <= num_tokens <= length
        for turn in s.turns:
            assert turn.answers and all(answer.strip() for answer in turn.answers)
            assert turn.query.startswith("\n") and not turn.query.endswith(" ")
            perfect = perfect_answer(s, turn)
            assert score(perfect, turn.answers, metric_for(name, s.meta, turn)) == 1.0
            assert score(" none", turn.answers, metric_for(name, s.meta, turn)) == 0.0
            assert len(tok(perfect, add_special_tokens=False)["input_ids"]) <= turn.max_new_tokens


def test_registering_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task("passkey")(lambda tokenizer, length, num_samples, seed=0: [])
    with pytest.raises(ValueError, match="unknown metric"):
        tasks.register_task("new_task", metric="f1")


def test_a_task_family_module_imported_first_registers_every_family():
    """Importing a family module before anything else must not hit a half-imported sibling (``longgenbench`` first
    used to fail: ``tasks`` imported ``alr2``, which needs a name ``longgenbench`` had not defined yet)."""
    import subprocess
    import sys

    code = "import hf_longmem.evals.longgenbench; from hf_longmem.evals.tasks import TASKS; print(len(TASKS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == len(tasks.TASKS)
