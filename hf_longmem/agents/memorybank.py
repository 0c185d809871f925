"""MemoryBank (Zhong et al., 2023, "MemoryBank: Enhancing Large Language Models with Long-Term Memory").

Each memory has a strength ``S`` (1 when written) and a last-recall time. Its retention after ``t`` days is the
Ebbinghaus curve ``R = exp(-t / S)``; recalling it (being retrieved) adds 1 to ``S`` and resets ``t`` to 0. Forgetting
keeps a memory with probability ``R`` (as the official code does, with a seeded generator here) or, in the
deterministic mode, when ``R >= threshold``. Daily summaries, a global summary and a user portrait are written through
the :class:`~hf_longmem.agents.llm.LLM` interface with the official English prompts.

Deviations from the official code (zhongwanjun/MemoryBank-SiliconFriend, ``memory_bank/memory_retrieval/
forget_memory.py``), each on purpose:

- retention is ``exp(-t / S)`` as in the paper and the function's own docstring; the official code (commit 3869efc)
  computes ``math.exp(-t / 5*S)``, which Python reads as ``exp(-(t / 5) * S)``: the stronger a memory, the *faster*
  it is forgotten, so every recall hastens forgetting;
- forgetting *archives* the memory (hidden from retrieval, kept in the store, reversible with :meth:`revive`); the
  official code pops it from the JSON file, and drops the day's summary when a day has no turn left;
- ``t`` is real-valued (seconds / ``time_unit``) rather than whole calendar days;
- the random draw comes from a seeded ``random.Random`` (replays are reproducible), and a deterministic threshold
  mode is offered.
"""

from __future__ import annotations

import math
import random
from typing import Any

from hf_longmem.validation import check_choice, check_int, check_ratio, check_real

from .llm import LLM
from .policy import MemoryPolicy
from .records import MemoryRecord, to_seconds
from .store import MemoryStore

__all__ = ["MemoryBankPolicy", "retention"]

DAY = 86400.0

SUMMARY_PROMPT = (
    "Please summarize the following dialogue as concisely as possible, extracting the main themes and key "
    "information. If there are multiple key events, you may summarize them separately. Dialogue content:\n"
)
OVERALL_PROMPT = (
    "Please provide a highly concise summary of the following event, capturing the essential key information as "
    "succinctly as possible. Summarize the event:\n"
)
PERSONALITY_PROMPT = (
    "Based on the following dialogue, please summarize {user}'s personality traits and emotions, and devise response "
    "strategies based on your speculation. Dialogue content:\n"
)


def retention(days: float, strength: float) -> float:
    """Ebbinghaus retention ``R = exp(-days / strength)``: decreasing in ``days``, increasing in ``strength``."""
    days = check_real("days", days, low=0.0)
    strength = check_real("strength", strength, low=0.0, strict_low=True)
    return math.exp(-days / strength)


class MemoryBankPolicy(MemoryPolicy):
    """MemoryBank forgetting, reinforcement on recall and LLM summaries over a :class:`MemoryStore`.

    Args:
        mode: ``"stochastic"`` (keep with probability ``R``, the paper's rule) or ``"threshold"`` (keep iff
            ``R >= threshold``, deterministic).
        threshold: the retention below which the threshold mode archives.
        seed: seed of the stochastic draws.
        time_unit: seconds per unit of ``t`` (a day, as in the paper).
        auto_forget: run :meth:`forget` before every retrieval (the official code forgets when memory is loaded).
        initial_strength: ``S`` of a new memory (1 in the paper).
        supersede_key: see :class:`~hf_longmem.agents.policy.MemoryPolicy`.
    """

    def __init__(
        self,
        *,
        mode: str = "stochastic",
        threshold: float = 0.05,
        seed: int = 0,
        time_unit: float = DAY,
        auto_forget: bool = True,
        initial_strength: float = 1.0,
        supersede_key=None,
    ):
        super().__init__(supersede_key=supersede_key)
        self.mode = check_choice("mode", mode, ("stochastic", "threshold"))
        self.threshold = check_ratio("threshold", threshold)
        self.seed = check_int("seed", seed)
        self.time_unit = check_real("time_unit", time_unit, low=0.0, strict_low=True)
        self.initial_strength = check_real("initial_strength", initial_strength, low=0.0, strict_low=True)
        if not isinstance(auto_forget, bool):
            raise ValueError(f"`auto_forget` must be a bool, got {auto_forget!r}")
        self.auto_forget = auto_forget
        self._rng = random.Random(seed)

    # ------------------------------------------------------------------------------------------- strength
    def on_write(self, store: MemoryStore, memory_id: str, now: float) -> None:
        state = store.get_state(memory_id)
        strength = state.get("strength", self.initial_strength)
        store.set_state(memory_id, {**state, "strength": strength, "last_recall": now})

    def retention_of(self, store: MemoryStore, memory_id: str, now: Any) -> float:
        """``R`` of memory ``memory_id`` at ``now``."""
        state = store.get_state(memory_id)
        days = max(0.0, (to_seconds(now, "now") - state["last_recall"]) / self.time_unit)
        return retention(days, state["strength"])

    def recall(self, store: MemoryStore, memory_id: str, now: Any) -> None:
        """A recall: ``S += 1`` and the last-recall time becomes ``now`` (``t`` resets to 0)."""
        state = store.get_state(memory_id)
        store.set_state(memory_id, {**state, "strength": state["strength"] + 1, "last_recall": to_seconds(now, "now")})

    # ------------------------------------------------------------------------------------------- forgetting
    def forget(self, store: MemoryStore, now: Any) -> list[str]:
        """Archives the memories that are forgotten at ``now``; returns their ids (in store order)."""
        self._check_store(store)
        seconds = to_seconds(now, "now")
        archived = []
        for record in store.get_all():
            if "last_recall" not in store.get_state(record.id):
                continue  # not written through this policy
            r = self.retention_of(store, record.id, seconds)
            keep = r >= self.threshold if self.mode == "threshold" else self._rng.random() < r
            if not keep:
                store.set_status(record.id, "archived", timestamp=seconds)
                archived.append(record.id)
        return archived

    def revive(self, store: MemoryStore, memory_id: str, now: Any) -> None:
        """Brings an archived memory back (as a fresh recall)."""
        store.set_status(memory_id, "active", timestamp=now)
        self.recall(store, memory_id, now)

    def before_retrieve(self, store: MemoryStore, now: float) -> None:
        if self.auto_forget:
            self.forget(store, now)

    def retrieve(self, store, query, k, *, now, as_of=None, filter=None) -> list[MemoryRecord]:
        """Top-``k`` among the memories not forgotten; each hit is recalled (strength + 1, ``t`` reset)."""
        hits = super().retrieve(store, query, k, now=now, as_of=as_of, filter=filter)
        if as_of is None:
            for hit in hits:
                if "last_recall" in store.get_state(hit.id):
                    self.recall(store, hit.id, now)
        return hits

    # ------------------------------------------------------------------------------------------- summaries
    def summarize_session(
        self, store: MemoryStore, llm: LLM, session_id: str, *, now: Any, max_new_tokens: int = 128
    ) -> str | None:
        """Writes the LLM's summary of session ``session_id`` (the paper's daily event summary) as a memory with
        ``metadata={"kind": "summary", "summary_of": session_id}``; returns its id (``None``: empty session)."""
        records = [r for r in store.get_all(filter={"session_id": session_id}) if r.metadata.get("kind") != "summary"]
        if not records:
            return None
        prompt = SUMMARY_PROMPT + "".join(f"\n{r.text.strip()}" for r in records) + "\nSummarization:"
        summary = llm.generate(prompt, max_new_tokens).strip()
        if not summary:
            return None
        return self.ingest(
            store,
            summary,
            session_id=session_id,
            timestamp=now,
            user_id=records[0].user_id,
            metadata={"kind": "summary", "summary_of": session_id},
        )

    def summarize_overall(self, store: MemoryStore, llm: LLM, *, max_new_tokens: int = 128) -> str:
        """The global summary (the paper's "global summary of events") from the session summaries."""
        summaries = store.get_all(filter={"kind": "summary"})
        prompt = OVERALL_PROMPT + "".join(
            f"At {r.metadata['summary_of']}, the events are {r.text.strip()}" for r in summaries
        )
        return llm.generate(prompt + "\nSummarization:", max_new_tokens).strip()

    def user_portrait(
        self, store: MemoryStore, llm: LLM, session_id: str, *, user: str = "User", max_new_tokens: int = 128
    ) -> str:
        """The paper's user portrait (personality and response strategy) from one session."""
        records = store.get_all(filter={"session_id": session_id})
        prompt = PERSONALITY_PROMPT.format(user=user) + "".join(f"\n{r.text.strip()}" for r in records)
        prompt += f"\n{user}'s personality traits, emotions, and AI's response strategy are:"
        return llm.generate(prompt, max_new_tokens).strip()
