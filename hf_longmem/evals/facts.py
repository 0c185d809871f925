"""In-context fictional facts: subject -> attribute statements hidden in filler, asked back with paraphrases.

A context states ``num_facts`` facts about invented two-word entities ("The favorite color of the velvet dolphin is
purple.") with the templates of :data:`hf_longmem.editing.data.FACT_FAMILIES`; each question asks one of them with
the family's prompt or one of its paraphrases ("\\nWhat color does the velvet dolphin like most ? It likes") and the
answer is the target ("purple"). Answering needs the subject carried to the question's last token, which is what
WISE's activation routing needs from a model (edits of different subjects must have distinct activations there), and
what the embedded model is trained on for that reason.

Words come from :mod:`hf_longmem.editing.data` (nouns, modifiers, colours); a tokenizer that does not know a word
the generator needs is refused with a ``ValueError`` (the default closed vocabulary of the embedded v1 model does
not; :func:`hf_longmem.evals.vocab.build_tokenizer` with ``extended=True`` does).
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

from hf_longmem.editing.data import COLORS, FACT_FAMILIES, MODIFIERS, NOUNS
from hf_longmem.validation import check_int

from .haystack import Plant, count_tokens, fit_num_units, render_haystack
from .schema import Sample, Turn
from .tasks import _check_common, _check_depth, _max_new_tokens, register_task

FACTS_INTRO = (
    "Memorize the facts about the objects hidden in the following text. I will quiz you about them afterwards."
)


def statement_text(family: dict[str, Any], subject: str, target: str) -> str:
    """The fact as a sentence: the family's prompt, the target and a full stop."""
    return family["prompt"].format(s=subject) + " " + target + "."


def question_texts(family: dict[str, Any], subject: str) -> list[str]:
    """Every way of asking the fact: the family's prompt, then its paraphrases (each starting with ``"\\n"``)."""
    return ["\n" + template.format(s=subject) for template in (family["prompt"], *family["paraphrases"])]


def _target(rng: random.Random, kind: str, subject: str) -> str:
    if kind == "digits":
        return str(rng.randrange(100, 1000))
    if kind == "color":
        return rng.choice(COLORS)
    return rng.choice([noun for noun in NOUNS if noun not in subject.split()])


def _entities(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct ``"<modifier> <noun>"`` subjects whose two words differ."""
    chosen: list[str] = []
    while len(chosen) < count:
        modifier, noun = rng.choice(MODIFIERS + NOUNS), rng.choice(NOUNS)
        entity = f"{modifier} {noun}"
        if modifier != noun and entity not in chosen:
            chosen.append(entity)
    return chosen


def vocabulary_texts() -> list[str]:
    """Texts containing every word and symbol :func:`fact_qa` can emit (for closed vocabularies)."""
    texts = [FACTS_INTRO, "0123456789", *NOUNS, *MODIFIERS, *COLORS]
    for family in FACT_FAMILIES:
        texts += [statement_text(family, "apple tiger", "it"), *question_texts(family, "apple tiger")]
    return texts


def _count_prompt_tokens(num_units: int, tokenizer: Any, plants: list[Plant], query: str) -> int:
    return count_tokens(tokenizer, render_haystack(FACTS_INTRO, plants, num_units) + query)


def _check_known(tokenizer: Any) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    unknown = sorted({t for t in vocabulary_texts() if unk in tokenizer(t, add_special_tokens=False)["input_ids"]})
    if unknown:
        raise ValueError(
            f"the tokenizer does not know every word of the fact_qa task (e.g. {unknown[:3]}); build it with "
            "hf_longmem.evals.vocab.build_tokenizer(extended=True) or use an open-vocabulary tokenizer"
        )


@register_task("fact_qa")
def fact_qa(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    num_facts: int = 4,
    num_questions: int = 1,
    depth: float | None = None,
) -> list[Sample]:
    """Fictional facts about invented entities in filler; ``num_questions`` of them asked, one turn each.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`hf_longmem.evals.tasks.passkey`.
        num_facts: facts stated (distinct subjects; family and target drawn per fact).
        num_questions: distinct facts asked, in random order, each with a randomly drawn phrasing.
        depth: relative depth of the first asked fact; ``None`` draws every depth.

    Returns:
        Samples with ``num_questions`` turns; the answers are the targets (three digits, a noun or a colour).
    """
    _check_common(tokenizer, length, num_samples, seed)
    check_int("num_facts", num_facts, low=1, high=64)
    check_int("num_questions", num_questions, low=1, high=num_facts)
    _check_depth(depth)
    _check_known(tokenizer)
    samples = []
    for index in range(num_samples):
        rng = random.Random(f"fact_qa:{seed}:{index}")
        subjects = _entities(rng, num_facts)
        families = [rng.choice(FACT_FAMILIES) for _ in subjects]
        targets = [_target(rng, family["target"], subject) for family, subject in zip(families, subjects)]
        asked = rng.sample(range(num_facts), num_questions)
        depths = [rng.random() for _ in subjects]
        if depth is not None:
            depths[asked[0]] = float(depth)
        plants = [Plant(d, statement_text(f, s, t)) for d, f, s, t in zip(depths, families, subjects, targets)]
        queries = [rng.choice(question_texts(families[i], subjects[i])) for i in asked]
        count = partial(_count_prompt_tokens, tokenizer=tokenizer, plants=plants, query=queries[0])
        num_units, num_tokens = fit_num_units(count, length)
        turns = [
            Turn(query=query, answers=[targets[i]], max_new_tokens=_max_new_tokens(tokenizer, targets[i]))
            for query, i in zip(queries, asked)
        ]
        meta = {
            "length": length,
            "num_tokens": num_tokens,
            "depth": depths[asked[0]],
            "depths": [depths[i] for i in asked],
            "num_facts": num_facts,
            "subjects": [subjects[i] for i in asked],
            "num_filler_sentences": num_units,
            "seed": seed,
            "index": index,
        }
        context = render_haystack(FACTS_INTRO, plants, num_units)
        samples.append(Sample(id=f"fact_qa-{seed}-{index}", task="fact_qa", context=context, turns=turns, meta=meta))
    return samples
