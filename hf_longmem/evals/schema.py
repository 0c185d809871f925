"""Data model of the evaluation harness: a sample is one long context followed by one or more question turns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Turn:
    """One question asked after the context (or after the previous turn).

    Attributes:
        query: text appended after the context (or the previous turn), ending where the answer starts.
        answers: accepted answers; the first is the canonical one.
        max_new_tokens: generation budget for the answer.
        metric: the metric of this turn when it differs from the sample's (turns of mixed-task SCBench files);
            ``None``: the sample's (see :func:`hf_longmem.evals.metrics.metric_for`).
    """

    query: str
    answers: list[str]
    max_new_tokens: int = 16
    metric: str | None = None


@dataclass
class Sample:
    """One evaluation sample.

    Attributes:
        id: unique id (stable for a given seed).
        task: generator name, e.g. ``"passkey"``.
        context: the long text prefilled once.
        turns: the questions; a single-question task has one turn.
        meta: generator facts (target length in tokens, needle depth, seed, ...).
    """

    id: str
    task: str
    context: str
    turns: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Sample:
        turns = [Turn(**t) for t in row["turns"]]
        return cls(id=row["id"], task=row["task"], context=row["context"], turns=turns, meta=dict(row.get("meta", {})))


@dataclass(frozen=True)
class RowField:
    """One field of a result row (one (model, task, cache, context length) measurement of ``run_benchmark``).

    Attributes:
        name: the row key.
        kind: ``"text"`` (str), ``"int"``, ``"number"`` (int or float) or ``"object"`` (dict).
        required: every row of a results file must have it (``hf_longmem.hub`` refuses rows without).
        always: ``run_benchmark`` writes it in every row (otherwise only where it applies).
        measured: a measured value (a model-card metric candidate), not a coordinate of the measurement.
        description: what it holds.
    """

    name: str
    kind: str
    required: bool
    always: bool
    measured: bool
    description: str

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "number")


#: The result row, declared once: ``run_benchmark`` writes it, ``hf-longmem report`` / ``evals.report.load_results``
#: and ``hf_longmem.hub`` validate it. Values of numeric fields may be ``null`` (not measured) unless required.
ROW_FIELDS: tuple[RowField, ...] = (
    RowField("model", "text", False, True, False, "model name (``name_or_path``)"),
    RowField("task", "text", True, True, False, "task generator name, e.g. ``passkey``"),
    RowField("cache", "text", True, True, False, "cache label (the registry name unless the run renamed it)"),
    RowField("cache_name", "text", False, True, False, "registered cache method"),
    RowField("cache_kwargs", "object", False, True, False, "the cache's options at this length"),
    RowField("context_length", "int", True, True, False, "target context length in tokens"),
    RowField("num_samples", "int", False, True, True, "samples evaluated"),
    RowField("accuracy", "number", True, True, True, "mean score of the answers, in [0, 1]"),
    RowField("accuracy_low", "number", False, True, True, "lower bound of the 95% Wilson interval of ``accuracy``"),
    RowField("accuracy_high", "number", False, True, True, "upper bound of the 95% Wilson interval of ``accuracy``"),
    RowField("kv_bytes", "int", False, True, True, "mean bytes the cache holds after the answer"),
    RowField("prefill_s", "number", False, True, True, "mean prefill seconds"),
    RowField("decode_tokens_per_s", "number", False, True, True, "mean decode speed"),
    RowField("peak_memory_bytes", "int", False, True, True, "peak memory of the run (kind: ``peak_memory_kind``)"),
    RowField("top1_agreement", "number", False, True, True, "greedy agreement with the full cache (``--fidelity``)"),
    RowField("kl", "number", False, True, True, "KL to the full cache's next-token distributions (``--fidelity``)"),
    RowField("mode", "text", False, False, False, "``single``, ``rollback`` or ``append``"),
    RowField("num_turns", "int", False, False, True, "answers scored (the interval's sample size)"),
    RowField("mean_prompt_tokens", "number", False, False, True, "mean prompt + cached tokens per answer"),
    RowField("context_prefill_s", "number", False, False, True, "mean seconds of the shared context's prefill"),
    RowField("peak_memory_kind", "text", False, False, False, "what ``peak_memory_bytes`` measured"),
    RowField("kv_resident_bytes", "int", False, False, True, "of ``kv_bytes``: on the compute device"),
    RowField("kv_offloaded_bytes", "int", False, False, True, "of ``kv_bytes``: offloaded to CPU"),
    RowField("memory_note", "text", False, False, False, "why this method may hold as much as the full cache"),
)
ROW_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in ROW_FIELDS)
#: Keys of every ``run_benchmark`` row.
ROW_KEYS: tuple[str, ...] = tuple(f.name for f in ROW_FIELDS if f.always)
#: Keys every row of a results file must have.
REQUIRED_ROW_KEYS: tuple[str, ...] = tuple(f.name for f in ROW_FIELDS if f.required)
#: Keys whose values are numbers (or ``null``).
NUMERIC_ROW_KEYS: tuple[str, ...] = tuple(f.name for f in ROW_FIELDS if f.numeric)
#: Numeric measured keys: what a model card can report as a metric.
METRIC_ROW_KEYS: tuple[str, ...] = tuple(f.name for f in ROW_FIELDS if f.numeric and f.measured)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool (the row's numeric fields)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
