"""SCM, the Self-Controlled Memory framework (Wang et al., 2023; wbbeyourself/SCM4LLMs, MIT).

The memory stream holds each turn with a one-sentence summary (written through the
:class:`~hf_longmem.agents.llm.LLM` interface when the turn is stored). For a query, a memory controller first asks
the LLM whether history is needed at all; if so, the *flash* memory (the previous turn, raw or summarised when longer
than ``max_pre_turn_tokens``) is always kept and the *archived* memory (the older turns) is searched for the top-k.
When they exceed ``max_history_tokens``, the LLM judges each retrieved turn but the most similar: drop it
(it cannot answer the query), use its summary (the summary can answer), or keep it raw; then raw turns become
summaries, least similar first, until the budget holds.

Deviations from ``core/chat.py: get_related_turn``, each on purpose:

- the budget loop terminates: upstream loops forever once every turn is a summary (or dropped) and the total is
  still over budget (e.g. summaries longer than the budget, or a long previous turn); here, after raw -> summary,
  the least similar turns are dropped, and the flash memory is cut to the budget if it alone exceeds it;
- the judge and controller prompts are English renderings of upstream's (its judge prompt is Chinese only);
- retrieval runs through the store (BM25 by default) rather than OpenAI embeddings, and turns are records, so the
  stream persists and can be shared with other policies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_longmem.validation import check_int

from .llm import LLM
from .policy import MemoryPolicy
from .records import MemoryRecord, to_seconds
from .store import MemoryStore

__all__ = ["SCMPolicy", "select_under_budget"]

SUMMARY_PROMPT = (
    "Below is a conversation between a user and an AI assistant. Please write a summary for each of them in one "
    "sentence and list them in separate paragraphs, while trying to preserve the key information of the user's "
    "question and the assistant's answer as much as possible.\n\nconversation content: \n\n{input}\n\nSummary:\n"
)
JUDGE_PROMPT = (
    "Given the [conversation content] and the [user question], answer the instruction question.\n\n"
    "[conversation content]:\n```\n{content}\n```\n\n[user question]:\n```\n{query}\n```\n\n"
    "Instruction question:\n```\nCan the [user question] be answered from the [conversation content]? If it can, "
    "answer `(A) yes`, otherwise answer `(B) no`.\n```\n\n[answer]: the final answer is:"
)
CONTROLLER_PROMPT = (
    "Given the [user question], decide whether answering it needs the history of the conversation.\n\n"
    "[user question]:\n```\n{query}\n```\n\nIf it needs the history, answer `(A) yes`, otherwise answer `(B) no`.\n\n"
    "[answer]: the final answer is:"
)


def _yes(output: str) -> bool:
    """Upstream's parse: an answer containing ``(B)`` is a no; anything else is a yes."""
    return "(B)" not in output


def select_under_budget(
    lengths_raw: list[int],
    lengths_summary: list[int],
    first_choices: list[str],
    budget: int,
) -> list[str]:
    """SCM's budget loop, made to terminate. Turns are ordered least similar first (as upstream's ``topk_indices``).

    Args:
        lengths_raw / lengths_summary: tokens of each turn raw / summarised.
        first_choices: the judge's first-round choice per turn: ``"raw"``, ``"summary"`` or ``"drop"``.
        budget: tokens the archived turns may use.

    Returns:
        The final choice per turn. Each step turns one ``raw`` into ``summary`` (least similar first) and, once none
        is raw, one ``summary`` into ``drop``; every step lowers a finite state, so the loop ends within
        ``2 * len(turns)`` steps, with a total within ``budget`` or everything dropped.
    """
    choices = list(first_choices)

    def total() -> int:
        return sum(
            lengths_raw[i] if c == "raw" else lengths_summary[i] if c == "summary" else 0 for i, c in enumerate(choices)
        )

    for _ in range(2 * len(choices) + 1):
        if total() <= budget:
            return choices
        if "raw" in choices:
            choices[choices.index("raw")] = "summary"
        elif "summary" in choices:
            choices[choices.index("summary")] = "drop"
    return choices


class SCMPolicy(MemoryPolicy):
    """SCM's memory stream, controller, flash/archived memory and token budget over a :class:`MemoryStore`.

    Args:
        llm: the LLM for summaries, the controller and the judge (the same small interface as everywhere).
        max_history_tokens: budget of the retrieved history, flash memory included (upstream: 2500).
        max_pre_turn_tokens: the flash memory is summarised beyond this (upstream: 500).
        use_controller: ask the LLM whether memory is needed (``False``: always retrieve).
        summary_tokens: ``max_new_tokens`` of a turn summary.
    """

    def __init__(
        self,
        llm: LLM,
        *,
        max_history_tokens: int = 2500,
        max_pre_turn_tokens: int = 500,
        use_controller: bool = True,
        summary_tokens: int = 64,
        supersede_key=None,
    ):
        super().__init__(supersede_key=supersede_key)
        if not isinstance(llm, LLM):
            raise ValueError(f"`llm` must be an hf_longmem.agents LLM, got {type(llm).__name__}")
        self.llm = llm
        self.max_history_tokens = check_int("max_history_tokens", max_history_tokens, low=1)
        self.max_pre_turn_tokens = check_int("max_pre_turn_tokens", max_pre_turn_tokens, low=1)
        self.summary_tokens = check_int("summary_tokens", summary_tokens, low=1)
        self.use_controller = bool(use_controller)
        #: What the last retrieval decided: ``{"needed": bool, "choices": {memory id: raw/summary/drop/flash}}``.
        self.last_decision: dict[str, Any] = {}

    def ingest(self, store, text_or_messages, *, session_id, timestamp, user_id=None, metadata=None) -> str:
        """Stores the turn with its one-sentence summary (``metadata["summary"]``)."""
        metadata = dict(metadata or {})
        if "summary" not in metadata:
            text = (
                text_or_messages
                if isinstance(text_or_messages, str)
                else "\n".join(f"{m['role']}: {m['content']}" for m in text_or_messages)
            )
            metadata["summary"] = self.llm.generate(SUMMARY_PROMPT.format(input=text), self.summary_tokens).strip()
        return super().ingest(
            store, text_or_messages, session_id=session_id, timestamp=timestamp, user_id=user_id, metadata=metadata
        )

    def _summary(self, record: MemoryRecord) -> str:
        return record.metadata.get("summary") or record.text

    def retrieve(self, store: MemoryStore, query: str, k: int, *, now, as_of=None, filter=None) -> list[MemoryRecord]:
        """The flash memory and up to ``k`` archived turns, each raw or as its summary (``metadata["scm_choice"]``),
        within ``max_history_tokens``; ``[]`` when the controller says no history is needed."""
        self._check_store(store)
        to_seconds(now, "now")
        count = self.llm.count_tokens
        if self.use_controller and not _yes(self.llm.generate(CONTROLLER_PROMPT.format(query=query), 8)):
            self.last_decision = {"needed": False, "choices": {}}
            return []
        stream = store.get_all(filter, as_of=as_of)
        if not stream:
            self.last_decision = {"needed": True, "choices": {}}
            return []
        flash = stream[-1]  # the previous turn
        flash_text = flash.text if count(flash.text) < self.max_pre_turn_tokens else self._summary(flash)
        if count(flash_text) > self.max_history_tokens:  # upstream would loop forever here
            flash_text = self.llm.truncate(flash_text, self.max_history_tokens)
        archived_ids = {r.id for r in stream[:-1]}
        hits = [h for h in store.search(query, k + 1, as_of=as_of, filter=filter) if h.id in archived_ids][:k]
        ordered = list(reversed(hits))  # least similar first, as upstream's argsort
        raw = [count(h.text) for h in ordered]
        summary = [count(self._summary(h)) for h in ordered]
        budget = self.max_history_tokens - count(flash_text)
        choices = ["raw"] * len(ordered)
        if sum(raw) > budget:
            for i, hit in enumerate(ordered[:-1]):  # upstream keeps the most similar turn raw in the first round
                if not _yes(self.llm.generate(JUDGE_PROMPT.format(content=hit.text, query=query), 8)):
                    choices[i] = "drop"
                elif _yes(self.llm.generate(JUDGE_PROMPT.format(content=self._summary(hit), query=query), 8)):
                    choices[i] = "summary"
            choices = select_under_budget(raw, summary, choices, budget)
        out = []
        for hit, choice in zip(ordered, choices):
            if choice == "drop":
                continue
            text = hit.text if choice == "raw" else self._summary(hit)
            out.append(dataclasses.replace(hit, text=text, metadata={**hit.metadata, "scm_choice": choice}))
        out.reverse()  # best first, as every policy returns
        out.append(dataclasses.replace(flash, text=flash_text, metadata={**flash.metadata, "scm_choice": "flash"}))
        self.last_decision = {
            "needed": True,
            "choices": {**{h.id: c for h, c in zip(ordered, choices)}, flash.id: "flash"},
        }
        return out
