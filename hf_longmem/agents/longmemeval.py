"""LongMemEval (Wu et al., ICLR 2025; xiaowu0162/LongMemEval, MIT): a loader for the official JSON files a user has
locally, and the replay of a question's haystack into a store.

An item of ``longmemeval_s.json`` / ``_m`` / ``_oracle`` (a JSON list) has ``question_id``, ``question_type``
(``single-session-user``, ``single-session-assistant``, ``single-session-preference``, ``multi-session``,
``temporal-reasoning``, ``knowledge-update``), ``question``, ``answer``, ``question_date``, ``haystack_session_ids``,
``haystack_dates``, ``haystack_sessions`` (lists of ``{"role", "content", "has_answer"?}`` turns) and
``answer_session_ids``. A ``question_id`` ending in ``_abs`` is an abstention question. Dates look like
``2023/05/20 (Sat) 02:21``. Nothing is downloaded; JSON is parsed, never executed.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hf_longmem.validation import check_choice

from .policy import MemoryPolicy
from .store import MemoryStore

__all__ = ["QUESTION_TYPES", "format_date", "ingest_haystack", "is_abstention", "load_longmemeval", "parse_date"]

QUESTION_TYPES = (
    "single-session-user",
    "single-session-assistant",
    "single-session-preference",
    "multi-session",
    "temporal-reasoning",
    "knowledge-update",
)
_FIELDS = {
    "question_id": str,
    "question_type": str,
    "question": str,
    "question_date": str,
    "haystack_session_ids": list,
    "haystack_dates": list,
    "haystack_sessions": list,
    "answer_session_ids": list,
}
DATE_FORMAT = "%Y/%m/%d (%a) %H:%M"


def parse_date(text: str) -> datetime:
    """``"2023/05/20 (Sat) 02:21"`` (or without the time / weekday) -> a UTC ``datetime``."""
    for fmt in (DATE_FORMAT, "%Y/%m/%d %H:%M", "%Y/%m/%d (%a)", "%Y/%m/%d"):
        try:
            return datetime.strptime(text.strip(), fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise ValueError(f"`date` {text!r} is not a LongMemEval date like '2023/05/20 (Sat) 02:21'")


def format_date(moment: datetime) -> str:
    """A ``datetime`` in LongMemEval's format."""
    return moment.strftime(DATE_FORMAT)


def is_abstention(item: dict[str, Any]) -> bool:
    """Abstention questions are marked by ``_abs`` in their id."""
    return "_abs" in item["question_id"]


def _validate(item: Any, index: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f"item {index}: must be a JSON object, got {type(item).__name__}")
    qid = item.get("question_id", f"#{index}")
    for name, kind in _FIELDS.items():
        if not isinstance(item.get(name), kind):
            raise ValueError(f"item {qid!r}: field `{name}` must be a {kind.__name__}, got {item.get(name)!r:.60}")
    if "answer" not in item:
        raise ValueError(f"item {qid!r}: field `answer` is missing")
    n = len(item["haystack_sessions"])
    if len(item["haystack_session_ids"]) != n or len(item["haystack_dates"]) != n:
        raise ValueError(
            f"item {qid!r}: `haystack_session_ids`, `haystack_dates`, `haystack_sessions` differ in length"
        )
    for session in item["haystack_sessions"]:
        for turn in session:
            if (
                not isinstance(turn, dict)
                or not isinstance(turn.get("role"), str)
                or not isinstance(turn.get("content"), str)
            ):
                raise ValueError(f"item {qid!r}: field `haystack_sessions` holds a turn without string role/content")
    parse_date(item["question_date"])
    for date in item["haystack_dates"]:
        parse_date(date)
    return item


def load_longmemeval(path: str | os.PathLike, *, question_types: list[str] | None = None) -> list[dict[str, Any]]:
    """Reads and validates a LongMemEval JSON file (a list of items); keeps ``question_types`` if given."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`path` {str(path)!r} is not a file")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, list):
        raise ValueError(f"`path` {str(path)!r} must hold a JSON list of items")
    items = [_validate(item, i) for i, item in enumerate(data)]
    if question_types is not None:
        for qt in question_types:
            check_choice("question_types", qt, QUESTION_TYPES)
        items = [item for item in items if item["question_type"] in question_types]
    return items


def ingest_haystack(
    item: dict[str, Any],
    store: MemoryStore,
    policy: MemoryPolicy,
    *,
    granularity: str = "turn",
    roles: tuple[str, ...] = ("user",),
) -> int:
    """Replays an item's haystack in date order into ``store`` through ``policy``; returns the memories written.

    ``granularity="turn"``: one memory per turn of ``roles`` (metadata ``turn``: the 1-based index, ``has_answer``);
    ``"session"``: one memory per session, its ``roles`` turns joined by spaces (upstream's session corpus).
    """
    check_choice("granularity", granularity, ("turn", "session"))
    sessions = sorted(
        zip(item["haystack_session_ids"], item["haystack_dates"], item["haystack_sessions"]),
        key=lambda s: parse_date(s[1]),
    )
    written = 0
    for session_id, date, turns in sessions:
        moment = parse_date(date)
        if granularity == "session":
            text = " ".join(t["content"] for t in turns if t["role"] in roles)
            if text.strip():
                policy.ingest(store, text, session_id=session_id, timestamp=moment)
                written += 1
            continue
        for index, turn in enumerate(turns):
            if turn["role"] in roles and turn["content"].strip():
                metadata = {"turn": index + 1, "role": turn["role"], "has_answer": bool(turn.get("has_answer", False))}
                policy.ingest(store, turn["content"], session_id=session_id, timestamp=moment, metadata=metadata)
                written += 1
    return written
