"""The record a store returns: one version of one memory, with its validity interval and (for a search) its score."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = ["MemoryRecord", "to_seconds"]


def to_seconds(value: Any, name: str = "timestamp") -> float:
    """A time as POSIX seconds: a ``datetime`` (naive ones are read as UTC) or a finite number of seconds.

    Raises ``ValueError`` naming ``name`` for anything else (``None``, strings, ``bool``, NaN).
    """
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a datetime or a finite number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MemoryRecord:
    """One version of a memory.

    Attributes:
        id: the memory's id (stable across its versions).
        text: the memory's text (``None`` for a deletion marker, which only :meth:`MemoryStore.history` shows).
        version: 1 for the first version, +1 per update, delete or restore.
        op: what made this version: ``"add"``, ``"update"``, ``"delete"`` or ``"restore"``.
        session_id / user_id: where it came from.
        timestamp: when the event it records happened (POSIX seconds).
        valid_from / valid_to: the interval in which this version was the current one (``valid_to`` ``None``: still).
        metadata: JSON dict given at ``add`` (or ``update``).
        status: ``"active"`` or ``"archived"`` (a policy's forgetting archives; it never destroys).
        score: the similarity for a :meth:`MemoryStore.search` hit, else ``None``.
        recorded_at: when the store wrote this version (wall clock, POSIX seconds): the transaction time.
    """

    id: str
    text: str | None
    version: int
    op: str
    session_id: str | None
    user_id: str | None
    timestamp: float
    valid_from: float
    valid_to: float | None
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "active"
    score: float | None = None
    recorded_at: float | None = None

    @property
    def is_current(self) -> bool:
        return self.valid_to is None and self.op != "delete"
