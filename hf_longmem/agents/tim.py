"""Think-in-Memory (Liu et al., 2023, "Think-in-Memory: Recalling and Post-thinking Enable LLMs with Long-Term
Memory", arXiv 2311.08719; no official code).

TiM stores *thoughts*, not raw turns: after answering, the LLM post-thinks and writes inductive thoughts, relation
triples ``(head, relation, tail)``; before answering, relevant thoughts are recalled. Thoughts are organised by three
operations: **insert** (a new thought), **merge** (thoughts sharing a head entity become one memory) and **forget**
(a thought contradicted by a newer one is dropped). Thoughts are placed by locality-sensitive hashing (random
projections ``R``; bucket ``argmax([xR; -xR])``), and a query is answered from its own bucket, ranked by similarity.

Here one memory holds one head entity with its relations (``metadata["relations"]``: relation -> tail), rendered
``"head: relation tail; relation tail"``; merge and forget are :meth:`MemoryStore.update` calls, so a forgotten
value stays in the memory's history (``as_of``) instead of vanishing. The LSH form follows the paper's citation of
random-rotation LSH as we understand it (unverified against code: none is published); the post-thinking prompt is
ours.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_longmem.validation import check_int

from .llm import LLM
from .policy import MemoryPolicy
from .records import MemoryRecord, to_seconds
from .store import MemoryStore

__all__ = ["TiMPolicy", "parse_triples"]

POST_THINK_PROMPT = (
    "Read the question and the answer, and write the facts they establish as relation triples, one per line, in the "
    "form `head | relation | tail`.\nQuestion: {question}\nAnswer: {answer}\nTriples:\n"
)


def parse_triples(text: str) -> list[tuple[str, str, str]]:
    """Lines ``head | relation | tail`` (surrounding spaces and list marks ignored) -> triples; other lines skipped."""
    triples = []
    for line in text.splitlines():
        parts = [p.strip(" -*`\t") for p in line.split("|")]
        if len(parts) == 3 and all(parts):
            triples.append((parts[0], parts[1], parts[2]))
    return triples


def _render(head: str, relations: dict[str, str]) -> str:
    return f"{head}: " + "; ".join(f"{relation} {tail}" for relation, tail in relations.items())


class TiMPolicy(MemoryPolicy):
    """Thoughts as head-entity memories with insert / merge / forget, placed and recalled by LSH buckets.

    Args:
        llm: writes the thoughts after each answer (post-thinking).
        num_buckets: LSH buckets (even; ``num_buckets / 2`` random projections).
        seed: seed of the projections.
    """

    def __init__(self, llm: LLM, *, num_buckets: int = 8, seed: int = 0, max_new_tokens: int = 128):
        super().__init__()
        if not isinstance(llm, LLM):
            raise ValueError(f"`llm` must be an hf_longmem.agents LLM, got {type(llm).__name__}")
        self.llm = llm
        self.num_buckets = check_int("num_buckets", num_buckets, low=2)
        if self.num_buckets % 2:
            raise ValueError(f"`num_buckets` must be even, got {num_buckets}")
        self.seed = check_int("seed", seed)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        self._projections: dict[int, torch.Tensor] = {}

    def bucket(self, store: MemoryStore, text: str) -> int:
        """``argmax([xR; -xR])`` of the text's (L2-normalised) store embedding ``x`` (dim,), ``R`` (dim, b/2)."""
        dim = store.embedder.dim
        if dim not in self._projections:
            generator = torch.Generator().manual_seed(self.seed)
            self._projections[dim] = torch.randn(dim, self.num_buckets // 2, generator=generator)
        x = torch.nn.functional.normalize(store.embedder.embed([text])[0], dim=-1)  # (dim,)
        projected = x @ self._projections[dim]  # (b/2,)
        return int(torch.cat([projected, -projected]).argmax())

    def _thought_of(self, store: MemoryStore, head: str, user_id: str | None) -> MemoryRecord | None:
        found = store.get_all(filter={"kind": "thought", "head": head, **({"user_id": user_id} if user_id else {})})
        return found[-1] if found else None

    def add_thought(
        self, store: MemoryStore, head: str, relation: str, tail: str, *, timestamp: Any, session_id=None, user_id=None
    ) -> tuple[str, str]:
        """Applies one triple; returns ``(memory id, operation)`` with operation ``insert``, ``merge``, ``forget``
        (a relation's tail replaced) or ``none`` (already known)."""
        self._check_store(store)
        to_seconds(timestamp)
        current = self._thought_of(store, head, user_id)
        if current is None:
            relations = {relation: tail}
            text = _render(head, relations)
            metadata = {"kind": "thought", "head": head, "relations": relations, "bucket": self.bucket(store, text)}
            return store.add(text, session_id=session_id, timestamp=timestamp, user_id=user_id, metadata=metadata), (
                "insert"
            )
        relations = dict(current.metadata["relations"])
        if relations.get(relation) == tail:
            return current.id, "none"
        operation = "forget" if relation in relations else "merge"
        relations[relation] = tail
        text = _render(head, relations)
        metadata = {**current.metadata, "relations": relations, "bucket": self.bucket(store, text)}
        store.update(current.id, text, timestamp=timestamp, metadata=metadata, session_id=session_id)
        return current.id, operation

    def post_think(
        self, store: MemoryStore, question: str, answer: str, *, timestamp: Any, session_id=None, user_id=None
    ) -> list[tuple[str, str]]:
        """Stage 2: the LLM writes the triples of a question/answer pair; each is inserted, merged or forgotten."""
        reply = self.llm.generate(POST_THINK_PROMPT.format(question=question, answer=answer), self.max_new_tokens)
        return [
            self.add_thought(store, h, r, t, timestamp=timestamp, session_id=session_id, user_id=user_id)
            for h, r, t in parse_triples(reply)
        ]

    def ingest(self, store, text_or_messages, *, session_id, timestamp, user_id=None, metadata=None) -> str:
        """Post-thinks a turn (its text as the answer to an empty question); returns the last thought's id (or an
        empty string when the LLM wrote no triple)."""
        text = (
            text_or_messages
            if isinstance(text_or_messages, str)
            else "\n".join(f"{m['role']}: {m['content']}" for m in text_or_messages)
        )
        done = self.post_think(store, "", text, timestamp=timestamp, session_id=session_id, user_id=user_id)
        return done[-1][0] if done else ""

    def retrieve(self, store: MemoryStore, query: str, k: int, *, now, as_of=None, filter=None) -> list[MemoryRecord]:
        """Stage 1: the thoughts of the query's LSH bucket, ranked by similarity."""
        bucket_filter = {**(filter or {}), "kind": "thought", "bucket": self.bucket(store, query)}
        return super().retrieve(store, query, k, now=now, as_of=as_of, filter=bucket_filter)
