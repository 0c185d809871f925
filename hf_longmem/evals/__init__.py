"""Evaluation harness: synthetic long-context tasks, metrics, fidelity vs the full cache, profiling, runner, reports.

>>> from hf_longmem import load_default_model
>>> from hf_longmem.evals import generate_task, evaluate, run_benchmark, format_table
>>> model, tok = load_default_model()
>>> rows = run_benchmark(model, tok, ["passkey"], [512, 1024],
...                      {"full": ("full", {}), "streaming": ("streaming", {"budget": 128})}, num_samples=4)
>>> print(format_table(rows))

The task generators (:mod:`hf_longmem.evals.tasks`) are imported on first use.
"""

from __future__ import annotations

from typing import Any

from .fidelity import (
    FidelityResult,
    Reference,
    compare_to_reference,
    kl_divergence,
    prompt_fidelity,
    reference_continuation,
)
from .metrics import METRICS, TASK_METRICS, exact_match, first_int_match, metric_for, score, string_match_all
from .profiling import GenerationOutput, PeakMemory, greedy_generate, prefill, profile_generation
from .report import collect_meta, format_bytes, format_table, load_results, plot, save_results
from .runner import MODES, ROW_KEYS, aggregate_records, answer_turns, evaluate, run_benchmark
from .schema import ROW_FIELDS, RowField, Sample, Turn

_LAZY = {"TASKS": "tasks", "generate_task": "tasks", "shared_context": "tasks"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METRICS",
    "MODES",
    "ROW_FIELDS",
    "ROW_KEYS",
    "TASKS",
    "TASK_METRICS",
    "FidelityResult",
    "GenerationOutput",
    "PeakMemory",
    "Reference",
    "RowField",
    "Sample",
    "Turn",
    "aggregate_records",
    "answer_turns",
    "collect_meta",
    "compare_to_reference",
    "evaluate",
    "exact_match",
    "first_int_match",
    "format_bytes",
    "format_table",
    "generate_task",
    "greedy_generate",
    "kl_divergence",
    "load_results",
    "metric_for",
    "plot",
    "prefill",
    "profile_generation",
    "prompt_fidelity",
    "reference_continuation",
    "run_benchmark",
    "save_results",
    "score",
    "shared_context",
    "string_match_all",
]
