"""Answer metrics of the evaluation harness (hand-checked; no downloads, unlike HF ``evaluate``).

Every metric has the signature ``metric(prediction: str, answers: Sequence[str]) -> float`` with a score in
``[0, 1]``, where ``answers`` are the accepted answers of a :class:`~hf_longmem.evals.schema.Turn` (the first one is
canonical). :func:`score` looks a metric up by name and :func:`metric_for` picks the one a task is scored with.
Some metrics take keyword options (LongBench's classification needs ``all_classes``): a sample carries them in
``meta["metric_options"]`` for its ``meta["metric"]`` (:func:`metric_options`). The official LongBench, InfiniteBench
and SCBench scorers (:mod:`hf_longmem.evals.official_metrics`) are registered here too.

>>> exact_match(" 71432\\n", ["71432"])
1.0
>>> string_match_all("The variables are Q, K and M", ["Q K M"], whole_words=True)
1.0
>>> first_int_match("The pass key is 71432.", ["71432"])
1.0
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .official_metrics import OFFICIAL_METRICS

__all__ = [
    "METRICS",
    "TASK_METRICS",
    "exact_match",
    "first_int",
    "first_int_match",
    "metric_for",
    "metric_options",
    "qa_f1",
    "score",
    "string_match_all",
    "string_match_part",
]

_INT_PATTERN = re.compile(r"[-+]?\d+")
_WORD_PATTERN = re.compile(r"\w+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def _check_answers(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("`answers` must hold at least one accepted answer, got an empty list")
    return answers


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when ``prediction`` equals any accepted answer once both are stripped of surrounding whitespace.

    Args:
        prediction: generated text.
        answers: accepted answers (a single string is taken as one answer).

    Returns:
        ``1.0`` or ``0.0``.
    """
    stripped = prediction.strip()
    return float(any(stripped == answer.strip() for answer in _check_answers(answers)))


def string_match_all(prediction: str, answers: Sequence[str], *, whole_words: bool = False) -> float:
    """RULER's ``string_match_all``: the fraction of the references found in the prediction (case-insensitive).

    The references are the words of the canonical answer ``answers[0]`` when ``whole_words`` is set (variable
    tracking: ``"Q K M"`` -> ``["Q", "K", "M"]``, each matched as a whole word so that ``"Q"`` is not found inside
    ``"Question"``); otherwise every accepted answer is a reference matched as a substring, as RULER does.

    Args:
        prediction: generated text.
        answers: references (a single string is taken as one reference).
        whole_words: split ``answers[0]`` into words and match words instead of substrings.

    Returns:
        A score in ``[0, 1]``.
    """
    answers = _check_answers(answers)
    text = prediction.lower()
    if whole_words:
        references = [word.lower() for word in _WORD_PATTERN.findall(answers[0])]
        if not references:
            raise ValueError(f"`answers[0]` has no words to match: {answers[0]!r}")
        found = set(_WORD_PATTERN.findall(text))
        return sum(ref in found for ref in references) / len(references)
    return sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_part`` (its QA metric): 1.0 when any reference is a substring of the prediction
    (case-insensitive), else 0.0."""
    text = prediction.lower()
    return float(any(answer.lower() in text for answer in _check_answers(answers)))


def normalize_answer(text: str) -> str:
    """SQuAD / LongBench answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """LongBench's ``qa_f1_score``: the best token F1 between the normalised prediction and an accepted answer."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in _check_answers(answers):
        truth = normalize_answer(answer).split()
        same = sum((collections.Counter(predicted) & collections.Counter(truth)).values())
        if same:
            precision, recall = same / len(predicted), same / len(truth)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def first_int(text: str) -> int | None:
    """The first integer written in ``text`` (optional sign, decimal digits), or ``None``."""
    match = _INT_PATTERN.search(text)
    return None if match is None else int(match.group())


def first_int_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the first integer of the prediction equals the first integer of any accepted answer.

    SCBench's math-find metric and the passkey "exact integer match": surrounding words, punctuation and leading
    zeros do not matter (``"The key is 0042."`` matches ``"42"``). A prediction without an integer scores 0.
    """
    value = first_int(prediction)
    if value is None:
        return 0.0
    return float(any(first_int(answer) == value for answer in _check_answers(answers)))


def _string_match_all_words(prediction: str, answers: Sequence[str]) -> float:
    return string_match_all(prediction, answers, whole_words=True)


#: Metric name -> ``metric(prediction, answers, **options) -> float``.
METRICS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "string_match_all": string_match_all,
    "string_match_all_words": _string_match_all_words,
    "string_match_part": string_match_part,
    "qa_f1": qa_f1,
    "first_int": first_int_match,
    **OFFICIAL_METRICS,
}

#: Default metric of each task generator of :mod:`hf_longmem.evals.tasks` (others use ``"exact_match"``).
TASK_METRICS: dict[str, str] = {
    "passkey": "first_int",
    "multikey_needle": "string_match_all",
    "variable_tracking": "string_match_all_words",
}


def metric_for(task: str, meta: Mapping[str, Any] | None = None, turn: Any = None) -> str:
    """Name of the metric a turn is scored with.

    Looked up in this order: ``turn.metric`` (when the turn defines one), ``meta["metric"]``, the metric of
    ``meta["generator"]`` (shared-context samples name the generator of their facts), :data:`TASK_METRICS` of
    ``task``, and finally ``"exact_match"``.
    """
    meta = meta or {}
    for name in (getattr(turn, "metric", None), meta.get("metric")):
        if name:
            return name
    generator = meta.get("generator")
    if generator in TASK_METRICS:
        return TASK_METRICS[generator]
    return TASK_METRICS.get(task, "exact_match")


def metric_options(meta: Mapping[str, Any] | None, metric: str) -> dict[str, Any]:
    """The keyword options of ``metric`` for a sample: ``meta["metric_options"]`` when ``metric`` is the sample's own
    ``meta["metric"]``, else none (a metric chosen by the caller gets no options meant for another one)."""
    meta = meta or {}
    if metric != meta.get("metric"):
        return {}
    return dict(meta.get("metric_options") or {})


def score(prediction: str, answers: Sequence[str], metric: str = "exact_match", **options: Any) -> float:
    """Scores ``prediction`` against ``answers`` with the metric named ``metric`` (a key of :data:`METRICS`);
    ``options`` are passed to the metric (see :func:`metric_options`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown `metric` {metric!r}; available: {', '.join(METRICS)}")
    return float(METRICS[metric](prediction, answers, **options))


def wilson_interval(mean_score: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate ``mean_score`` over ``n`` trials (``z`` for other levels).

    Unlike the normal approximation it stays inside ``[0, 1]`` and is not zero-width at 0 or 1 accuracy: 20 of 20
    correct gives ``(0.839, 1.0)``. Scores in ``[0, 1]`` that are not 0/1 (partial matches) are treated as that
    many successes, an approximation that is exact for exact-match tasks.
    """
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}")
    if not 0.0 <= mean_score <= 1.0:
        raise ValueError(f"`mean_score` must be in [0, 1], got {mean_score}")
    denominator = 1 + z * z / n
    centre = (mean_score + z * z / (2 * n)) / denominator
    half = z * math.sqrt(mean_score * (1 - mean_score) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
