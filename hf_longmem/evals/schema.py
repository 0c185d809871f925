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
    """

    query: str
    answers: list[str]
    max_new_tokens: int = 16


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
