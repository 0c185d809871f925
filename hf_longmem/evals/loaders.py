"""Loaders for local files of long-context benchmarks in their official formats (nothing is downloaded).

- :func:`load_scbench`: SCBench (Li et al., 2024, "SCBench: A KV cache-centric analysis of long-context methods";
  microsoft/MInference ``scbench/``), one JSONL row per shared context:
  ``{"id", "context", "multi_turns": [{"input", "answer", "options"?, "task"?}, ...], "lang"?, "repo"?}``. Each row
  becomes one multi-turn :class:`~hf_longmem.evals.schema.Sample` (answered in rollback or append mode).
- :func:`load_longbench`: LongBench (Bai et al., 2023; THUDM/LongBench), JSONL rows
  ``{"input", "context", "answers": [...], "length", "dataset", "language", "all_classes", "_id"}``.
- :func:`load_infinitebench`: InfiniteBench (Zhang et al., 2024; OpenBMB/InfiniteBench), JSONL rows
  ``{"id", "context", "input", "answer": str | [str, ...], "options": [...]}``.

Every loader checks each row and raises a ``ValueError`` naming the file, the line and the field for a malformed row.
The samples' ``meta["length"]`` is ``None`` (they are not length-fitted).

Scoring is the benchmarks' own (:mod:`hf_longmem.evals.official_metrics`): ``meta["metric"]`` comes from LongBench's
``dataset2metric``, InfiniteBench's and SCBench's ``get_score_one`` tables, with ``meta["metric_options"]`` for
LongBench's per-dataset post-processing (first line of the prediction for trec / triviaqa / samsum / lsht) and
``all_classes``; the turns of SCBench's mixed-task files (``summary_with_needles``) carry their own ``Turn.metric``.
The default generation budgets are the official per-dataset ones (``dataset2maxlen``, ``DATA_NAME_TO_MAX_NEW_TOKENS``).
A dataset outside those tables, or SCBench repoqa (its tree-sitter + BLEU scorer is not reimplemented), needs an
explicit ``metric=``. LongBench's Chinese datasets need jieba (``pip install 'hf-longmem[zh]'``): loading them without
it raises a ``ValueError`` before any work.

Deviations, and why: prompts are a plain ``context`` + ``"\\n\\n"`` + question layout by default (pass
``query_template``, or ``official_prompt=True`` for LongBench's ``dataset2prompt``; InfiniteBench's and SCBench's
templates are per model and not built in); no chat template and no middle truncation (model-specific, left to the
caller); the scorers' own deviations are listed in :mod:`hf_longmem.evals.official_metrics`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .metrics import METRICS
from .official_metrics import (
    INFINITEBENCH_MAX_NEW_TOKENS,
    INFINITEBENCH_METRICS,
    JIEBA_METRICS,
    LONGBENCH_FIRST_LINE,
    LONGBENCH_MAX_NEW_TOKENS,
    LONGBENCH_METRICS,
    SCBENCH_MAX_NEW_TOKENS,
    SCBENCH_METRICS,
    longbench_length_bucket,
)
from .official_prompts import LONGBENCH_PROMPTS
from .schema import Sample, Turn
from .text_overlap import JIEBA_MISSING, jieba_available

__all__ = ["load_infinitebench", "load_longbench", "load_scbench", "read_jsonl"]

DEFAULT_QUERY = "\n\n{input}\nAnswer:"
CHOICE_QUERY = "\n\n{input}\n{options}\nAnswer:"


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of every non-empty line of a JSONL file; ``ValueError`` for a missing file, a line that
    is not JSON or a row that is not an object."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"file not found: {os.fspath(path)!r}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{os.fspath(path)!r} line {number} is not valid JSON: {error}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{os.fspath(path)!r} line {number} must be a JSON object, got {type(row).__name__}")
            yield number, row


def _field(row: dict, key: str, kinds: type | tuple[type, ...], path: Path, line: int, *, required: bool = True):
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"{os.fspath(path)!r} line {line}: missing field {key!r}")
        return None
    if not isinstance(row[key], kinds) or isinstance(row[key], bool):
        names = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        raise ValueError(
            f"{os.fspath(path)!r} line {line}: field {key!r} must be {names}, got {type(row[key]).__name__}"
        )
    return row[key]


def _answers(value: Any, path: Path, line: int, key: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(
            f"{os.fspath(path)!r} line {line}: {key!r} must be a string, a number or a non-empty list of them"
        )
    return [str(v) for v in values]


def _options_text(options: list[Any]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))


def _query(template: str, text: str, options: list[Any] | None) -> str:
    if options:
        return (
            CHOICE_QUERY.format(input=text, options=_options_text(options))
            if template == DEFAULT_QUERY
            else (template.format(input=text, options=_options_text(options)))
        )
    return template.format(input=text, options="")


def _max_new_tokens(answers: list[str], minimum: int) -> int:
    return max(minimum, 2 * max(len(a.split()) for a in answers) + 8)


def _budget(requested: int | None, official: int | None, answers: list[str]) -> int:
    """The official budget unless one is requested (then raised for long answers, as before the official tables)."""
    if requested is None:
        return official if official is not None else _max_new_tokens(answers, 32)
    return _max_new_tokens(answers, requested)


def _checked_metric(metric: str | None) -> str | None:
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown `metric` {metric!r}; available: {', '.join(sorted(METRICS))}")
    return metric


def _unknown(benchmark: str, name: str, table: dict[str, str], path: Path) -> ValueError:
    return ValueError(
        f"{os.fspath(path)!r}: {benchmark} dataset {name!r} has no official scorer here (known: "
        f"{', '.join(sorted(table))}); pass `task=` with a known dataset name or `metric=` to score it explicitly"
    )


def _require_jieba(metric: str, path: Path) -> None:
    if metric in JIEBA_METRICS and not jieba_available():
        raise ValueError(f"{os.fspath(path)!r}: {JIEBA_MISSING}")


def _choice_answers(answers: list[str], options: list[Any], path: Path, line: int, key: str) -> list[str]:
    """The answers plus the letter of each answer that is an option (the official ``[answer, letter]`` label)."""
    texts = [str(option) for option in options]
    letters = [chr(ord("A") + texts.index(a)) for a in answers if a in texts]
    if not letters:
        raise ValueError(f"{os.fspath(path)!r} line {line}: {key!r} is none of the options {texts!r}")
    return answers + [letter for letter in letters if letter not in answers]


def load_scbench(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    query_template: str = DEFAULT_QUERY,
    max_new_tokens: int | None = None,
    metric: str | None = None,
) -> list[Sample]:
    """SCBench shared-context samples from a local JSONL file (e.g. ``scbench_kv.jsonl``).

    Args:
        path: the JSONL file.
        task: the samples' task name (default: the file's stem, e.g. ``"scbench_kv"``); it picks the scorer.
        query_template: the text of a turn, with ``{input}`` (and ``{options}`` for choice turns).
        max_new_tokens: the least generation budget of a turn, raised for long answers (default: SCBench's
            ``DATA_NAME_TO_MAX_NEW_TOKENS`` of the task, or of the turn's ``task`` in mixed-task files).
        metric: score every turn with this metric of :data:`~hf_longmem.evals.metrics.METRICS` instead of SCBench's.

    Returns:
        One sample per row, one turn per ``multi_turns`` entry. ``meta["metric"]`` is SCBench's scorer of the task
        (:data:`~hf_longmem.evals.official_metrics.SCBENCH_METRICS`); turns of mixed-task files
        (``scbench_summary_with_needles``) carry the scorer of their own ``task`` in ``Turn.metric``. Choice turns
        accept the option text and its letter.
    """
    path = Path(path)
    task = task or path.stem
    metric = _checked_metric(metric)
    file_metric = metric or SCBENCH_METRICS.get(task)
    samples = []
    for line, row in read_jsonl(path):
        context = _field(row, "context", str, path, line)
        turns_raw = _field(row, "multi_turns", list, path, line)
        if not turns_raw:
            raise ValueError(f"{os.fspath(path)!r} line {line}: 'multi_turns' is empty")
        turns = []
        for i, turn in enumerate(turns_raw):
            if not isinstance(turn, dict):
                raise ValueError(f"{os.fspath(path)!r} line {line}: multi_turns[{i}] must be an object")
            text = _field(turn, "input", str, path, line)
            if "answer" not in turn:
                raise ValueError(f"{os.fspath(path)!r} line {line}: multi_turns[{i}] has no 'answer'")
            answers = _answers(turn["answer"], path, line, f"multi_turns[{i}].answer")
            options = _field(turn, "options", list, path, line, required=False)
            turn_task = _field(turn, "task", str, path, line, required=False)
            turn_metric = None
            if file_metric is None:
                if turn_task not in SCBENCH_METRICS:
                    raise _unknown("SCBench", turn_task or task, SCBENCH_METRICS, path)
                turn_metric = SCBENCH_METRICS[turn_task]
            if options:
                answers = _choice_answers(answers, options, path, line, f"multi_turns[{i}].answer")
            official = SCBENCH_MAX_NEW_TOKENS.get(turn_task or task)
            budget = _budget(max_new_tokens, official, answers)
            turns.append(Turn(_query(query_template, text, options), answers, budget, turn_metric))
        sample_id = str(row.get("id", line))
        meta = {"length": None, "source": os.fspath(path), "line": line, "metric": file_metric}
        meta.update({k: row[k] for k in ("lang", "repo") if k in row})
        samples.append(Sample(f"{task}-{sample_id}", task, context, turns, meta))
    return samples


def load_longbench(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    query_template: str = DEFAULT_QUERY,
    max_new_tokens: int | None = None,
    metric: str | None = None,
    official_prompt: bool = False,
) -> list[Sample]:
    """LongBench samples from a local JSONL file (e.g. ``hotpotqa.jsonl`` or ``hotpotqa_e.jsonl``).

    Args:
        path: the JSONL file.
        task: the samples' task name (default: the rows' ``dataset`` field, else the file's stem).
        query_template: the question text, with ``{input}``.
        max_new_tokens: the least generation budget, raised for long answers (default: LongBench's
            ``dataset2maxlen`` of the dataset).
        metric: score every row with this metric of :data:`~hf_longmem.evals.metrics.METRICS` instead of LongBench's.
        official_prompt: use LongBench's ``dataset2prompt`` template of the dataset
            (:data:`~hf_longmem.evals.official_prompts.LONGBENCH_PROMPTS`): the sample's context is the template up
            to and including the row's context, the query the rest with the question (not with ``query_template``).

    Returns:
        One single-turn sample per row. ``meta["metric"]`` is LongBench's ``dataset2metric`` of the row's dataset
        (:data:`~hf_longmem.evals.official_metrics.LONGBENCH_METRICS`), ``meta["metric_options"]`` its
        post-processing (``first_line``) and ``all_classes``; ``meta["length_bucket"]`` is LongBench-E's bucket of
        the row's ``length``.
    """
    path = Path(path)
    metric = _checked_metric(metric)
    if official_prompt and query_template != DEFAULT_QUERY:
        raise ValueError("pass either `official_prompt=True` or a `query_template`, not both")
    samples = []
    for line, row in read_jsonl(path):
        context = _field(row, "context", str, path, line)
        text = _field(row, "input", str, path, line)
        answers = _answers(_field(row, "answers", list, path, line), path, line, "answers")
        dataset = _field(row, "dataset", str, path, line, required=False) or path.stem.removesuffix("_e")
        if official_prompt and dataset not in LONGBENCH_PROMPTS:
            raise ValueError(f"{os.fspath(path)!r} line {line}: LongBench has no official prompt for {dataset!r}")
        name = task or dataset
        all_classes = _field(row, "all_classes", list, path, line, required=False)
        length = _field(row, "length", int, path, line, required=False)
        options: dict[str, Any] = {}
        row_metric = metric
        if row_metric is None:
            if dataset not in LONGBENCH_METRICS:
                raise _unknown("LongBench", dataset, LONGBENCH_METRICS, path)
            row_metric = LONGBENCH_METRICS[dataset]
            _require_jieba(row_metric, path)
            if dataset in LONGBENCH_FIRST_LINE:
                options["first_line"] = True
            if row_metric == "longbench_classification":
                if not all_classes or not all(isinstance(c, str) for c in all_classes):
                    raise ValueError(
                        f"{os.fspath(path)!r} line {line}: {dataset} is scored against 'all_classes', "
                        "which must be a non-empty list of strings"
                    )
                options["all_classes"] = list(all_classes)
            pattern = {"longbench_retrieval": r"Paragraph (\d+)", "longbench_retrieval_zh": r"段落(\d+)"}.get(
                row_metric
            )
            if pattern and not all(re.search(pattern, a) for a in answers):
                raise ValueError(
                    f"{os.fspath(path)!r} line {line}: {dataset} answers must name a paragraph ({pattern})"
                )
        meta = {
            "length": None,
            "source": os.fspath(path),
            "line": line,
            "dataset": dataset,
            "language": row.get("language"),
            "all_classes": all_classes,
            "original_length": length,
            "length_bucket": None if length is None else longbench_length_bucket(length),
            "metric": row_metric,
        }
        if options:
            meta["metric_options"] = options
        budget = _budget(max_new_tokens, LONGBENCH_MAX_NEW_TOKENS.get(dataset), answers)
        if official_prompt:
            before, after = LONGBENCH_PROMPTS[dataset].split("{context}", 1)
            context, query = before.format(input=text) + context, after.format(input=text)
        else:
            query = query_template.format(input=text)
        turn = Turn(query, answers, budget)
        samples.append(Sample(f"{name}-{row.get('_id', line)}", name, context, [turn], meta))
    return samples


def load_infinitebench(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    query_template: str = DEFAULT_QUERY,
    max_new_tokens: int | None = None,
    metric: str | None = None,
) -> list[Sample]:
    """InfiniteBench samples from a local JSONL file (e.g. ``passkey.jsonl``, ``longbook_choice_eng.jsonl``).

    Args:
        path: the JSONL file.
        task: the samples' task name (default: the file's stem); the scorer is the one of ``task``, else of the stem.
        query_template: the question text, with ``{input}`` (and ``{options}``, lettered A., B., ... for rows with
            options; the default lists them after the question).
        max_new_tokens: the least generation budget, raised for long answers (default: InfiniteBench's
            ``DATA_NAME_TO_MAX_NEW_TOKENS`` of the task).
        metric: score every row with this metric of :data:`~hf_longmem.evals.metrics.METRICS` instead of
            InfiniteBench's.

    Returns:
        One single-turn sample per row. Choice rows (non-empty ``options``) accept the option text and its letter
        (the official ``[answer, letter]`` label); math_calc's answer is its number sequence, one answer per number;
        ``meta["metric"]`` is InfiniteBench's scorer of the task
        (:data:`~hf_longmem.evals.official_metrics.INFINITEBENCH_METRICS`).
    """
    path = Path(path)
    task = task or path.stem
    key = task if task in INFINITEBENCH_METRICS else path.stem
    metric = _checked_metric(metric)
    if metric is None:
        if key not in INFINITEBENCH_METRICS:
            raise _unknown("InfiniteBench", task, INFINITEBENCH_METRICS, path)
        metric = INFINITEBENCH_METRICS[key]
    samples = []
    for line, row in read_jsonl(path):
        context = _field(row, "context", str, path, line)
        text = _field(row, "input", str, path, line)
        if "answer" not in row:
            raise ValueError(f"{os.fspath(path)!r} line {line}: missing field 'answer'")
        answer = row["answer"]
        if key == "math_calc" and isinstance(answer, list) and answer and isinstance(answer[0], list):
            answer = answer[0]  # the official scorer takes label[0] of a nested label
        answers = _answers(answer, path, line, "answer")
        options = _field(row, "options", list, path, line, required=False)
        if options:
            answers = _choice_answers(answers, options, path, line, "answer")
        meta = {"length": None, "source": os.fspath(path), "line": line, "metric": metric}
        budget = _budget(max_new_tokens, INFINITEBENCH_MAX_NEW_TOKENS.get(key), answers)
        turn = Turn(_query(query_template, text, options), answers, budget)
        samples.append(Sample(f"{task}-{row.get('id', line)}", task, context, [turn], meta))
    return samples
