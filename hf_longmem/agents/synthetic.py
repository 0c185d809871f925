"""``synthetic_chat_history``: an offline chat history in LongMemEval's schema, fitted to any tokenizer.

Each of ``num_sessions`` sessions (one a day) plants one fact in one user turn among filler turns::

    "tiger : The pass key is 48213. Remember it. 48213 is the pass key."

A share ``update_fraction`` of the facts is re-assigned later: a user turn of a later session states the same subject
with a new value (a knowledge update that must supersede). Questions, one LongMemEval item each (the items share the
haystack; ``has_answer`` marks the evidence turn of each item):

- ``single-session-user``: "What is the pass key of tiger?" about a fact never updated (cycling through them);
- ``knowledge-update``: the same question about an updated fact; the answer is the new value, the evidence the
  update's session;
- ``temporal-reasoning``: "What was the pass key of tiger on 2024/01/07?" with a date between the fact and its update;
  the answer is the old value;
- abstention (``question_id`` ending in ``_abs``, type ``single-session-user``): a subject never mentioned.

The words come from the vocabulary of the package's synthetic tasks, so the embedded tiny model's closed tokenizer
reads every one of them; a subject word the given tokenizer maps to its unknown token is skipped. Sessions are filled
with filler turns until each holds ``session_tokens`` tokens of that tokenizer.
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from hf_longmem.evals.haystack import FILLER_SENTENCES
from hf_longmem.evals.tasks import KEY_WORDS
from hf_longmem.validation import check_int, check_ratio

from .longmemeval import format_date

__all__ = ["FACT_TEMPLATE", "QUESTION_TEMPLATE", "fact_subject", "synthetic_chat_history"]

FACT_TEMPLATE = "{subject} : The pass key is {value}. Remember it. {value} is the pass key."
QUESTION_TEMPLATE = "What is the pass key of {subject}?"
TEMPORAL_TEMPLATE = "What was the pass key of {subject} on {date}?"
ABSTENTION_ANSWER = "The pass key of {subject} was never mentioned."
_FACT = re.compile(r"^(\w+) : The pass key is \d+\.")
START = datetime(2024, 1, 1, 9, 0, tzinfo=timezone.utc)


def fact_subject(text: str) -> str | None:
    """The subject of a planted fact (``"tiger"``), else ``None``: the ``supersede_key`` of this data set."""
    match = _FACT.match(text)
    return None if match is None else match[1]


def _count_tokens(tokenizer: Any, turns: list[dict[str, Any]]) -> int:
    return len(tokenizer(" ".join(t["content"] for t in turns), add_special_tokens=False)["input_ids"])


def _usable_subjects(tokenizer: Any) -> list[str]:
    unk = getattr(tokenizer, "unk_token_id", None)
    words = []
    for word in KEY_WORDS:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if unk is None or unk not in ids:
            words.append(word)
    return words


def synthetic_chat_history(
    tokenizer: Any,
    num_sessions: int = 32,
    seed: int = 0,
    *,
    update_fraction: float = 0.0,
    num_questions: int = 50,
    num_abstention: int = 4,
    session_tokens: int = 256,
    num_digits: int = 5,
) -> list[dict[str, Any]]:
    """LongMemEval items (the official schema) over one generated history.

    Args:
        tokenizer: counts the tokens of each session (and vets the subject words).
        num_sessions: sessions, one fact each, one day apart.
        seed: everything is a function of the seed.
        update_fraction: share of the facts re-assigned in a later session.
        num_questions: items returned; the update and temporal questions (one per update) and ``num_abstention``
            come first, the rest are single-session questions cycling through the facts never updated.
        num_abstention: abstention questions (subjects never mentioned).
        session_tokens: filler turns are added until a session holds at least this many tokens.
        num_digits: digits of each value.

    Returns:
        ``num_questions`` dicts with LongMemEval's fields.
    """
    num_sessions = check_int("num_sessions", num_sessions, low=2)
    seed = check_int("seed", seed)
    update_fraction = check_ratio("update_fraction", update_fraction, include_zero=True, include_one=False)
    num_questions = check_int("num_questions", num_questions, low=1)
    num_abstention = check_int("num_abstention", num_abstention, low=0)
    session_tokens = check_int("session_tokens", session_tokens, low=16)
    num_digits = check_int("num_digits", num_digits, low=1, high=18)
    if not callable(tokenizer):
        raise ValueError(f"`tokenizer` must be a callable Hugging Face tokenizer, got {type(tokenizer).__name__}")
    subjects = _usable_subjects(tokenizer)
    if len(subjects) < num_sessions + num_abstention:
        raise ValueError(
            f"`num_sessions` + `num_abstention` ({num_sessions + num_abstention}) exceeds the {len(subjects)} subject "
            "words this tokenizer reads"
        )
    rng = random.Random(f"synthetic_chat_history:{seed}")
    rng.shuffle(subjects)
    planted, unused = subjects[:num_sessions], subjects[num_sessions : num_sessions + num_abstention]

    def value() -> str:
        return str(rng.randrange(10 ** (num_digits - 1), 10**num_digits))

    values = {s: value() for s in planted}
    # Updates: facts of the first sessions that have a later session; each lands in a strictly later session.
    num_updates = round(update_fraction * num_sessions)
    updated = rng.sample(range(num_sessions - 1), min(num_updates, num_sessions - 1))
    updates = {}  # fact index -> (session index, new value)
    for i in updated:
        new = value()
        while new == values[planted[i]]:
            new = value()
        updates[i] = (rng.randrange(i + 1, num_sessions), new)
    if len(updates) * 2 + num_abstention > num_questions:
        raise ValueError(
            f"`num_questions` ({num_questions}) must cover {len(updates)} update, {len(updates)} temporal and "
            f"{num_abstention} abstention questions"
        )

    # Sessions: (id, date, turns); the planted and update turns are tagged to set has_answer per item.
    session_ids = [f"session_{i:03d}" for i in range(num_sessions)]
    dates = [START + timedelta(days=i) for i in range(num_sessions)]
    statements: list[list[tuple[str, str]]] = [[("fact", planted[i])] for i in range(num_sessions)]
    for i, (where, _) in updates.items():
        statements[where].append(("update", planted[i]))
    sessions = []
    for i in range(num_sessions):
        turns: list[dict[str, Any]] = []
        for kind, subject in statements[i]:
            v = updates[planted.index(subject)][1] if kind == "update" else values[subject]
            turns.append(
                {"role": "user", "content": FACT_TEMPLATE.format(subject=subject, value=v), "_tag": (kind, subject)}
            )
            turns.append({"role": "assistant", "content": "I will memorize it."})

        while _count_tokens(tokenizer, turns) < session_tokens:
            filler = " ".join(rng.choice(FILLER_SENTENCES) for _ in range(rng.randint(2, 4)))
            position = 2 * rng.randint(0, len(turns) // 2)
            turns[position:position] = [{"role": "user", "content": filler}, {"role": "assistant", "content": filler}]
        sessions.append(turns)

    def haystack(evidence: tuple[str, str] | None) -> list[list[dict[str, Any]]]:
        out = []
        for turns in sessions:
            copy = []
            for t in turns:
                turn = {"role": t["role"], "content": t["content"]}
                if t["role"] == "user":
                    turn["has_answer"] = evidence is not None and t.get("_tag") == evidence
                copy.append(turn)
            out.append(copy)
        return out

    question_date = format_date(dates[-1] + timedelta(days=1))
    items = []

    def item(qid: str, qtype: str, question: str, answer: str, evidence: tuple[str, str] | None, sids: list[str]):
        items.append(
            {
                "question_id": qid,
                "question_type": qtype,
                "question": question,
                "answer": answer,
                "question_date": question_date,
                "haystack_session_ids": list(session_ids),
                "haystack_dates": [format_date(d) for d in dates],
                "haystack_sessions": haystack(evidence),
                "answer_session_ids": sids,
            }
        )

    for i, (where, new) in sorted(updates.items()):
        s = planted[i]
        item(
            f"synth{seed}_ku_{s}",
            "knowledge-update",
            QUESTION_TEMPLATE.format(subject=s),
            new,
            ("update", s),
            [session_ids[where]],
        )
    for i, (where, _) in sorted(updates.items()):
        s = planted[i]
        day = dates[i] + timedelta(days=rng.randrange(0, where - i))  # on or after the fact, before the update
        question = TEMPORAL_TEMPLATE.format(subject=s, date=day.strftime("%Y/%m/%d"))
        item(f"synth{seed}_temp_{s}", "temporal-reasoning", question, values[s], ("fact", s), [session_ids[i]])
    for s in unused:
        item(
            f"synth{seed}_{s}_abs",
            "single-session-user",
            QUESTION_TEMPLATE.format(subject=s),
            ABSTENTION_ANSWER.format(subject=s),
            None,
            [],
        )
    stable = [i for i in range(num_sessions) if i not in updates]
    n = 0
    while len(items) < num_questions:
        i = stable[n % len(stable)]
        s = planted[i]
        item(
            f"synth{seed}_ss_{s}_{n // len(stable)}",
            "single-session-user",
            QUESTION_TEMPLATE.format(subject=s),
            values[s],
            ("fact", s),
            [session_ids[i]],
        )
        n += 1
    return items[:num_questions]
