"""The base memory policy: how a turn is written into a store and how memories are retrieved for a query.

A policy holds no records itself (the store does), so one store can be driven by any policy, and a policy's state
(strengths, last recalls) lives in the store's per-memory state, written in the same durable way as the records.

:class:`RetrievalPolicy` is plain top-k retrieval. Its ``supersede_key`` decides knowledge updates: a function
``text -> subject`` (or ``None``); a new memory about a subject that already has a current memory *supersedes* it
(:meth:`MemoryStore.update`: the old value stays queryable with ``as_of``). Without it the store is ADD-only (mem0 v3's
behaviour): contradicting memories coexist and retrieval picks among them by similarity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .records import MemoryRecord, to_seconds
from .store import MemoryStore

__all__ = ["MemoryPolicy", "RetrievalPolicy"]

SUBJECT_KEY = "subject"


class MemoryPolicy:
    """Interface of a policy (and the plain behaviour): ``ingest``, ``retrieve``, ``before_retrieve``."""

    def __init__(self, *, supersede_key: Callable[[str], str | None] | None = None):
        if supersede_key is not None and not callable(supersede_key):
            raise ValueError(f"`supersede_key` must be callable or None, got {type(supersede_key).__name__}")
        self.supersede_key = supersede_key

    def _check_store(self, store: Any) -> MemoryStore:
        if not isinstance(store, MemoryStore):
            raise ValueError(f"`store` must be a MemoryStore, got {type(store).__name__}")
        return store

    def ingest(
        self,
        store: MemoryStore,
        text_or_messages: Any,
        *,
        session_id: str | None,
        timestamp: Any,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Writes one memory; returns its id (the superseded memory's id when it updates one)."""
        self._check_store(store)
        metadata = dict(metadata or {})
        if self.supersede_key is not None and isinstance(text_or_messages, str):
            subject = self.supersede_key(text_or_messages)
            if subject is not None:
                metadata[SUBJECT_KEY] = subject
                current = store.get_all(filter={SUBJECT_KEY: subject, **({"user_id": user_id} if user_id else {})})
                if current:
                    store.update(
                        current[-1].id, text_or_messages, timestamp=timestamp, metadata=metadata, session_id=session_id
                    )
                    self.on_write(store, current[-1].id, to_seconds(timestamp))
                    return current[-1].id
        memory_id = store.add(
            text_or_messages, session_id=session_id, timestamp=timestamp, user_id=user_id, metadata=metadata
        )
        self.on_write(store, memory_id, to_seconds(timestamp))
        return memory_id

    def on_write(self, store: MemoryStore, memory_id: str, now: float) -> None:
        """Hook after a memory is written (policies initialise their state here)."""

    def before_retrieve(self, store: MemoryStore, now: float) -> None:
        """Hook before a retrieval at time ``now`` (MemoryBank forgets here)."""

    def after_answer(self, store: MemoryStore, query: str, shown: list[MemoryRecord], answer: str, *, now) -> None:
        """Hook after an answer was generated from the ``shown`` memories (in prompt order; RMM learns here)."""

    def retrieve(
        self,
        store: MemoryStore,
        query: str,
        k: int,
        *,
        now: Any,
        as_of: Any = None,
        filter: dict[str, Any] | None = None,
    ) -> list[MemoryRecord]:
        """The ``k`` memories for ``query`` at time ``now`` (as valid at ``as_of`` if given), best first."""
        self._check_store(store)
        seconds = to_seconds(now, "now")
        self.before_retrieve(store, seconds)
        return store.search(query, k, as_of=as_of, filter=filter)


class RetrievalPolicy(MemoryPolicy):
    """Plain top-k similarity retrieval (with supersede when ``supersede_key`` is given, else ADD-only)."""
