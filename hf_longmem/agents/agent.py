"""``MemoryAgent``: retrieve memories, build a prompt under a token budget, generate; optionally write the turn back.

    agent = MemoryAgent(model, tokenizer, MemoryStore(), policy=MemoryBankPolicy(), k=3, max_prompt_tokens=512)
    agent.remember("I adopted a kitten named Miso", session_id="s1", timestamp=datetime(2024, 5, 1))
    reply = agent.chat("What is my kitten called?", now=datetime(2024, 6, 1))

The prompt is ``prompt_template`` filled with ``system``, the retrieved memories (best first until the budget is full,
then shown in chronological order, as LongMemEval's reading study recommends) and the question. With
``time_aware=True`` a date in the question (``2024/03/05`` or ``2024-03-05``) makes the search run ``as_of`` the end of
that day (LongMemEval's time-aware query expansion, done by a pattern instead of an LLM call).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from hf_longmem.validation import check_int, check_real

from .llm import TransformersLLM
from .policy import MemoryPolicy, RetrievalPolicy
from .records import MemoryRecord, to_seconds
from .store import MemoryStore

__all__ = ["AgentReply", "MemoryAgent", "date_in_question"]

DEFAULT_SYSTEM = "You are a helpful assistant with a long-term memory. Relevant memories:"
DEFAULT_TEMPLATE = "{system}\n{memories}\nQuestion: {question}\nAnswer:"
_DATE = re.compile(r"\b(\d{4})[/-](\d{1,2})[/-](\d{1,2})\b")


def date_in_question(question: str) -> datetime | None:
    """The end of the first ``YYYY/MM/DD`` or ``YYYY-MM-DD`` day named in ``question`` (UTC), else ``None``."""
    match = _DATE.search(question)
    if match is None:
        return None
    try:
        day = datetime(int(match[1]), int(match[2]), int(match[3]), tzinfo=timezone.utc)
    except ValueError:
        return None
    return day + timedelta(days=1) - timedelta(microseconds=1)


@dataclass
class AgentReply:
    """What one turn did: the reply, the memories it retrieved and showed, the prompt and its token count."""

    text: str
    retrieved: list[MemoryRecord]
    shown: list[MemoryRecord]
    prompt: str
    prompt_tokens: int
    abstained: bool = False
    as_of: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class MemoryAgent:
    """A chat agent whose context is what its policy retrieves from a :class:`MemoryStore`.

    Args:
        model / tokenizer: any transformers causal LM and its tokenizer (the reader).
        store: the memory store.
        policy: how memories are written and retrieved (default :class:`RetrievalPolicy`).
        k: memories retrieved per turn.
        max_prompt_tokens: the prompt (memories included) never exceeds this many tokens.
        max_new_tokens: reply length.
        system: text before the memories.
        prompt_template: ``str.format`` template with ``{system}``, ``{memories}`` and ``{question}``.
        memory_template: how one memory is shown: fields ``{text}``, ``{date}`` (``YYYY-MM-DD``), ``{session_id}``,
            ``{index}`` (its position in the prompt, for readers that cite memories as ``[index]``).
        write_back: store each user message (and the reply) as memories of ``session_id``.
        time_aware: search ``as_of`` a date named in the question.
        abstain_below: if the best retrieval score is below this, reply ``abstain_text`` without generating.
        abstain_text: the abstention reply.
        kv: a :class:`hf_longmem.agents.kv.KVMemory` of the same model: memories are read as stored model state
            (encoded once, kept in the store) and only the text after them is prefilled (``prompt_tokens`` then counts
            the tokens prefilled; ``extra["reprefill_tokens"]`` what re-prefilling the prompt would have cost).
        kv_context: encode each memory after the prompt's prefix (``KVMemory.encode(context=...)``): with one
            memory shown the answer equals the plain prompt's; the states are then tied to that prefix.
    """

    def __init__(
        self,
        model,
        tokenizer,
        store: MemoryStore,
        policy: MemoryPolicy | None = None,
        *,
        k: int = 3,
        max_prompt_tokens: int = 512,
        max_new_tokens: int = 32,
        system: str = DEFAULT_SYSTEM,
        prompt_template: str = DEFAULT_TEMPLATE,
        memory_template: str = "{text}",
        write_back: bool = True,
        time_aware: bool = True,
        abstain_below: float | None = None,
        abstain_text: str = "I don't know.",
        kv=None,
        kv_context: bool = False,
    ):
        if not isinstance(store, MemoryStore):
            raise ValueError(f"`store` must be a MemoryStore, got {type(store).__name__}")
        if policy is not None and not isinstance(policy, MemoryPolicy):
            raise ValueError(f"`policy` must be a MemoryPolicy, got {type(policy).__name__}")
        for name, template, fields in (
            ("prompt_template", prompt_template, ("{memories}",)),
            ("memory_template", memory_template, ("{text}",)),
        ):
            if not isinstance(template, str) or not all(f in template for f in fields):
                raise ValueError(f"`{name}` must be a string containing {', '.join(fields)}")
        self.llm = TransformersLLM(model, tokenizer)
        self.tokenizer = tokenizer
        self.store = store
        self.policy = policy if policy is not None else RetrievalPolicy()
        self.k = check_int("k", k, low=1)
        self.max_prompt_tokens = check_int("max_prompt_tokens", max_prompt_tokens, low=1)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        self.system = system
        self.prompt_template = prompt_template
        self.memory_template = memory_template
        self.write_back = bool(write_back)
        self.time_aware = bool(time_aware)
        self.abstain_below = None if abstain_below is None else check_real("abstain_below", abstain_below)
        self.abstain_text = abstain_text
        if kv is not None:
            from .kv import KVMemory

            if not isinstance(kv, KVMemory) or kv.model is not model:
                raise ValueError("`kv` must be a KVMemory built on the agent's model")
        self.kv = kv
        self.kv_context = bool(kv_context)
        #: The :class:`AgentReply` of the last :meth:`chat` turn (retrieved memories, prompt, token count).
        self.last_reply: AgentReply | None = None

    def remember(self, text_or_messages: Any, *, session_id: str | None, timestamp: Any, **kwargs) -> str:
        """Writes a memory through the policy; returns its id."""
        return self.policy.ingest(self.store, text_or_messages, session_id=session_id, timestamp=timestamp, **kwargs)

    @staticmethod
    def _in_prompt_order(memories: list[MemoryRecord]) -> list[MemoryRecord]:
        return sorted(memories, key=lambda r: (r.timestamp, r.valid_from))

    def _render(self, memories: list[MemoryRecord], question: str) -> str:
        lines = []
        for index, r in enumerate(self._in_prompt_order(memories)):
            date = datetime.fromtimestamp(r.timestamp, tz=timezone.utc).strftime("%Y-%m-%d")
            lines.append(
                self.memory_template.format(text=r.text, date=date, session_id=r.session_id or "", index=index)
            )
        return self.prompt_template.format(system=self.system, memories="\n".join(lines), question=question)

    def build_prompt(self, question: str, memories: list[MemoryRecord]) -> tuple[str, list[MemoryRecord]]:
        """The prompt with as many of ``memories`` (best first) as fit in ``max_prompt_tokens``, and those shown."""
        if self.llm.count_tokens(self._render([], question)) + 1 > self.max_prompt_tokens:
            raise ValueError(
                f"`max_prompt_tokens` ({self.max_prompt_tokens}) is smaller than the prompt without any memory"
            )
        shown: list[MemoryRecord] = []
        for memory in memories:
            # +1: the BOS token the tokenizer may add.
            if self.llm.count_tokens(self._render([*shown, memory], question)) + 1 <= self.max_prompt_tokens:
                shown.append(memory)
        return self._render(shown, question), shown

    def answer(self, question: str, *, now: Any, as_of: Any = None, filter: dict[str, Any] | None = None) -> AgentReply:
        """Answers ``question`` from memory at time ``now`` without writing anything back."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("`question` must be a non-empty string")
        seconds = to_seconds(now, "now")
        if as_of is None and self.time_aware:
            named = date_in_question(question)
            as_of = None if named is None else min(named.timestamp(), seconds)
        retrieved = self.policy.retrieve(self.store, question, self.k, now=seconds, as_of=as_of, filter=filter)
        as_of_seconds = None if as_of is None else to_seconds(as_of, "as_of")
        if self.abstain_below is not None and (not retrieved or retrieved[0].score < self.abstain_below):
            return AgentReply(self.abstain_text, retrieved, [], "", 0, abstained=True, as_of=as_of_seconds)
        prompt, shown = self.build_prompt(question, retrieved)
        shown = self._in_prompt_order(shown)
        extra: dict[str, Any] = {}
        if self.kv is not None and shown:
            text, prompt_tokens = self._generate_from_state(question, shown)
            extra["reprefill_tokens"] = self.llm.count_tokens(prompt) + 1
        else:
            text = self.llm.generate(prompt, self.max_new_tokens)
            prompt_tokens = self.llm.last_prompt_tokens
        text = text.strip()
        self.policy.after_answer(self.store, question, shown, text, now=seconds)
        return AgentReply(text, retrieved, shown, prompt, prompt_tokens, as_of=as_of_seconds, extra=extra)

    def _generate_from_state(self, question: str, shown: list[MemoryRecord]) -> tuple[str, int]:
        """Generates over the shown memories' stored KV states (encoded and stored on first use)."""
        sentinel = "\x00MEMORIES\x00"
        prefix, suffix = self.prompt_template.format(system=self.system, memories=sentinel, question=question).split(
            sentinel
        )
        states = []
        for index, r in enumerate(shown):
            date = datetime.fromtimestamp(r.timestamp, tz=timezone.utc).strftime("%Y-%m-%d")
            line = self.memory_template.format(text=r.text, date=date, session_id=r.session_id or "", index=index)
            context = prefix if self.kv_context else None
            text = line if context is None else context + "\x00" + line
            encoder = f"{self.kv.fingerprint}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"
            blob = self.store.get_kv(r.id, r.version, encoder)
            if blob is None:
                state = self.kv.encode(line + "\n", context=context)
                self.store.set_kv(r.id, r.version, encoder, self.kv.to_bytes(state))
            else:
                state = self.kv.from_bytes(blob)
            states.append(state)
        # The memories are encoded as ``line + "\n"``: the newline that joins the last one to the suffix moves there.
        suffix = suffix[1:] if suffix.startswith("\n") else suffix
        return self.kv.generate(prefix, states, suffix, self.max_new_tokens)

    def chat(self, message: str, *, now: Any, session_id: str | None = None, user_id: str | None = None) -> str:
        """One turn: answer ``message`` from memory at ``now``; with ``write_back`` store the message and reply."""
        if not isinstance(message, str) or not message.strip():
            raise ValueError("`message` must be a non-empty string")
        reply = self.answer(message, now=now)
        if self.write_back:
            self.remember(message, session_id=session_id, timestamp=now, user_id=user_id, metadata={"role": "user"})
            if reply.text:
                self.remember(
                    reply.text, session_id=session_id, timestamp=now, user_id=user_id, metadata={"role": "assistant"}
                )
        self.last_reply = reply
        return reply.text
