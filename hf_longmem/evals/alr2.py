"""ALR²-style retrieve-then-reason over multi-hop fact chains (Li et al., 2024, "ALR²: A retrieve-then-reason
framework for long-context question answering").

ALR² makes the model first write the facts it needs from the long context, then answer from them, and scores both
steps: answer exact match, precision/recall of the retrieved facts against the supporting facts, and the rate of
*hallucinated* facts (retrieved lines that are not in the context). Here the context is a seeded set of fictional
fact chains (``"Ravi was born in Lantern."``, ``"Lantern is located in Falcon."``, ...), one chain asked, the others
distractors; the question needs every hop of its chain.

The turn's answer is the chain's end; ``meta["supporting_facts"]`` lists the chain's sentences. The task metric
``"alr2_answer"`` scores the text after ``"Answer:"``; :func:`retrieval_scores` and :func:`alr2_report` add the
retrieval and hallucination scores from the runner's records.

Deviations, and why: fictional chains instead of ALR²'s long HotpotQA/SQuAD (their texts are CC BY-SA and ALR²'s data
is not released); facts are whole sentences, matched after whitespace and case normalisation (ALR² matches
retrieved sentences against the supporting-fact sentences the same way, by string).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hf_longmem.validation import check_int

from .haystack import count_tokens, fit_num_units
from .longgenbench import NAMES
from .metrics import METRICS
from .ruler import WORDS, known_words
from .schema import Sample, Turn
from .tasks import _check_common, _max_new_tokens, register_task

INSTRUCTION = (
    "Read the following facts. To answer the question after them, first retrieve the facts you need, one per line "
    "after 'Facts:', exactly as written; then give the answer after 'Answer:'."
)
HOPS = (
    "{0} was born in {1}.",
    "{0} is located in {1}.",
    "{0} is part of the region of {1}.",
    "{0} belongs to the kingdom of {1}.",
)
QUESTIONS = {
    1: "In which place was {0} born?",
    2: "In which place is the birthplace of {0} located?",
    3: "Which region is the birthplace of {0} part of?",
    4: "Which kingdom does the region of the birthplace of {0} belong to?",
}
QUERY = "\nQuestion: {question} Retrieve the facts, then answer.\nFacts:"
_ANSWER = re.compile(r"Answer:\s*(.*)", re.IGNORECASE | re.DOTALL)


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def split_response(prediction: str) -> tuple[list[str], str | None]:
    """``(retrieved fact lines, answer)`` of a response that continues ``"Facts:"``; answer ``None`` if absent."""
    match = _ANSWER.search(prediction)
    facts_text = prediction[: match.start()] if match else prediction
    facts = [line.strip(" -*\t") for line in facts_text.splitlines() if line.strip(" -*\t")]
    answer = match.group(1).strip().splitlines()[0].strip() if match and match.group(1).strip() else None
    return facts, answer


def alr2_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the text after ``"Answer:"`` equals an accepted answer (case, spaces and periods ignored)."""
    _, answer = split_response(prediction)
    return float(answer is not None and any(_norm(answer) == _norm(a) for a in answers))


METRICS["alr2_answer"] = alr2_answer


def retrieval_scores(prediction: str, supporting: Sequence[str], context: str) -> dict[str, float]:
    """Retrieval precision/recall against the supporting facts and the hallucinated-fact rate.

    Args:
        prediction: the response (retrieved facts, then ``"Answer: ..."``).
        supporting: the supporting-fact sentences.
        context: the context the facts had to come from.

    Returns:
        ``retrieval_precision`` (retrieved lines that are supporting facts; 0 when none retrieved),
        ``retrieval_recall`` (supporting facts retrieved), ``hallucination_rate`` (retrieved lines that are no
        sentence of the context; 0 when none retrieved), ``num_retrieved``.
    """
    retrieved = [_norm(f) for f in split_response(prediction)[0]]
    gold = {_norm(s) for s in supporting}
    sentences = {_norm(s) for s in re.findall(r"[^.\n]+\.", context)}
    hits = sum(f in gold for f in retrieved)
    return {
        "retrieval_precision": hits / len(retrieved) if retrieved else 0.0,
        "retrieval_recall": len(gold & set(retrieved)) / len(gold) if gold else 1.0,
        "hallucination_rate": sum(f not in sentences for f in retrieved) / len(retrieved) if retrieved else 0.0,
        "num_retrieved": float(len(retrieved)),
    }


def alr2_report(records: Sequence[Mapping[str, Any]], samples: Sequence[Sample]) -> dict[str, float]:
    """Means over the records of :func:`multihop_facts` samples: ``answer`` (the task score) and the
    :func:`retrieval_scores`."""
    by_id = {s.id: s for s in samples}
    rows = []
    for record in records:
        sample = by_id[record["sample_id"]]
        scores = retrieval_scores(record["prediction"], sample.meta["supporting_facts"], sample.context)
        rows.append({"answer": alr2_answer(record["prediction"], record["answers"]), **scores})
    if not rows:
        raise ValueError("no records to report")
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


@dataclass(frozen=True)
class _World:
    """A consistent fictional world: every person has one birthplace, every place one parent place a level up."""

    people: list[str]
    birthplace: dict[str, str]
    parent: dict[str, str]
    num_hops: int

    @classmethod
    def draw(cls, rng: random.Random, first_names: list[str], words: list[str], num_hops: int) -> _World:
        words = rng.sample(words, len(words))
        size = len(words) // (num_hops + 1)
        surnames, levels = words[:size], [words[(j + 1) * size : (j + 2) * size] for j in range(num_hops)]
        people = [f"{first} {last}" for last in surnames for first in first_names]
        rng.shuffle(people)
        birthplace = {person: rng.choice(levels[0]) for person in people}
        parent = {place: rng.choice(levels[j + 1]) for j in range(num_hops - 1) for place in levels[j]}
        return cls(people, birthplace, parent, num_hops)

    def chain(self, person: str) -> list[str]:
        """``[person, birthplace, its parent, ...]`` (``num_hops + 1`` entities)."""
        entities = [person, self.birthplace[person]]
        while len(entities) < self.num_hops + 1:
            entities.append(self.parent[entities[-1]])
        return entities

    def facts(self, person: str) -> list[str]:
        chain = self.chain(person)
        return [HOPS[h].format(chain[h], chain[h + 1]) for h in range(self.num_hops)]


@register_task("multihop_facts", metric="alr2_answer")
def multihop_facts(tokenizer: Any, length: int, num_samples: int, seed: int = 0, *, num_hops: int = 2) -> list[Sample]:
    """ALR²-style: fact chains of ``num_hops`` hops, one asked; the model retrieves the facts, then answers.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`hf_longmem.evals.tasks.passkey`; the number of other
            people whose chains fill the context is fitted to ``length``.
        num_hops: facts in the asked chain (1 to 4): born in -> located in -> region of -> kingdom of.

    Returns:
        Single-turn samples; ``answers`` is the chain's last entity, ``meta["supporting_facts"]`` its facts. Facts
        shared by several chains (two people born in the same place) appear once.
    """
    _check_common(tokenizer, length, num_samples, seed)
    check_int("num_hops", num_hops, low=1, high=len(HOPS))
    words = known_words(tokenizer, [w.capitalize() for w in WORDS])
    first_names = known_words(tokenizer, NAMES)
    if len(words) < 2 * (num_hops + 1) or not first_names:  # a closed vocabulary without them: spell them anyway
        words, first_names = [w.capitalize() for w in WORDS], list(NAMES)
    samples = []
    for index in range(num_samples):
        rng = random.Random(f"multihop_facts:{seed}:{index}")
        world = _World.draw(rng, first_names, words, num_hops)
        asked, others = world.people[0], world.people[1:]
        key = rng.random()
        query = QUERY.format(question=QUESTIONS[num_hops].format(asked))

        def render(n: int, world: _World = world, asked: str = asked, others: list[str] = others, key=key) -> str:
            sentences = list(dict.fromkeys(f for person in [asked, *others[:n]] for f in world.facts(person)))
            sentences.sort(key=lambda text: random.Random(f"{key}:{text}").random())
            return INSTRUCTION + "\n" + " ".join(sentences)

        def count(n: int, render=render, query: str = query, limit: int = len(others)) -> int:
            return length + 1 if n > limit else count_tokens(tokenizer, render(n) + query)

        n, num_tokens = fit_num_units(count, length)
        supporting = world.facts(asked)
        answer = world.chain(asked)[-1]
        budget = _max_new_tokens(tokenizer, " " + "\n".join(supporting) + "\nAnswer: " + answer)
        meta = {
            "length": length,
            "num_tokens": num_tokens,
            "num_hops": num_hops,
            "num_people": n + 1,
            "supporting_facts": supporting,
            "seed": seed,
            "index": index,
        }
        turn = Turn(query=query, answers=[answer], max_new_tokens=budget)
        samples.append(Sample(f"multihop_facts-{seed}-{index}", "multihop_facts", render(n), [turn], meta))
    return samples
