"""Loaders for local files of long-context benchmarks in their official formats (nothing is downloaded).

- :func:`load_scbench`: SCBench (Li et al., 2024, "SCBench: A KV cache-centric analysis of long-context methods";
  microsoft/MInference ``scbench/``), one JSONL row per shared context:
  ``{"id", "context", "multi_turns": [{"input", "answer", "options"?}, ...], "lang"?, "repo"?}``. Each row becomes
  one multi-turn :class:`~hf_longmem.evals.schema.Sample` (answered in rollback or append mode).
- :func:`load_longbench`: LongBench (Bai et al., 2023; THUDM/LongBench), JSONL rows
  ``{"input", "context", "answers": [...], "length", "dataset", "language", "all_classes", "_id"}``.
- :func:`load_infinitebench`: InfiniteBench (Zhang et al., 2024; OpenBMB/InfiniteBench), JSONL rows
  ``{"id", "context", "input", "answer": str | [str, ...], "options": [...]}``.

Every loader checks each row and raises a ``ValueError`` naming the file, the line and the field for a malformed row.
The samples' ``meta["length"]`` is ``None`` (they are not length-fitted) and ``meta["metric"]`` names the scoring.

Deviations, and why: prompts are a plain ``context`` + ``"\\n\\n"`` + question layout (the benchmarks' per-task chat
templates are model-specific; pass ``query_template`` to use one); metrics are the closest of
:data:`hf_longmem.evals.metrics.METRICS`: ``qa_f1`` (LongBench's token F1) for LongBench QA datasets and InfiniteBench
``longbook_qa_eng``, ``first_int`` for numeric retrieval (passkey, number_string, math_find), substring match
(``string_match_part``) elsewhere — LongBench's ROUGE, code-similarity and classification scores and SCBench's
per-task scorers are not reimplemented.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .schema import Sample, Turn

__all__ = ["load_infinitebench", "load_longbench", "load_scbench", "read_jsonl"]

LONGBENCH_QA = frozenset(
    {"narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "triviaqa"}
)
NUMERIC = frozenset({"passkey", "number_string", "math_find", "scbench_mf", "mf"})
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


def load_scbench(
    path: str | os.PathLike, *, task: str | None = None, query_template: str = DEFAULT_QUERY, max_new_tokens: int = 64
) -> list[Sample]:
    """SCBench shared-context samples from a local JSONL file (e.g. ``scbench_kv.jsonl``).

    Args:
        path: the JSONL file.
        task: the samples' task name (default: the file's stem, e.g. ``"scbench_kv"``).
        query_template: the text of a turn, with ``{input}`` (and ``{options}`` for choice turns).
        max_new_tokens: the least generation budget of a turn (raised for long answers).

    Returns:
        One sample per row, one turn per ``multi_turns`` entry (``meta["metric"]``: ``first_int`` for math-find,
        ``string_match_part`` otherwise).
    """
    path = Path(path)
    task = task or path.stem
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
            turns.append(Turn(_query(query_template, text, options), answers, _max_new_tokens(answers, max_new_tokens)))
        sample_id = str(row.get("id", line))
        metric = "first_int" if any(key in task for key in ("_mf", "math_find")) else "string_match_part"
        meta = {"length": None, "source": os.fspath(path), "line": line, "metric": metric}
        meta.update({k: row[k] for k in ("lang", "repo") if k in row})
        samples.append(Sample(f"{task}-{sample_id}", task, context, turns, meta))
    return samples


def load_longbench(
    path: str | os.PathLike, *, task: str | None = None, query_template: str = DEFAULT_QUERY, max_new_tokens: int = 32
) -> list[Sample]:
    """LongBench samples from a local JSONL file (e.g. ``hotpotqa.jsonl`` or ``hotpotqa_e.jsonl``).

    Args:
        path: the JSONL file.
        task: the samples' task name (default: the rows' ``dataset`` field, else the file's stem).
        query_template: the question text, with ``{input}``.
        max_new_tokens: the least generation budget (LongBench's ``dataset2maxlen`` is per dataset).

    Returns:
        One single-turn sample per row (``meta["metric"]``: ``qa_f1`` for the QA datasets, ``string_match_part``
        otherwise); ``meta["all_classes"]`` is kept for classification datasets.
    """
    path = Path(path)
    samples = []
    for line, row in read_jsonl(path):
        context = _field(row, "context", str, path, line)
        text = _field(row, "input", str, path, line)
        answers = _answers(_field(row, "answers", list, path, line), path, line, "answers")
        dataset = _field(row, "dataset", str, path, line, required=False) or path.stem.removesuffix("_e")
        name = task or dataset
        _field(row, "all_classes", list, path, line, required=False)
        meta = {
            "length": None,
            "source": os.fspath(path),
            "line": line,
            "dataset": dataset,
            "language": row.get("language"),
            "all_classes": row.get("all_classes"),
            "original_length": row.get("length"),
            "metric": "qa_f1" if dataset in LONGBENCH_QA else "string_match_part",
        }
        turn = Turn(query_template.format(input=text), answers, _max_new_tokens(answers, max_new_tokens))
        samples.append(Sample(f"{name}-{row.get('_id', line)}", name, context, [turn], meta))
    return samples


def load_infinitebench(
    path: str | os.PathLike, *, task: str | None = None, query_template: str = DEFAULT_QUERY, max_new_tokens: int = 32
) -> list[Sample]:
    """InfiniteBench samples from a local JSONL file (e.g. ``passkey.jsonl``, ``longbook_choice_eng.jsonl``).

    Args:
        path: the JSONL file.
        task: the samples' task name (default: the file's stem).
        query_template: the question text, with ``{input}`` (and ``{options}``, lettered A., B., ... for rows with
            options; the default lists them after the question).
        max_new_tokens: the least generation budget.

    Returns:
        One single-turn sample per row. Choice rows (non-empty ``options``) accept the option text and its letter;
        ``meta["metric"]`` is ``first_int`` for passkey / number_string / math_find, ``qa_f1`` for longbook_qa_eng,
        ``string_match_part`` otherwise.
    """
    path = Path(path)
    task = task or path.stem
    samples = []
    for line, row in read_jsonl(path):
        context = _field(row, "context", str, path, line)
        text = _field(row, "input", str, path, line)
        if "answer" not in row:
            raise ValueError(f"{os.fspath(path)!r} line {line}: missing field 'answer'")
        answers = _answers(row["answer"], path, line, "answer")
        options = _field(row, "options", list, path, line, required=False)
        if options:
            letters = [chr(ord("A") + options.index(a)) for a in answers if a in options]
            answers = answers + letters
        metric = "first_int" if task in NUMERIC else "qa_f1" if task == "longbook_qa_eng" else "string_match_part"
        meta = {"length": None, "source": os.fspath(path), "line": line, "metric": metric}
        turn = Turn(_query(query_template, text, options), answers, _max_new_tokens(answers, max_new_tokens))
        samples.append(Sample(f"{task}-{row.get('id', line)}", task, context, [turn], meta))
    return samples
