"""``MemoryStore``: a durable, bi-temporal memory store (SQLite in WAL mode, embeddings as safetensors blobs).

API in the style of mem0 and LangGraph's ``BaseStore``::

    store = MemoryStore("memories.sqlite")          # path=None: in memory
    mid = store.add("I moved to Lisbon", session_id="s1", timestamp=datetime(2024, 5, 1))
    store.update(mid, "I moved to Porto", timestamp=datetime(2024, 9, 1))     # supersedes, never overwrites
    store.search("where do I live?", k=1)                                    # -> the Porto version
    store.search("where do I live?", k=1, as_of=datetime(2024, 6, 1))        # -> the Lisbon version
    store.delete(mid, timestamp=...); store.restore(mid, timestamp=...)      # explicit, recorded, reversible
    store.history(mid)                                                        # every version, oldest first

Every memory is a chain of versions; each version is valid over ``[valid_from, valid_to)`` (valid time: when it was
true in the conversation) and carries ``recorded_at`` (transaction time: when the store wrote it), so the store is
bi-temporal. An update closes the
current version and opens a new one; a deletion closes it and opens a deletion marker. Nothing is overwritten, so an
``as_of`` query sees the store as it was. Each write is one ``BEGIN IMMEDIATE`` transaction with ``synchronous=FULL``:
a crash (even SIGKILL) loses at most the write in progress, and several processes can open the same file (SQLite
serialises the writers; readers never block). Nothing read from disk executes code: rows are SQL values, metadata is
JSON, embeddings are safetensors.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hf_longmem.files import atomic_write, atomic_write_text

from .embedders import BM25Embedder, Embedder, embedder_from_config, top_k
from .records import MemoryRecord, to_seconds

__all__ = ["MemoryStore"]

FORMAT_VERSION = 1
DB_NAME = "memory.sqlite"
CONFIG_NAME = "memory_store.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('add', 'update', 'delete', 'restore')),
    text TEXT,
    session_id TEXT,
    user_id TEXT,
    timestamp REAL NOT NULL,
    valid_from REAL NOT NULL,
    valid_to REAL,
    metadata TEXT NOT NULL,
    embedding BLOB,
    recorded_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    UNIQUE (id, version)
);
CREATE INDEX IF NOT EXISTS versions_open ON versions (valid_to);
CREATE TABLE IF NOT EXISTS state (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'archived')),
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS kv_states (
    id TEXT NOT NULL, version INTEGER NOT NULL, encoder TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (id, version, encoder)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, op TEXT NOT NULL, timestamp REAL NOT NULL,
    recorded_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
"""

_COLUMNS = (
    "v.row, v.id, v.version, v.op, v.text, v.session_id, v.user_id, v.timestamp, v.valid_from, v.valid_to, "
    "v.metadata, s.status, v.recorded_at"
)


def _messages_to_text(value: Any) -> tuple[str, list[dict[str, str]] | None]:
    """A text, or chat messages ``[{"role", "content"}, ...]`` rendered one ``role: content`` line each."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("`text_or_messages` must not be empty")
        return value, None
    if (
        isinstance(value, (list, tuple))
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages), messages
    raise ValueError(
        "`text_or_messages` must be a non-empty string or a non-empty list of {'role': str, 'content': str} dicts, "
        f"got {type(value).__name__}"
    )


def _check_metadata(metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise ValueError(f"`metadata` must be a dict with string keys, got {type(metadata).__name__}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`metadata` must be JSON-serialisable: {error}") from None
    return dict(metadata)


def _check_optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"`{name}` must be a string or None, got {type(value).__name__}")
    return value


def _encode_embedding(vector: torch.Tensor) -> bytes:
    return st_save({"embedding": vector.detach().to(torch.float32).contiguous().cpu()})


def _decode_embedding(blob: bytes) -> torch.Tensor:
    return st_load(blob)["embedding"]


class MemoryStore:
    """A durable store of versioned memories with vector search.

    Args:
        path: SQLite file (created if missing; WAL mode) or ``None`` for a private in-memory store.
        embedder: how texts become vectors and are scored (default :class:`BM25Embedder`). A store remembers its embedder's
            config; reopening with a different one is a ``ValueError`` (vectors of two embedders never mix).
        timeout: seconds to wait for another process's write lock.
    """

    def __init__(
        self, path: str | os.PathLike | None = None, *, embedder: Embedder | None = None, timeout: float = 30.0
    ):
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"`path` must be a file path or None, got {type(path).__name__}")
        if path is not None and Path(path).is_dir():
            raise ValueError(f"`path` {str(path)!r} is a folder; give a file name (or use from_pretrained)")
        if embedder is not None and not isinstance(embedder, Embedder):
            raise ValueError(f"`embedder` must be an hf_longmem.agents Embedder, got {type(embedder).__name__}")
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(":memory:" if path is None else str(path), timeout=timeout, isolation_level=None)
        if path is not None:
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        self._init_schema()
        self.embedder = self._resolve_embedder(embedder)
        self._vectors: dict[int, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------------- plumbing
    def _init_schema(self) -> None:
        # executescript commits on its own; the statements are idempotent (IF NOT EXISTS).
        self._conn.executescript(_SCHEMA)
        with self._write():
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
            elif int(row[0]) > FORMAT_VERSION:
                raise ValueError(
                    f"`path`: the store has format {row[0]}, newer than this hf_longmem's {FORMAT_VERSION}"
                )

    def _resolve_embedder(self, embedder: Embedder | None) -> Embedder:
        with self._write():
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()
            if row is None:
                embedder = embedder or BM25Embedder()
                self._conn.execute("INSERT INTO meta VALUES ('embedder', ?)", (json.dumps(embedder.config()),))
                return embedder
        saved = json.loads(row[0])
        if embedder is None:
            return embedder_from_config(saved)
        if embedder.config() != saved:
            raise ValueError(
                f"`embedder` {embedder.config()!r} differs from the one this store was written with {saved!r}"
            )
        return embedder

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction: all of it is committed, or (on any error or crash) none of it."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _record(self, row: tuple, score: float | None = None) -> MemoryRecord:
        _, mid, version, op, text, session_id, user_id, timestamp, valid_from, valid_to, metadata, status, recorded = (
            row
        )
        return MemoryRecord(
            id=mid,
            text=text,
            version=version,
            op=op,
            session_id=session_id,
            user_id=user_id,
            timestamp=timestamp,
            valid_from=valid_from,
            valid_to=valid_to,
            metadata=json.loads(metadata),
            status=status or "active",
            score=score,
            recorded_at=recorded,
        )

    def _current_row(self, memory_id: str) -> tuple:
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM versions v LEFT JOIN state s ON s.id = v.id WHERE v.id = ? AND v.valid_to IS NULL",
            (memory_id,),
        ).fetchone()
        if row is None:
            raise KeyError(f"no memory with id {memory_id!r}")
        return row

    def _check_id(self, memory_id: Any) -> str:
        if not isinstance(memory_id, str):
            raise ValueError(f"`id` must be a string, got {type(memory_id).__name__}")
        return memory_id

    def _embed(self, text: str) -> bytes:
        return _encode_embedding(self.embedder.embed([text])[0])

    # ----------------------------------------------------------------------------------------------- writes
    def add(
        self,
        text_or_messages: str | list[dict[str, str]],
        *,
        session_id: str | None,
        timestamp: Any,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Adds a memory (a text, or chat messages rendered ``role: content`` per line); returns its new id."""
        text, messages = _messages_to_text(text_or_messages)
        session_id = _check_optional_str("session_id", session_id)
        user_id = _check_optional_str("user_id", user_id)
        seconds = to_seconds(timestamp)
        metadata = _check_metadata(metadata)
        if messages is not None:
            metadata.setdefault("messages", messages)
        blob = self._embed(text)
        memory_id = uuid.uuid4().hex
        with self._write():
            self._conn.execute(
                "INSERT INTO versions (id, version, op, text, session_id, user_id, timestamp, valid_from, valid_to,"
                " metadata, embedding) VALUES (?, 1, 'add', ?, ?, ?, ?, ?, NULL, ?, ?)",
                (memory_id, text, session_id, user_id, seconds, seconds, json.dumps(metadata), blob),
            )
            self._conn.execute("INSERT INTO state (id) VALUES (?)", (memory_id,))
            self._conn.execute("INSERT INTO events (id, op, timestamp) VALUES (?, 'add', ?)", (memory_id, seconds))
        return memory_id

    def _supersede(
        self, memory_id: str, op: str, text: str | None, seconds: float, metadata: dict | None, session_id=None
    ) -> None:
        """Closes the current version at ``seconds`` and opens version+1 (inside the caller's transaction)."""
        current = self._record(self._current_row(memory_id))
        if op in ("update", "delete") and current.op == "delete":
            raise KeyError(f"memory {memory_id!r} is deleted; restore it first")
        if op == "restore" and current.op != "delete":
            raise ValueError(f"`id`: memory {memory_id!r} is not deleted")
        if seconds < current.valid_from:
            raise ValueError(
                f"`timestamp` {seconds} is before the current version's valid_from {current.valid_from}: versions "
                "of a memory are ordered in time"
            )
        blob = None if text is None else self._embed(text)
        new_metadata = current.metadata if metadata is None else metadata
        self._conn.execute(
            "UPDATE versions SET valid_to = ? WHERE id = ? AND version = ?", (seconds, memory_id, current.version)
        )
        self._conn.execute(
            "INSERT INTO versions (id, version, op, text, session_id, user_id, timestamp, valid_from, valid_to,"
            " metadata, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
            (
                memory_id,
                current.version + 1,
                op,
                text,
                session_id or current.session_id,
                current.user_id,
                seconds,
                seconds,
                json.dumps(new_metadata),
                blob,
            ),
        )
        self._conn.execute("INSERT INTO events (id, op, timestamp) VALUES (?, ?, ?)", (memory_id, op, seconds))

    def update(
        self,
        id: str,
        text: str,
        *,
        timestamp: Any,
        metadata: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None:
        """Supersedes memory ``id`` with ``text`` from ``timestamp`` on; the old version stays (see ``as_of``).

        ``metadata`` / ``session_id`` (where the new value was said): ``None`` keeps the current version's."""
        memory_id = self._check_id(id)
        session_id = _check_optional_str("session_id", session_id)
        text, _ = _messages_to_text(text)
        seconds = to_seconds(timestamp)
        metadata = None if metadata is None else _check_metadata(metadata)
        with self._write():
            self._supersede(memory_id, "update", text, seconds, metadata, session_id)

    def delete(self, id: str, *, timestamp: Any) -> None:
        """Deletes memory ``id`` from ``timestamp`` on: recorded as a version; :meth:`restore` undoes it."""
        memory_id = self._check_id(id)
        seconds = to_seconds(timestamp)
        with self._write():
            self._supersede(memory_id, "delete", None, seconds, None)

    def restore(self, id: str, *, timestamp: Any) -> None:
        """Undoes a deletion: the last text of memory ``id`` is current again from ``timestamp`` on."""
        memory_id = self._check_id(id)
        seconds = to_seconds(timestamp)
        with self._write():
            last = self._conn.execute(
                "SELECT text, metadata FROM versions WHERE id = ? AND op != 'delete' ORDER BY version DESC LIMIT 1",
                (memory_id,),
            ).fetchone()
            if last is None:
                raise KeyError(f"no memory with id {memory_id!r}")
            self._supersede(memory_id, "restore", last[0], seconds, json.loads(last[1]))

    def set_status(self, id: str, status: str, *, timestamp: Any) -> None:
        """Archives (``"archived"``) or reactivates (``"active"``) memory ``id``; recorded in its events."""
        memory_id = self._check_id(id)
        if status not in ("active", "archived"):
            raise ValueError(f"`status` must be 'active' or 'archived', got {status!r}")
        seconds = to_seconds(timestamp)
        with self._write():
            self._current_row(memory_id)
            self._conn.execute("UPDATE state SET status = ? WHERE id = ?", (status, memory_id))
            op = "archive" if status == "archived" else "unarchive"
            self._conn.execute("INSERT INTO events (id, op, timestamp) VALUES (?, ?, ?)", (memory_id, op, seconds))

    def set_state(self, id: str, data: dict[str, Any]) -> None:
        """Replaces the policy state of memory ``id`` (a JSON dict: strength, last recall, ...), atomically."""
        memory_id = self._check_id(id)
        data = _check_metadata(data)
        with self._write():
            self._current_row(memory_id)
            self._conn.execute("UPDATE state SET data = ? WHERE id = ?", (json.dumps(data), memory_id))

    def get_state(self, id: str) -> dict[str, Any]:
        """The policy state of memory ``id`` (``{}`` when none was set)."""
        row = self._conn.execute("SELECT data FROM state WHERE id = ?", (self._check_id(id),)).fetchone()
        if row is None:
            raise KeyError(f"no memory with id {id!r}")
        return json.loads(row[0])

    def set_kv(self, id: str, version: int, encoder: str, data: bytes) -> None:
        """Stores the model state of version ``version`` of memory ``id`` (safetensors bytes from
        :meth:`hf_longmem.agents.kv.KVMemory.to_bytes`) under ``encoder`` (the encoder's fingerprint)."""
        memory_id = self._check_id(id)
        if not isinstance(data, (bytes, bytearray)) or not isinstance(encoder, str):
            raise ValueError("`data` must be bytes and `encoder` a string")
        with self._write():
            known = self._conn.execute(
                "SELECT 1 FROM versions WHERE id = ? AND version = ?", (memory_id, int(version))
            ).fetchone()
            if known is None:
                raise KeyError(f"no version {version} of memory {memory_id!r}")
            self._conn.execute(
                "INSERT OR REPLACE INTO kv_states VALUES (?, ?, ?, ?)", (memory_id, int(version), encoder, bytes(data))
            )

    def get_kv(self, id: str, version: int, encoder: str) -> bytes | None:
        """The model state stored by :meth:`set_kv` (``None`` if none)."""
        row = self._conn.execute(
            "SELECT data FROM kv_states WHERE id = ? AND version = ? AND encoder = ?",
            (self._check_id(id), int(version), encoder),
        ).fetchone()
        return None if row is None else bytes(row[0])

    # ----------------------------------------------------------------------------------------------- reads
    def _select(self, as_of: Any, include_archived: bool) -> list[tuple]:
        if as_of is None:
            where, params = "v.valid_to IS NULL", ()
        else:
            seconds = to_seconds(as_of, "as_of")
            where, params = "v.valid_from <= ? AND (v.valid_to IS NULL OR v.valid_to > ?)", (seconds, seconds)
        where += " AND v.op != 'delete'"
        if not include_archived:
            where += " AND (s.status IS NULL OR s.status = 'active')"
        return self._conn.execute(
            f"SELECT {_COLUMNS} FROM versions v LEFT JOIN state s ON s.id = v.id WHERE {where} ORDER BY v.row", params
        ).fetchall()

    @staticmethod
    def _matches(record: MemoryRecord, filter: dict[str, Any] | None) -> bool:
        if not filter:
            return True
        for key, wanted in filter.items():
            value = getattr(record, key) if key in ("session_id", "user_id", "op") else record.metadata.get(key)
            if isinstance(wanted, (list, tuple, set)):
                if value not in wanted:
                    return False
            elif value != wanted:
                return False
        return True

    def _check_filter(self, filter: Any) -> dict[str, Any] | None:
        if filter is not None and (not isinstance(filter, dict) or not all(isinstance(k, str) for k in filter)):
            raise ValueError(f"`filter` must be a dict with string keys or None, got {type(filter).__name__}")
        return filter

    def get(self, id: str, *, as_of: Any = None) -> MemoryRecord | None:
        """The version of memory ``id`` valid now (or at ``as_of``); ``None`` if deleted (or not yet written)."""
        memory_id = self._check_id(id)
        if as_of is None:
            where, params = "v.valid_to IS NULL", (memory_id,)
        else:
            seconds = to_seconds(as_of, "as_of")
            where, params = (
                "v.valid_from <= ? AND (v.valid_to IS NULL OR v.valid_to > ?)",
                (memory_id, seconds, seconds),
            )
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM versions v LEFT JOIN state s ON s.id = v.id WHERE v.id = ? AND {where}"
            " AND v.op != 'delete'",
            params,
        ).fetchone()
        return None if row is None else self._record(row)

    def get_all(
        self, filter: dict[str, Any] | None = None, *, as_of: Any = None, include_archived: bool = False
    ) -> list[MemoryRecord]:
        """Every memory valid now (or at ``as_of``) that matches ``filter`` (equality on ``session_id``,
        ``user_id`` or a metadata key; a list value means "one of"), in insertion order."""
        filter = self._check_filter(filter)
        records = [self._record(row) for row in self._select(as_of, include_archived)]
        return [r for r in records if self._matches(r, filter)]

    def _vector_rows(self, rows: list[int]) -> torch.Tensor:
        missing = [r for r in rows if r not in self._vectors]
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row, blob in self._conn.execute(f"SELECT row, embedding FROM versions WHERE row IN ({marks})", chunk):
                self._vectors[row] = _decode_embedding(blob)
        if not rows:
            return torch.zeros(0, self.embedder.dim)
        return torch.stack([self._vectors[r] for r in rows])  # (N, dim)

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        as_of: Any = None,
        filter: dict[str, Any] | None = None,
        include_archived: bool = False,
    ) -> list[MemoryRecord]:
        """The ``k`` memories most similar to ``query`` (the embedder's score: BM25 over the searched memories by
        default, cosine for dense embedders; best first, ties: older first), as valid now or at ``as_of``, among those
        matching ``filter``. Each hit carries its ``score``."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("`query` must be a non-empty string")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
        filter = self._check_filter(filter)
        rows = [row for row in self._select(as_of, include_archived) if self._matches(self._record(row), filter)]
        keys = self._vector_rows([row[0] for row in rows])  # (N, dim)
        scores, order = top_k(self.embedder.embed([query])[0], keys, k, self.embedder)
        return [self._record(rows[i], float(s)) for s, i in zip(scores.tolist(), order.tolist())]

    def history(self, id: str) -> list[MemoryRecord]:
        """Every version of memory ``id``, oldest first, deletion markers included (``[]`` if unknown)."""
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM versions v LEFT JOIN state s ON s.id = v.id WHERE v.id = ? ORDER BY v.version",
            (self._check_id(id),),
        ).fetchall()
        return [self._record(row) for row in rows]

    def events(self, id: str) -> list[tuple[str, float]]:
        """``(op, timestamp)`` of every write to memory ``id`` (add/update/delete/restore/archive/unarchive)."""
        rows = self._conn.execute("SELECT op, timestamp FROM events WHERE id = ? ORDER BY seq", (self._check_id(id),))
        return [(op, ts) for op, ts in rows]

    def __len__(self) -> int:
        """Number of current (not deleted, not archived) memories."""
        return len(self._select(None, include_archived=False))

    # ----------------------------------------------------------------------------------------------- files
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Writes ``memory.sqlite`` (a consistent snapshot, single file) and ``memory_store.json`` atomically."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"`save_directory` {str(directory)!r} is a file")

        def write(tmp: Path) -> None:
            tmp.unlink()
            target = sqlite3.connect(str(tmp))
            try:
                self._conn.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")
            finally:
                target.close()

        atomic_write(directory / DB_NAME, write)
        config = {"format_version": FORMAT_VERSION, "embedder": self.embedder.config()}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, path: str | os.PathLike | None = None, embedder: Embedder | None = None
    ) -> MemoryStore:
        """Opens a copy of a saved store: in memory (``path=None``) or at a new file ``path``."""
        source = Path(directory) / DB_NAME
        if not source.is_file():
            raise ValueError(f"`directory` {str(directory)!r} holds no {DB_NAME}")
        if path is not None and Path(path).exists():
            raise ValueError(f"`path` {str(path)!r} exists; from_pretrained writes a new copy")
        reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            saved = dict(reader.execute("SELECT key, value FROM meta").fetchall())
            if embedder is None:
                embedder = embedder_from_config(json.loads(saved["embedder"]))
            store = cls(path, embedder=embedder)
            reader.backup(store._conn)
        finally:
            reader.close()
        if path is not None:
            store._conn.execute("PRAGMA journal_mode=WAL")
        store._init_schema()
        store.embedder = store._resolve_embedder(embedder)
        store._vectors.clear()
        return store

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
