"""Evaluation harness: synthetic long-context tasks, metrics, fidelity vs the full cache, profiling, runner, reports.

>>> from hf_longmem import load_default_model
>>> from hf_longmem.evals import generate_task, evaluate, run_benchmark, format_table
>>> model, tok = load_default_model()
>>> rows = run_benchmark(model, tok, ["passkey"], [512, 1024],
...                      {"full": ("full", {}), "streaming": ("streaming", {"budget": 128})}, num_samples=4)
>>> print(format_table(rows))

Task generators are registered in :data:`hf_longmem.evals.tasks.TASKS` (see ``docs/evals.md``).
"""

from __future__ import annotations

from .choices import ChoiceScores, choice_kl, score_choices
from .fidelity import (
    FidelityResult,
    Reference,
    compare_to_reference,
    kl_divergence,
    prompt_fidelity,
    reference_continuation,
)
from .loaders import load_infinitebench, load_longbench, load_scbench
from .metrics import METRICS, TASK_METRICS, exact_match, first_int_match, metric_for, score, string_match_all
from .profiling import GenerationOutput, PeakMemory, greedy_generate, prefill, profile_generation
from .report import collect_meta, format_bytes, format_table, load_results, plot, save_results
from .runner import MODES, ROW_KEYS, aggregate_records, answer_turns, evaluate, run_benchmark
from .schema import ROW_FIELDS, RowField, Sample, Turn

# Eager, and after the modules above: importing any task-family module (``hf_longmem.evals.ruler``, ...) first runs
# this package, so ``tasks`` always imports the families (its last statement) in their declared order, never from
# inside a half-imported family module.
from .tasks import TASKS, generate_task, shared_context  # noqa: E402

__all__ = [
    "METRICS",
    "MODES",
    "ROW_FIELDS",
    "ROW_KEYS",
    "TASKS",
    "TASK_METRICS",
    "ChoiceScores",
    "FidelityResult",
    "GenerationOutput",
    "PeakMemory",
    "Reference",
    "RowField",
    "Sample",
    "Turn",
    "aggregate_records",
    "answer_turns",
    "choice_kl",
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
    "load_infinitebench",
    "load_longbench",
    "load_results",
    "load_scbench",
    "metric_for",
    "plot",
    "prefill",
    "profile_generation",
    "prompt_fidelity",
    "reference_continuation",
    "run_benchmark",
    "save_results",
    "score",
    "score_choices",
    "shared_context",
    "string_match_all",
]
