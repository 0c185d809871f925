"""LongMemEval's metrics: retrieval recall_any@k, recall_all@k, NDCG@k over ranked session ids, and QA accuracy per
question type with abstention reported on its own.

The retrieval formulas follow ``src/retrieval/eval_utils.py`` of xiaowu0162/LongMemEval (binary relevance, DCG with
``log2(rank + 1)`` discounts, the ideal ranking over the whole corpus); turn-level rankings are reduced to sessions by
keeping each session's first occurrence (as ``evaluate_retrieval_turn2session`` widens ``k`` until it holds ``k``
distinct sessions). Abstention questions have no evidence and are left out of retrieval metrics, as upstream.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from hf_longmem.validation import check_int

__all__ = [
    "answer_is_correct",
    "ndcg_at_k",
    "qa_accuracy_by_type",
    "recall_all_at_k",
    "recall_any_at_k",
    "retrieval_metrics",
    "session_ranking",
]


def session_ranking(session_ids: Iterable[str]) -> list[str]:
    """Ranked hits' session ids (turn-level allowed) -> distinct sessions in order of first appearance."""
    seen: dict[str, None] = {}
    for sid in session_ids:
        seen.setdefault(sid, None)
    return list(seen)


def _check(ranking: Sequence[str], correct: Iterable[str], k: int) -> set[str]:
    check_int("k", k, low=1)
    correct = set(correct)
    if not correct:
        raise ValueError("`correct` must name at least one evidence session (abstention questions have none)")
    return correct


def recall_any_at_k(ranking: Sequence[str], correct: Iterable[str], k: int) -> float:
    """1.0 if any evidence session is in the top ``k`` of ``ranking``."""
    correct = _check(ranking, correct, k)
    return float(any(sid in correct for sid in ranking[:k]))


def recall_all_at_k(ranking: Sequence[str], correct: Iterable[str], k: int) -> float:
    """1.0 if every evidence session is in the top ``k`` of ``ranking``."""
    correct = _check(ranking, correct, k)
    return float(correct <= set(ranking[:k]))


def ndcg_at_k(ranking: Sequence[str], correct: Iterable[str], k: int) -> float:
    """NDCG@k with binary relevance; the ideal ranking puts every evidence session first."""
    correct = _check(ranking, correct, k)
    dcg = sum(1.0 / math.log2(rank + 2) for rank, sid in enumerate(ranking[:k]) if sid in correct)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(k, len(correct))))
    return dcg / ideal


def retrieval_metrics(
    ranking: Sequence[str], correct: Iterable[str], ks: Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
    """``{"recall_any@k", "recall_all@k", "ndcg@k"}`` for each ``k`` in ``ks``."""
    correct = list(correct)
    out = {}
    for k in ks:
        out[f"recall_any@{k}"] = recall_any_at_k(ranking, correct, k)
        out[f"recall_all@{k}"] = recall_all_at_k(ranking, correct, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranking, correct, k)
    return out


_ABSTAIN = re.compile(r"\b(i don't know|i do not know|not mentioned|no information|unanswerable|cannot answer)\b", re.I)


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def answer_is_correct(prediction: str, answer: Any, *, abstention: bool = False) -> bool:
    """Offline judge: for an abstention question, the prediction must abstain; otherwise the normalised answer must
    appear in the normalised prediction as whole words (upstream uses a GPT-4o judge; see ``docs/agents.md``)."""
    if not isinstance(prediction, str):
        raise ValueError(f"`prediction` must be a string, got {type(prediction).__name__}")
    if abstention:
        return bool(_ABSTAIN.search(prediction))
    wanted = _normalise(str(answer))
    return bool(wanted) and f" {wanted} " in f" {_normalise(prediction)} "


def qa_accuracy_by_type(results: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``results``: dicts with ``question_type``, ``abstention`` (bool) and ``correct`` (bool).

    Returns ``{type: {"accuracy", "count"}}`` with abstention questions under ``"abstention"`` (not in their type),
    plus ``"overall"`` (all questions) and ``"overall_answerable"``.
    """
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        key = "abstention" if r["abstention"] else r["question_type"]
        groups[key].append(bool(r["correct"]))
        groups["overall"].append(bool(r["correct"]))
        if not r["abstention"]:
            groups["overall_answerable"].append(bool(r["correct"]))
    return {k: {"accuracy": sum(v) / len(v), "count": len(v)} for k, v in sorted(groups.items())}
