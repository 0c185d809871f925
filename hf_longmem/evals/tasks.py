"""Seeded synthetic long-context tasks: passkey, multi-key needle, variable tracking, shared context.

Every generator has the signature ``(tokenizer, length, num_samples, seed=0, **options) -> list[Sample]``.
The prompt (``context + turns[0].query``) is fitted to ``length`` tokens of the given tokenizer by adding
or removing filler sentences: ``meta["num_tokens"]`` is its real token count (special tokens such as BOS
included), at most ``length`` and short of it by less than one filler sentence.

Conventions:

- The context ends with a sentence; every query starts with ``"\\n"`` and ends right where the answer
  starts, **without** a trailing space (``"... The pass key is"``).
- Answers are stored **without** leading whitespace (``"71432"``). A model continues the query with a space
  and the answer (the embedded tiny model emits ``" 71432"`` then EOS); the harness strips whitespace before
  an exact-match comparison.
- In multi-turn (append) use, each golden answer is appended as ``" " + answer`` followed by the EOS token,
  which is how the embedded tiny model was trained on :func:`shared_context` samples.
- Sample ``i`` of seed ``s`` depends on ``(task, s, i)`` only, so a longer list extends a shorter one.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from hf_longmem.validation import check_int

from .haystack import FILLER_SENTENCES, Plant, count_tokens, fit_num_units, render_haystack
from .schema import Sample, Turn

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
NEEDLE_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
VARIABLE_INTRO = "Memorize and track the chain of variable assignment hidden in the following text."

PASSKEY_STATEMENT = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUERY = "\nWhat is the pass key? The pass key is"
NEEDLE_STATEMENT = "One of the special magic numbers for {key} is: {value}."
NEEDLE_QUERY = (
    "\nWhat is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
VARIABLE_FIRST = "VAR {name} = {value}."
VARIABLE_NEXT = "VAR {name} = VAR {previous}."
VARIABLE_QUERY = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above. "
    "Answer: The variables assigned the value {value} are:"
)

#: Keys of the multi-key needles (our own list: common nouns, one word each).
KEY_WORDS: tuple[str, ...] = (
    "apple",
    "river",
    "candle",
    "tiger",
    "garden",
    "violin",
    "pepper",
    "island",
    "rocket",
    "marble",
    "forest",
    "lemon",
    "anchor",
    "pillow",
    "falcon",
    "meadow",
    "copper",
    "bridge",
    "cactus",
    "helmet",
    "jacket",
    "ladder",
    "magnet",
    "needle",
    "orange",
    "parrot",
    "quartz",
    "saddle",
    "tunnel",
    "velvet",
    "walnut",
    "yogurt",
    "barrel",
    "camera",
    "dragon",
    "engine",
    "feather",
    "glacier",
    "harbor",
    "insect",
    "jungle",
    "kettle",
    "lantern",
    "mirror",
    "nickel",
    "oyster",
    "planet",
    "rabbit",
    "silver",
    "teapot",
    "button",
    "valley",
    "window",
    "zebra",
    "basket",
    "cherry",
    "dolphin",
    "eagle",
    "fossil",
    "guitar",
    "hammer",
    "igloo",
    "kitten",
    "lobster",
)

#: Variable names of the variable-tracking chains (one capital letter each; I and O left out).
VARIABLE_NAMES: tuple[str, ...] = tuple("ABCDEFGHJKLMNPQRSTUVWXYZ")


@dataclass(frozen=True)
class Fact:
    """A fact planted in the context and the question that asks for it.

    Attributes:
        statements: sentences planted in this order (a variable chain has several).
        query: question text, starting with ``"\\n"`` and ending where the answer starts.
        answer: canonical answer, without leading whitespace.
    """

    statements: tuple[str, ...]
    query: str
    answer: str


def _number(rng: random.Random, num_digits: int) -> str:
    """A random ``num_digits``-digit decimal string without a leading zero."""
    return str(rng.randrange(10 ** (num_digits - 1), 10**num_digits))


def _distinct_numbers(rng: random.Random, count: int, num_digits: int) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = _number(rng, num_digits)
        if value not in values:
            values.append(value)
    return values


def passkey_facts(rng: random.Random, num_facts: int, *, num_digits: int = 5) -> list[Fact]:
    """``num_facts`` (always 1) pass-key facts: "The pass key is N. Remember it. N is the pass key."."""
    value = _number(rng, num_digits)
    return [Fact((PASSKEY_STATEMENT.format(value=value),), PASSKEY_QUERY, value)]


def needle_facts(rng: random.Random, num_facts: int, *, num_digits: int = 7) -> list[Fact]:
    """``num_facts`` RULER multi-key needles with distinct keys from :data:`KEY_WORDS` and distinct values."""
    keys = rng.sample(KEY_WORDS, num_facts)
    values = _distinct_numbers(rng, num_facts, num_digits)
    return [
        Fact((NEEDLE_STATEMENT.format(key=key, value=value),), NEEDLE_QUERY.format(key=key), value)
        for key, value in zip(keys, values)
    ]


def chain_facts(rng: random.Random, num_facts: int, *, num_hops: int = 2, num_digits: int = 5) -> list[Fact]:
    """``num_facts`` RULER variable chains ``VAR X = v``, ``VAR Y = VAR X``, ... of ``num_hops`` hops each.

    The answer lists the chain's ``num_hops + 1`` names in chain order, separated by single spaces.
    """
    names = rng.sample(VARIABLE_NAMES, num_facts * (num_hops + 1))
    values = _distinct_numbers(rng, num_facts, num_digits)
    facts = []
    for index, value in enumerate(values):
        chain = names[index * (num_hops + 1) : (index + 1) * (num_hops + 1)]
        statements = [VARIABLE_FIRST.format(name=chain[0], value=value)]
        statements += [VARIABLE_NEXT.format(name=name, previous=previous) for previous, name in zip(chain, chain[1:])]
        facts.append(Fact(tuple(statements), VARIABLE_QUERY.format(value=value), " ".join(chain)))
    return facts


FactMaker = Callable[[random.Random, int], list[Fact]]


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    check_int(name, value, low=low, high=high)


def _check_depth(depth: float | None) -> None:
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1):
        raise ValueError(f"depth must be a number in [0, 1] or None, got {depth!r}")


def _check_common(tokenizer: Any, length: int, num_samples: int, seed: int) -> None:
    if not callable(tokenizer):
        raise ValueError(f"tokenizer must be a callable Hugging Face tokenizer, got {type(tokenizer).__name__}")
    _check_int("length", length, 1)
    _check_int("num_samples", num_samples, 0)
    _check_int("seed", seed, 0)


def _max_new_tokens(tokenizer: Any, answer: str) -> int:
    """Token count of ``" " + answer`` in this tokenizer plus a margin of 4 (room for EOS)."""
    return len(tokenizer(" " + answer, add_special_tokens=False, verbose=False)["input_ids"]) + 4


def _build_sample(
    task: str,
    tokenizer: Any,
    length: int,
    seed: int,
    index: int,
    intro: str,
    make_facts: FactMaker,
    num_facts: int,
    num_questions: int,
    depth: float | None,
    meta: dict[str, Any],
) -> Sample:
    """One sample: plant ``num_facts`` facts, ask ``num_questions`` of them, fit the filler to ``length``."""
    rng = random.Random(f"{task}:{seed}:{index}")
    facts = make_facts(rng, num_facts)
    asked = rng.sample(range(num_facts), num_questions)
    plants: list[Plant] = []
    first_depths: dict[int, float] = {}
    for fact_index, fact in enumerate(facts):
        if len(fact.statements) == 1 and depth is not None and fact_index == asked[0]:
            depths = [float(depth)]
        else:
            depths = sorted(rng.random() for _ in fact.statements)
        first_depths[fact_index] = depths[0]
        plants.extend(Plant(d, text) for d, text in zip(depths, fact.statements))
    first_query = facts[asked[0]].query
    num_units, num_tokens = fit_num_units(
        lambda n: count_tokens(tokenizer, render_haystack(intro, plants, n) + first_query), length
    )
    turns = [
        Turn(
            query=facts[i].query, answers=[facts[i].answer], max_new_tokens=_max_new_tokens(tokenizer, facts[i].answer)
        )
        for i in asked
    ]
    sample_meta = {
        "length": length,
        "num_tokens": num_tokens,
        "depth": first_depths[asked[0]],
        "depths": [first_depths[i] for i in asked],
        "num_facts": num_facts,
        "num_filler_sentences": num_units,
        "seed": seed,
        "index": index,
        **meta,
    }
    context = render_haystack(intro, plants, num_units)
    return Sample(id=f"{task}-{seed}-{index}", task=task, context=context, turns=turns, meta=sample_meta)


@dataclass(frozen=True)
class _Spec:
    """How a generator plants its facts: the instruction, the fact maker and its validated options."""

    intro: str
    make_facts: FactMaker
    num_facts: int
    depth: float | None
    meta: dict[str, Any]


def _passkey_spec(*, depth: float | None = None, num_digits: int = 5) -> _Spec:
    _check_depth(depth)
    _check_int("num_digits", num_digits, 1, 20)
    make = partial(passkey_facts, num_digits=num_digits)
    return _Spec(PASSKEY_INTRO, make, 1, depth, {"num_digits": num_digits})


def _needle_spec(*, num_needles: int = 4, depth: float | None = None, num_digits: int = 7) -> _Spec:
    _check_int("num_needles", num_needles, 1, len(KEY_WORDS))
    _check_depth(depth)
    _check_int("num_digits", num_digits, 1, 20)
    make = partial(needle_facts, num_digits=num_digits)
    return _Spec(NEEDLE_INTRO, make, num_needles, depth, {"num_needles": num_needles, "num_digits": num_digits})


def _chain_spec(*, num_chains: int = 1, num_hops: int = 2, num_digits: int = 5) -> _Spec:
    _check_int("num_hops", num_hops, 0, len(VARIABLE_NAMES) - 1)
    _check_int("num_chains", num_chains, 1, len(VARIABLE_NAMES) // (num_hops + 1))
    _check_int("num_digits", num_digits, 1, 20)
    make = partial(chain_facts, num_hops=num_hops, num_digits=num_digits)
    meta = {"num_chains": num_chains, "num_hops": num_hops, "num_digits": num_digits}
    return _Spec(VARIABLE_INTRO, make, num_chains, None, meta)


def _generate(
    task: str, spec: _Spec, tokenizer: Any, length: int, num_samples: int, seed: int, num_questions: int = 1
) -> list[Sample]:
    _check_common(tokenizer, length, num_samples, seed)
    return [
        _build_sample(
            task,
            tokenizer,
            length,
            seed,
            index,
            spec.intro,
            spec.make_facts,
            spec.num_facts,
            num_questions,
            spec.depth,
            spec.meta,
        )
        for index in range(num_samples)
    ]


def passkey(
    tokenizer: Any, length: int, num_samples: int, seed: int = 0, *, depth: float | None = None, num_digits: int = 5
) -> list[Sample]:
    """Landmark-attention passkey retrieval.

    Args:
        tokenizer: any Hugging Face tokenizer; ``length`` is measured in its tokens.
        length: target prompt length (context + query) in tokens.
        num_samples: number of samples.
        seed: base seed.
        depth: relative depth of the pass-key line in ``[0, 1]``; ``None`` draws it uniformly per sample.
        num_digits: digits of the pass key.

    Returns:
        ``num_samples`` single-turn samples; the answer is the pass key, e.g. ``"71432"``.
    """
    return _generate("passkey", _passkey_spec(depth=depth, num_digits=num_digits), tokenizer, length, num_samples, seed)


def multikey_needle(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    num_needles: int = 4,
    depth: float | None = None,
    num_digits: int = 7,
) -> list[Sample]:
    """RULER ``niah_multikey_1``: ``num_needles`` "special magic number" needles in filler, one is asked.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`passkey`.
        num_needles: needles planted (distinct keys from :data:`KEY_WORDS`).
        depth: relative depth of the asked needle; ``None`` draws it. The other needles are at random depths.
        num_digits: digits of each value.

    Returns:
        Single-turn samples; the answer is the asked needle's value, e.g. ``"4093217"``.
    """
    spec = _needle_spec(num_needles=num_needles, depth=depth, num_digits=num_digits)
    return _generate("multikey_needle", spec, tokenizer, length, num_samples, seed)


def variable_tracking(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    num_chains: int = 1,
    num_hops: int = 2,
    num_digits: int = 5,
) -> list[Sample]:
    """RULER ``vt``: chains ``VAR X = 12345.``, ``VAR Y = VAR X.``, ... spread in filler; one chain is asked.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`passkey`.
        num_chains: chains planted (distinct values and names); one is asked.
        num_hops: assignments after the first, so a chain has ``num_hops + 1`` variables.
        num_digits: digits of each chain's value.

    Returns:
        Single-turn samples; the answer is the chain's names in order, e.g. ``"Q K M"``.
    """
    spec = _chain_spec(num_chains=num_chains, num_hops=num_hops, num_digits=num_digits)
    return _generate("variable_tracking", spec, tokenizer, length, num_samples, seed)


_SHARED_SPECS: dict[str, Callable[..., _Spec]] = {
    "passkey": _passkey_spec,
    "multikey_needle": _needle_spec,
    "variable_tracking": _chain_spec,
}
_FACT_COUNT_OPTION = {"passkey": None, "multikey_needle": "num_needles", "variable_tracking": "num_chains"}


def shared_context(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    generator: str = "multikey_needle",
    num_questions: int = 4,
    **options: Any,
) -> list[Sample]:
    """SCBench-style shared context: one context with several planted facts, one ``Turn`` per asked fact.

    The harness answers the turns in rollback mode (cache restored per question) or append mode (each
    query and answer appended). The length is fitted on ``context + turns[0].query``.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`passkey`.
        generator: which facts to plant: ``"multikey_needle"`` or ``"variable_tracking"`` (``"passkey"``
            plants a single fact, so it allows ``num_questions=1`` only).
        num_questions: distinct facts asked, in random order.
        **options: options of ``generator``; its fact count (``num_needles`` / ``num_chains``) defaults to
            ``num_questions`` (at least 4 needles for ``multikey_needle``).

    Returns:
        Samples of task ``"shared_context"`` with ``num_questions`` turns; ``meta["generator"]`` names the facts.
    """
    if generator not in _SHARED_SPECS:
        raise ValueError(f"generator must be one of {sorted(_SHARED_SPECS)}, got {generator!r}")
    _check_int("num_questions", num_questions, 1)
    count_option = _FACT_COUNT_OPTION[generator]
    if count_option is not None and count_option not in options:
        options[count_option] = max(num_questions, 4) if generator == "multikey_needle" else num_questions
    try:
        spec = _SHARED_SPECS[generator](**options)
    except TypeError as error:
        raise ValueError(f"bad options for generator={generator!r}: {error}") from error
    if num_questions > spec.num_facts:
        raise ValueError(
            f"num_questions={num_questions} exceeds the {spec.num_facts} fact(s) that generator={generator!r} plants"
            + (f"; raise {count_option}" if count_option else "")
        )
    spec = _Spec(spec.intro, spec.make_facts, spec.num_facts, spec.depth, {**spec.meta, "generator": generator})
    return _generate("shared_context", spec, tokenizer, length, num_samples, seed, num_questions)


TASKS: dict[str, Callable[..., list[Sample]]] = {
    "passkey": passkey,
    "multikey_needle": multikey_needle,
    "variable_tracking": variable_tracking,
    "shared_context": shared_context,
}

#: Modules of further task families; each registers its generators with :func:`register_task` on import.
TASK_MODULES: tuple[str, ...] = ("ruler", "sort", "longgenbench", "longproc", "alr2", "facts")


def register_task(
    name: str, metric: str | None = None
) -> Callable[[Callable[..., list[Sample]]], Callable[..., list[Sample]]]:
    """Decorator registering a generator ``(tokenizer, length, num_samples, seed=0, **options)`` as ``name``.

    Args:
        name: the task name (unique).
        metric: name of its default metric in :data:`hf_longmem.evals.metrics.METRICS` (else ``"exact_match"``).
    """
    from .metrics import METRICS, TASK_METRICS

    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} for task {name!r}; available: {sorted(METRICS)}")

    def register(generator: Callable[..., list[Sample]]) -> Callable[..., list[Sample]]:
        if TASKS.get(name, generator) is not generator:
            raise ValueError(f"task name {name!r} is already registered by {TASKS[name].__module__}")
        TASKS[name] = generator
        if metric is not None:
            TASK_METRICS[name] = metric
        return generator

    return register


def generate_task(
    name: str, tokenizer: Any, length: int, num_samples: int, seed: int = 0, **options: Any
) -> list[Sample]:
    """Run the generator registered as ``name`` in :data:`TASKS`.

    Raises:
        ValueError: for an unknown ``name`` (the message lists the known ones) or bad options.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task name {name!r}; known tasks: {sorted(TASKS)}")
    generator = TASKS[name]
    try:
        inspect.signature(generator).bind(tokenizer, length, num_samples, seed, **options)
    except TypeError as error:
        raise ValueError(f"bad options for task {name!r}: {error}") from error
    return generator(tokenizer, length, num_samples, seed, **options)


def vocabulary_texts() -> list[str]:
    """Texts that together contain every word and symbol the generators can emit (for closed vocabularies)."""
    digits = "0123456789"
    texts = [*FILLER_SENTENCES, PASSKEY_INTRO, NEEDLE_INTRO, VARIABLE_INTRO, PASSKEY_QUERY, digits]
    texts.append(PASSKEY_STATEMENT.format(value=digits))
    for key in KEY_WORDS:
        texts += [NEEDLE_STATEMENT.format(key=key, value=digits), NEEDLE_QUERY.format(key=key), key]
    for name in VARIABLE_NAMES:
        texts += [VARIABLE_FIRST.format(name=name, value=digits), VARIABLE_NEXT.format(name=name, previous=name), name]
    texts.append(VARIABLE_QUERY.format(value=digits))
    return texts


def _import_task_modules() -> None:
    from importlib import import_module

    for module in TASK_MODULES:
        import_module(f"{__package__}.{module}")


_import_task_modules()
