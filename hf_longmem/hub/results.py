"""Evaluation results of the harness as model-card data: validated rows, ``EvalResult`` entries and a Markdown table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult

from hf_longmem.evals.report import format_bytes
from hf_longmem.evals.schema import METRIC_ROW_KEYS, NUMERIC_ROW_KEYS, REQUIRED_ROW_KEYS, is_number

#: Harness row keys that become ``EvalResult`` metrics by default (skipped where the row holds ``null``).
DEFAULT_EVAL_METRICS: tuple[str, ...] = ("accuracy", "top1_agreement", "kl")

#: Numeric row keys checked as finite numbers or null (``context_length`` and ``accuracy`` have their own checks).
_OPTIONAL_NUMBER_KEYS = tuple(key for key in NUMERIC_ROW_KEYS if key not in REQUIRED_ROW_KEYS)


@dataclass
class HarnessResults:
    """Validated output of the evaluation harness.

    Attributes:
        rows: one dict per (model, task, cache, context length) measurement, in the harness's order; every row has
            the keys ``task`` (str), ``cache`` (str), ``cache_kwargs`` (dict, ``{}`` when absent), ``context_length``
            (int) and ``accuracy`` (float in [0, 1]); the optional numeric keys are numbers or ``None``.
        meta: the run's ``meta`` dict (``{}`` when absent): versions, device, dtype, seed, ...
    """

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


def _is_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _validate_row(row: Any, index: int) -> dict[str, Any]:
    where = f"eval_results row {index}"
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(row).__name__}.")
    for key in REQUIRED_ROW_KEYS:
        if key not in row:
            raise ValueError(f"{where} is missing the required key {key!r} (keys: {sorted(row)}).")
    out = dict(row)
    for key in ("task", "cache"):
        if not isinstance(out[key], str) or not out[key]:
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {out[key]!r}.")
    if "model" in out and out["model"] is not None and not isinstance(out["model"], str):
        raise ValueError(f"{where}: 'model' must be a string, got {out['model']!r}.")
    length = out["context_length"]
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"{where}: 'context_length' must be a non-negative int, got {length!r}.")
    accuracy = out["accuracy"]
    if not _is_number(accuracy) or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"{where}: 'accuracy' must be a number in [0, 1], got {accuracy!r}.")
    kwargs = out.get("cache_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"{where}: 'cache_kwargs' must be a dict with string keys, got {kwargs!r}.")
    out["cache_kwargs"] = dict(kwargs)
    for key in _OPTIONAL_NUMBER_KEYS:
        value = out.get(key)
        if value is not None and not _is_number(value):
            raise ValueError(f"{where}: {key!r} must be a finite number or null, got {value!r}.")
    return out


def _read_results_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"eval_results file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"eval_results file {str(path)!r} is not valid JSON: {err}") from err


def load_harness_results(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike,
    *,
    model: str | None = None,
) -> HarnessResults:
    """Read and validate the evaluation harness's output.

    Args:
        results: the harness JSON as a dict ``{"meta": {...}, "rows": [...]}``, a list of rows, or the path of a
            ``.json`` file holding either (or of a ``.jsonl`` file with one row per line).
        model: keep only the rows whose ``"model"`` equals this (the harness may evaluate several models in one run).

    Returns:
        :class:`HarnessResults` with validated copies of the rows (``cache_kwargs`` defaulted to ``{}``).

    Raises:
        ValueError: malformed input; the message names the offending row and key.
        FileNotFoundError: ``results`` is a path that does not exist.
    """
    if isinstance(results, (str, os.PathLike)):
        results = _read_results_file(Path(results))
    meta: Any = {}
    if isinstance(results, Mapping):
        if "rows" not in results:
            raise ValueError(f"eval_results is missing the key 'rows' (keys: {sorted(results)}).")
        meta = results.get("meta")
        meta = {} if meta is None else meta
        rows = results["rows"]
        if not isinstance(meta, Mapping):
            raise ValueError(f"eval_results 'meta' must be a dict, got {type(meta).__name__}.")
    else:
        rows = results
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise ValueError(f"eval_results rows must be a list of dicts, got {type(rows).__name__}.")
    validated = [_validate_row(row, i) for i, row in enumerate(rows)]
    if model is not None:
        validated = [row for row in validated if row.get("model") == model]
        if not validated:
            raise ValueError(f"eval_results has no row with model={model!r}.")
    return HarnessResults(rows=validated, meta=dict(meta))


def _format_kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _cache_label(row: Mapping[str, Any]) -> str:
    kwargs = row.get("cache_kwargs") or {}
    return f"{row['cache']} ({_format_kwargs(kwargs)})" if kwargs else str(row["cache"])


def eval_results_from_harness(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike | HarnessResults,
    *,
    metrics: Sequence[str] = DEFAULT_EVAL_METRICS,
    model: str | None = None,
    task_type: str = "text-generation",
) -> list[EvalResult]:
    """Turn harness rows into :class:`huggingface_hub.EvalResult` entries (the card's ``model-index``).

    One row gives one ``EvalResult`` per metric in ``metrics`` whose value is not ``null``:

    - task: ``task_type`` (default ``"text-generation"``), ``task_name`` = the row's ``task``;
    - dataset: ``dataset_type`` = ``task``, ``dataset_name`` = ``"<task> (<context_length> tokens)"``,
      ``dataset_config`` = ``"len<context_length>"``, ``dataset_args`` = ``{"context_length", "num_samples"}``;
      so the Hub groups the caches evaluated on one task and length into one result;
    - metric: ``metric_type`` = the row key (``"accuracy"``, ``"top1_agreement"``, ``"kl"``, ...),
      ``metric_name`` = ``"<metric> [<cache> (<kwargs>)]"``, ``metric_config`` = the cache name,
      ``metric_args`` = the ``cache_kwargs`` (``None`` when empty).

    Args:
        results: anything :func:`load_harness_results` accepts, or its result.
        metrics: numeric row keys to report.
        model: keep only the rows of this model.
        task_type: Hub task id of the results.

    Returns:
        list of ``EvalResult``, ``len <= len(rows) * len(metrics)``, in row order.

    Raises:
        ValueError: malformed results, or a metric that is not a numeric row key.
    """
    if isinstance(metrics, str) or not metrics:
        raise ValueError(f"metrics must be a non-empty sequence of row keys, got {metrics!r}.")
    for metric in metrics:
        if metric not in METRIC_ROW_KEYS:
            raise ValueError(
                f"metrics: {metric!r} is not a numeric harness row key (one of {sorted(METRIC_ROW_KEYS)})."
            )
    if not isinstance(results, HarnessResults):
        results = load_harness_results(results, model=model)
    elif model is not None:
        results = HarnessResults([r for r in results.rows if r.get("model") == model], results.meta)
    out: list[EvalResult] = []
    for row in results.rows:
        length = row["context_length"]
        dataset_args = {"context_length": length}
        if row.get("num_samples") is not None:
            dataset_args["num_samples"] = row["num_samples"]
        for metric in metrics:
            value = row.get(metric)
            if value is None:
                continue
            out.append(
                EvalResult(
                    task_type=task_type,
                    task_name=row["task"],
                    dataset_type=row["task"],
                    dataset_name=f"{row['task']} ({length} tokens)",
                    dataset_config=f"len{length}",
                    dataset_args=dataset_args,
                    metric_type=metric,
                    metric_name=f"{metric} [{_cache_label(row)}]",
                    metric_value=value,
                    metric_config=row["cache"],
                    metric_args=dict(row["cache_kwargs"]) or None,
                )
            )
    return out


def _human_bytes(n: float | None) -> str:
    """Card cells: the harness table's byte format, with an en dash for a missing value."""
    return "–" if n is None else format_bytes(n)


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def eval_table_markdown(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike | HarnessResults,
) -> str:
    """Render harness rows as a markdown table, in row order.

    Columns: Task, Cache (with its kwargs), Context length, Samples, Accuracy, KV bytes, Decode (tok/s); a Model
    column is added first when the rows hold several models, and Top-1 agreement / KL columns when any row has them.
    ``null`` values print as ``–``.

    Args:
        results: anything :func:`load_harness_results` accepts, or its result.

    Returns:
        the table (header, separator and one line per row, no trailing newline); ``""`` when there are no rows.
    """
    if not isinstance(results, HarnessResults):
        results = load_harness_results(results)
    rows = results.rows
    if not rows:
        return ""
    models = {row.get("model") for row in rows}
    columns: list[tuple[str, Any]] = []
    if len(models) > 1:
        columns.append(("Model", lambda r: r.get("model") or "–"))
    columns += [
        ("Task", lambda r: r["task"]),
        ("Cache", _cache_label),
        ("Context length", lambda r: f"{r['context_length']:,}"),
        ("Samples", lambda r: "–" if r.get("num_samples") is None else r["num_samples"]),
        ("Accuracy", lambda r: f"{r['accuracy']:.3f}"),
        ("KV bytes", lambda r: _human_bytes(r.get("kv_bytes"))),
        (
            "Decode (tok/s)",
            lambda r: "–" if r.get("decode_tokens_per_s") is None else f"{r['decode_tokens_per_s']:,.1f}",
        ),
    ]
    if any(row.get("top1_agreement") is not None for row in rows):
        columns.append(
            ("Top-1 agreement", lambda r: "–" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.3f}")
        )
    if any(row.get("kl") is not None for row in rows):
        columns.append(("KL", lambda r: "–" if r.get("kl") is None else f"{r['kl']:.4g}"))
    right_aligned = {"Context length", "Samples", "Accuracy", "KV bytes", "Decode (tok/s)", "Top-1 agreement", "KL"}
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "|".join("---:" if name in right_aligned else "---" for name, _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(fmt(row)) for _, fmt in columns) + " |")
    return "\n".join(lines)
