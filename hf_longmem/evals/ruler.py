"""RULER's synthetic tasks (Hsieh et al., 2024, "RULER: What's the real context size of your long-context LMs?").

Generators registered in :data:`hf_longmem.evals.tasks.TASKS` (the instruction, needle, query and answer-prefix texts
are those of NVIDIA/RULER ``scripts/data/synthetic/constants.py`` and ``niah.py``; scoring as its
``scripts/eval/synthetic/constants.py``):

=============================  ============================  ====================================================
task                           RULER task                    metric
=============================  ============================  ====================================================
``niah_single``                ``niah_single_1``             ``string_match_all``
``niah_multikey_haystack``     ``niah_multikey_2``           ``string_match_all`` (the haystack is other needles)
``niah_multivalue``            ``niah_multivalue``           ``string_match_all`` (4 values of one key)
``niah_multiquery``            ``niah_multiquery``           ``string_match_all`` (4 keys asked at once)
``niah``                       any of them, by options       ``string_match_all``
``common_words``               ``cwe``                       ``string_match_all`` (the 10 most common words)
``frequent_words``             ``fwe``                       ``string_match_all`` (the 3 most frequent words)
``qa_squad``/``qa_hotpotqa``   ``qa_1``/``qa_2``             ``string_match_part``
=============================  ============================  ====================================================

RULER's ``niah_multikey_1`` and ``vt`` are :func:`~hf_longmem.evals.tasks.multikey_needle` and
:func:`~hf_longmem.evals.tasks.variable_tracking` (``num_hops=4`` for RULER's setting).

Every generator is seeded (sample ``i`` of seed ``s`` depends on ``(task, s, i)`` only) and fits the prompt
(``context + turns[0].query``) to ``length`` tokens of the given tokenizer, as the generators of
:mod:`hf_longmem.evals.tasks` do. The query ends with RULER's answer prefix (``"... mentioned in the provided text
is"``, ``" Answer:"``).

Deviations from RULER, and why:

- Haystacks are the "noise" sentences (RULER's ``type_haystack=noise``) or other needles; the Paul Graham essay
  haystack needs a download. Filler sentences are joined by spaces (RULER: newlines), as in the other generators.
- Keys and word values are drawn from :data:`WORDS` (common English nouns) instead of wonderwords' adjective-noun
  pairs, restricted to the words the tokenizer encodes without its unknown token (:func:`known_words`), so a closed
  word-level tokenizer such as the embedded model's gets no ``[UNK]`` in keys or answers. The common- and
  frequent-words tasks use that pool too (RULER: an English word list and random 6-letter "coded" words; the coded
  words are used when the tokenizer has no unknown token). A length that needs more distinct words than the pool
  holds is refused with a ``ValueError``.
- RULER picks its common-words frequencies by the *model's* maximum length (``< 4096``: 6/1 with a 3/1 few-shot
  example, else 30/3 with 10/3); we pick them by the requested ``length`` the same way; both can be set.
- QA takes the questions in a seeded order of the file instead of the file order, so that a seed picks a subset.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hf_longmem.validation import check_int, check_real

from .haystack import FILLER_SENTENCES, Plant, count_tokens, fit_num_units, render_haystack
from .schema import Sample, Turn
from .tasks import KEY_WORDS, _check_common, _check_depth, _max_new_tokens, register_task

#: Keys, word values and common words of the RULER tasks: :data:`~hf_longmem.evals.tasks.KEY_WORDS` first (the
#: embedded tokenizer knows them), then more common English nouns.
WORDS: tuple[str, ...] = KEY_WORDS + tuple(
    """
    acorn album arrow badge bakery ballet bamboo banner beacon blanket blossom bottle bucket cabin canal canyon carpet
    castle cattle cellar chapel chimney circus citrus cobalt comet compass cookie cotton crayon cricket crystal cymbal
    desert diamond domino donkey drawer elbow emerald fabric ferry fiddle folder fountain gadget galaxy garlic gazebo
    goblet granite gravel hamster harvest hazel hermit hockey honey hornet iceberg indigo ivory jigsaw journal kayak
    kernel kiosk koala lagoon laptop lilac lizard locket lotus mango maple mascot meteor mitten monkey mosaic muffin
    napkin nectar noodle nutmeg oasis olive onion opera orchid otter paddle palace panda parcel pebble pelican pencil
    piano pickle pigeon pirate plaza pocket poodle potato pretzel puzzle quilt radish raven reptile ribbon robot
    rooster ruby salmon sandal sapphire scarf shovel signal skate sofa spider spoon squirrel statue sugar sundial
    tablet tavern temple thistle thunder ticket timber tomato topaz tractor trumpet tulip turkey turtle umbrella
    vessel village vulture wagon walrus whistle willow wizard wombat yacht zipper
    """.split()
)

# RULER's templates (scripts/data/synthetic/constants.py), split at "{context}" into our context and query parts.
NIAH_INTRO = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_QUERY = (
    "\nWhat are all the special magic {kind} for {query} mentioned in the provided text? "
    "The special magic {kind} for {query} mentioned in the provided text are"
)
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUERY = (
    "\nQuestion: What are the {num} most common words in the above list? "
    "Answer: The top {num} words that appear most often in the list are:"
)
FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUERY = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text? "
    "Answer: According to the coded text above, the three most frequently appeared words are:"
)
QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_INTRO = QA_INSTRUCTION + "\n\nThe following are given documents.\n\n"
QA_QUERY = "\n\n" + QA_INSTRUCTION + "\n\nQuestion: {question} Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"

NEEDLE_KINDS = ("numbers", "words", "uuids")
HAYSTACKS = ("noise", "needle")


# ----------------------------------------------------------------------------------------------------------------------
# Word pools
# ----------------------------------------------------------------------------------------------------------------------


def _unknown_id(tokenizer: Any) -> int | None:
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk if isinstance(unk, int) else None


def known_words(tokenizer: Any, words: Sequence[str] = WORDS) -> list[str]:
    """The words of ``words`` that ``tokenizer`` encodes (with a leading space) without its unknown token."""
    unk = _unknown_id(tokenizer)
    if unk is None:
        return list(words)
    return [w for w in words if unk not in tokenizer(" " + w, add_special_tokens=False, verbose=False)["input_ids"]]


def word_pool(tokenizer: Any, words: Sequence[str] | None, need: int, what: str) -> list[str]:
    """The distinct words of ``words`` (default :data:`WORDS`) the tokenizer knows; ``ValueError`` if fewer than
    ``need`` (``what`` names the task in the message)."""
    if words is not None:
        if isinstance(words, str) or not all(isinstance(w, str) and w.strip() and " " not in w for w in words):
            raise ValueError("`words` must be a list of single words")
        words = list(dict.fromkeys(words))
    pool = known_words(tokenizer, WORDS if words is None else words)
    if len(pool) < need:
        raise ValueError(
            f"{what} needs {need} distinct words but only {len(pool)} of the word pool are known to this tokenizer; "
            "pass `words=` with a larger pool (or use a shorter length)"
        )
    return pool


def fit_prompt(
    build: Callable[[int], tuple[str, str]], tokenizer: Any, length: int, *, limit: int | None = None
) -> tuple[int, int]:
    """Largest unit count ``n <= limit`` whose ``build(n)`` (context, query) fits in ``length`` tokens.

    Raises:
        ValueError: when the units run out (``n == limit``) while one more unit of the last one's size would still fit,
            so the prompt would fall short of ``length`` by more than a unit.
    """

    def count(n: int) -> int:
        if limit is not None and n > limit:
            return length + 1
        context, query = build(n)
        return count_tokens(tokenizer, context + query)

    n, num_tokens = fit_num_units(count, length)
    if limit is not None and n == limit and n > 0 and 2 * num_tokens - count(n - 1) <= length:
        raise ValueError(
            f"length={length} needs more than the {limit} units this task can draw (the prompt stops at "
            f"{num_tokens} tokens); pass a larger word pool or use a shorter length"
        )
    return n, num_tokens


def _answer_budget(tokenizer: Any, answers: Sequence[str]) -> int:
    return _max_new_tokens(tokenizer, ", ".join(answers))


# ----------------------------------------------------------------------------------------------------------------------
# Needles in a haystack
# ----------------------------------------------------------------------------------------------------------------------


def _needle_value(rng: random.Random, kind: str, num_digits: int, words: Sequence[str]) -> str:
    if kind == "numbers":
        return str(rng.randrange(10 ** (num_digits - 1), 10**num_digits))
    if kind == "words":
        return rng.choice(words)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(rng: random.Random, make: Callable[[], str], count: int, exclude: set[str]) -> list[str]:
    values: list[str] = []
    for _ in range(1000 * max(count, 1)):
        if len(values) == count:
            return values
        value = make()
        if value not in values and value not in exclude:
            values.append(value)
    raise ValueError(f"could not draw {count} distinct values; use fewer needles or a larger word pool")


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _singular(text: str, kind: str) -> str:
    """RULER's rewording of the template for a single answer ('Some' -> 'A', 'are' -> 'is', plural -> singular)."""
    text = text.replace("Some", "A").replace("are all", "is").replace("are", "is")
    return text.replace(kind, kind[:-1])


@dataclass(frozen=True)
class _NiahOptions:
    num_keys: int
    num_values: int
    num_queries: int
    haystack: str
    kind: str
    depth: float | None
    num_digits: int


def _niah_options(
    num_keys, num_values, num_queries, haystack, value_type, depth, num_digits, pool_size
) -> _NiahOptions:
    check_int("num_values", num_values, low=1, high=64)
    check_int("num_queries", num_queries, low=1, high=64)
    check_int("num_keys", num_keys, low=1, high=pool_size)
    num_keys = max(num_keys, num_queries)  # RULER: num_needle_k = max(num_needle_k, num_needle_q)
    if num_keys > pool_size:
        raise ValueError(f"num_queries={num_queries} exceeds the {pool_size} keys of the word pool")
    if haystack not in HAYSTACKS:
        raise ValueError(f"`haystack` must be one of {HAYSTACKS}, got {haystack!r}")
    if value_type not in NEEDLE_KINDS:
        raise ValueError(f"`value_type` must be one of {NEEDLE_KINDS}, got {value_type!r}")
    _check_depth(depth)
    check_int("num_digits", num_digits, low=1, high=20)
    return _NiahOptions(num_keys, num_values, num_queries, haystack, value_type, depth, num_digits)


def _niah_sample(
    task: str, tokenizer: Any, length: int, seed: int, index: int, opt: _NiahOptions, pool: list[str]
) -> Sample:
    rng = random.Random(f"{task}:{seed}:{index}")
    keys = rng.sample(pool, opt.num_keys)
    value_words = [w for w in pool if w not in keys]
    values = _distinct(
        rng, lambda: _needle_value(rng, opt.kind, opt.num_digits, value_words), opt.num_keys * opt.num_values, set()
    )
    grouped = [values[k * opt.num_values : (k + 1) * opt.num_values] for k in range(opt.num_keys)]
    needles = [NIAH_NEEDLE.format(kind=opt.kind, key=k, value=v) for k, vs in zip(keys, grouped) for v in vs]
    rng.shuffle(needles)
    depths = [float(opt.depth)] * len(needles) if opt.depth is not None else sorted(rng.random() for _ in needles)
    plants = [Plant(d, text) for d, text in zip(depths, needles)]
    asked = rng.sample(range(opt.num_keys), opt.num_queries)
    answers = [v for i in asked for v in grouped[i]]
    intro = NIAH_INTRO.format(kind=opt.kind)
    query = NIAH_QUERY.format(kind=opt.kind, query=_join_keys([keys[i] for i in asked]))
    if len(answers) == 1:
        intro, query = _singular(intro, opt.kind), _singular(query, opt.kind)
    filler: Sequence[str] = FILLER_SENTENCES
    if opt.haystack == "needle":  # RULER: every haystack line is a needle of another (random) key
        others = [w for w in pool if w not in keys] or pool

        def distractor() -> str:
            return NIAH_NEEDLE.format(
                kind=opt.kind, key=rng.choice(others), value=_needle_value(rng, opt.kind, opt.num_digits, value_words)
            )

        filler = [distractor() for _ in range(length)]
    num_units, num_tokens = fit_num_units(
        lambda n: count_tokens(tokenizer, render_haystack(intro, plants, n, filler) + query), length
    )
    meta = {
        "length": length,
        "num_tokens": num_tokens,
        "depth": depths[0],
        "depths": depths,
        "num_keys": opt.num_keys,
        "num_values": opt.num_values,
        "num_queries": opt.num_queries,
        "haystack": opt.haystack,
        "value_type": opt.kind,
        "num_filler_sentences": num_units,
        "seed": seed,
        "index": index,
    }
    turn = Turn(query=query, answers=answers, max_new_tokens=_answer_budget(tokenizer, answers))
    context = render_haystack(intro, plants, num_units, filler)
    return Sample(id=f"{task}-{seed}-{index}", task=task, context=context, turns=[turn], meta=meta)


def _niah(
    task: str,
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int,
    num_keys: int,
    num_values: int,
    num_queries: int,
    haystack: str,
    value_type: str,
    depth: float | None,
    num_digits: int,
    words: Sequence[str] | None,
) -> list[Sample]:
    _check_common(tokenizer, length, num_samples, seed)
    pool = word_pool(tokenizer, words, 2, "a needle task")
    opt = _niah_options(num_keys, num_values, num_queries, haystack, value_type, depth, num_digits, len(pool))
    return [_niah_sample(task, tokenizer, length, seed, i, opt, pool) for i in range(num_samples)]


@register_task("niah", metric="string_match_all")
def niah(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    haystack: str = "noise",
    value_type: str = "numbers",
    depth: float | None = None,
    num_digits: int = 7,
    words: Sequence[str] | None = None,
) -> list[Sample]:
    """RULER's needle in a haystack, every variant by options.

    ``num_keys`` keys get ``num_values`` needles each ("One of the special magic numbers for apple is: 4093217."),
    planted in shuffled order at random depths; ``num_queries`` keys are asked in one question and every value of
    every asked key is an answer.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`hf_longmem.evals.tasks.passkey`.
        num_keys: keys planted (raised to ``num_queries`` if smaller, as RULER does).
        num_values: values per key.
        num_queries: keys asked.
        haystack: ``"noise"`` (the repeated filler sentences) or ``"needle"`` (every filler line a needle of another
            key: RULER's ``niah_multikey_2``).
        value_type: ``"numbers"`` (``num_digits`` digits), ``"words"`` or ``"uuids"``.
        depth: relative depth of every needle; ``None`` draws each.
        num_digits: digits of number values.
        words: pool of keys and word values (default :data:`WORDS`; only words the tokenizer knows are used).

    Returns:
        Single-turn samples; ``answers`` lists every asked value (scored with ``string_match_all``).
    """
    return _niah(
        "niah",
        tokenizer,
        length,
        num_samples,
        seed,
        num_keys,
        num_values,
        num_queries,
        haystack,
        value_type,
        depth,
        num_digits,
        words,
    )


@register_task("niah_single", metric="string_match_all")
def niah_single(
    tokenizer: Any, length: int, num_samples: int, seed: int = 0, *, depth: float | None = None, num_digits: int = 7
) -> list[Sample]:
    """RULER ``niah_single_1``: one needle "One of the special magic numbers for apple is: 4093217." in noise."""
    return _niah(
        "niah_single", tokenizer, length, num_samples, seed, 1, 1, 1, "noise", "numbers", depth, num_digits, None
    )


@register_task("niah_multikey_haystack", metric="string_match_all")
def niah_multikey_haystack(
    tokenizer: Any, length: int, num_samples: int, seed: int = 0, *, depth: float | None = None, num_digits: int = 7
) -> list[Sample]:
    """RULER ``niah_multikey_2``: the haystack is made of needles of other keys; one key is asked."""
    return _niah(
        "niah_multikey_haystack",
        tokenizer,
        length,
        num_samples,
        seed,
        1,
        1,
        1,
        "needle",
        "numbers",
        depth,
        num_digits,
        None,
    )


@register_task("niah_multivalue", metric="string_match_all")
def niah_multivalue(
    tokenizer: Any, length: int, num_samples: int, seed: int = 0, *, num_values: int = 4, num_digits: int = 7
) -> list[Sample]:
    """RULER ``niah_multivalue``: one key with ``num_values`` values in noise; every value must be recalled."""
    return _niah(
        "niah_multivalue",
        tokenizer,
        length,
        num_samples,
        seed,
        1,
        num_values,
        1,
        "noise",
        "numbers",
        None,
        num_digits,
        None,
    )


@register_task("niah_multiquery", metric="string_match_all")
def niah_multiquery(
    tokenizer: Any, length: int, num_samples: int, seed: int = 0, *, num_queries: int = 4, num_digits: int = 7
) -> list[Sample]:
    """RULER ``niah_multiquery``: ``num_queries`` keys, one value each, all asked in one question."""
    return _niah(
        "niah_multiquery",
        tokenizer,
        length,
        num_samples,
        seed,
        num_queries,
        1,
        num_queries,
        "noise",
        "numbers",
        None,
        num_digits,
        None,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation: common words and frequent words
# ----------------------------------------------------------------------------------------------------------------------


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list(rng: random.Random, common: Sequence[str], uncommon: Sequence[str], f_common: int, f_uncommon: int):
    words = list(common) * f_common + list(uncommon) * f_uncommon
    rng.shuffle(words)
    return words


@register_task("common_words", metric="string_match_all")
def common_words(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    num_common: int = 10,
    freq_common: int | None = None,
    freq_uncommon: int | None = None,
    num_fewshot: int = 1,
    words: Sequence[str] | None = None,
) -> list[Sample]:
    """RULER ``cwe``: a numbered list where ``num_common`` words appear ``freq_common`` times and the others
    ``freq_uncommon`` times; the answer is the common words.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`hf_longmem.evals.tasks.passkey`.
        num_common: words to find.
        freq_common, freq_uncommon: repeats of a common / uncommon word (default, as RULER: 6 / 1 below 4096
            tokens, else 30 / 3).
        num_fewshot: solved examples before the list (RULER: 1; 20 words at 3 / 1, or 40 at 10 / 3 from 4096).
        words: the word pool (default :data:`WORDS`, restricted to words the tokenizer knows).

    Returns:
        Single-turn samples; ``answers`` are the common words (scored with ``string_match_all``).
    """
    _check_common(tokenizer, length, num_samples, seed)
    check_int("num_common", num_common, low=1)
    long = length >= 4096
    freq_common = check_int("freq_common", (30 if long else 6) if freq_common is None else freq_common, low=2)
    default_uncommon = 3 if long else 1
    freq_uncommon = check_int(
        "freq_uncommon", default_uncommon if freq_uncommon is None else freq_uncommon, low=1, high=freq_common - 1
    )
    check_int("num_fewshot", num_fewshot, low=0)
    shot_words, shot_common, shot_uncommon = (40, 10, 3) if long else (20, 3, 1)
    shot_words = max(shot_words, num_common + 1)
    pool = word_pool(tokenizer, words, max(num_common + 1, shot_words), "common_words")
    query = CWE_QUERY.format(num=num_common)
    samples = []
    for index in range(num_samples):
        rng = random.Random(f"common_words:{seed}:{index}")
        order = rng.sample(pool, len(pool))
        shots = []
        for _ in range(num_fewshot):  # RULER: the example answers num_common words too
            chosen = rng.sample(pool, shot_words)
            shot_list = _word_list(rng, chosen[:num_common], chosen[num_common:], shot_common, shot_uncommon)
            shots.append(
                CWE_INTRO
                + _numbered(shot_list)
                + CWE_QUERY.format(num=num_common)
                + " "
                + _numbered(chosen[:num_common])
            )
        prefix = "\n".join(shots) + ("\n" if shots else "")

        def build(n: int, index: int = index, order: list[str] = order, prefix: str = prefix) -> tuple[str, str]:
            listed = _word_list(
                random.Random(f"common_words:{seed}:{index}:{n}"),
                order[:num_common],
                order[num_common : num_common + n],
                freq_common,
                freq_uncommon,
            )
            return prefix + CWE_INTRO + _numbered(listed), query

        num_uncommon, num_tokens = fit_prompt(build, tokenizer, length, limit=len(pool) - num_common)
        context, _ = build(num_uncommon)
        answers = order[:num_common]
        meta = {
            "length": length,
            "num_tokens": num_tokens,
            "num_common": num_common,
            "num_uncommon": num_uncommon,
            "freq_common": freq_common,
            "freq_uncommon": freq_uncommon,
            "num_fewshot": num_fewshot,
            "seed": seed,
            "index": index,
        }
        turn = Turn(query=query, answers=answers, max_new_tokens=_max_new_tokens(tokenizer, _numbered(answers)))
        samples.append(Sample(f"common_words-{seed}-{index}", "common_words", context, [turn], meta))
    return samples


def _zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta of ``alpha > 1``: a partial sum plus the integral of the tail (error below 1e-9 for alpha >= 1.5)."""
    head = math.fsum(k**-alpha for k in range(1, terms + 1))
    return head + (terms + 0.5) ** (1 - alpha) / (alpha - 1)


def _coded_words(
    rng: random.Random, tokenizer: Any, count: int, word_length: int, words: Sequence[str] | None
) -> list[str]:
    """``count`` distinct coded words: random lowercase strings (RULER) when the tokenizer can spell them, else words
    of the pool it knows (a closed word-level tokenizer would turn random strings into its unknown token)."""
    if words is None and _unknown_id(tokenizer) is None:
        letters = string.ascii_lowercase
        return _distinct(rng, lambda: "".join(rng.choices(letters, k=word_length)), count, set())
    pool = word_pool(tokenizer, words, count, "frequent_words")
    return rng.sample(pool, count)


@register_task("frequent_words", metric="string_match_all")
def frequent_words(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    alpha: float = 2.0,
    vocab_size: int | None = None,
    coded_word_length: int = 6,
    words: Sequence[str] | None = None,
) -> list[Sample]:
    """RULER ``fwe``: "coded" words drawn from a Zipf(``alpha``) distribution; the answer is the three most frequent.

    The ``k``-th word of the vocabulary appears ``int(n * k**-alpha / zeta(alpha))`` times; the most frequent one is
    replaced by the noise ``"..."`` (as in RULER), so the answer is words 2 to 4.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`hf_longmem.evals.tasks.passkey`.
        alpha: Zipf exponent, ``> 1``.
        vocab_size: distinct coded words (default, as RULER: ``length // 50``, at least 4).
        coded_word_length: letters of a random coded word.
        words: use these words instead of random strings.

    Returns:
        Single-turn samples; ``answers`` are the three most frequent words (scored with ``string_match_all``).
    """
    _check_common(tokenizer, length, num_samples, seed)
    alpha = check_real("alpha", alpha, low=1.0, strict_low=True)
    vocab_size = check_int("vocab_size", max(length // 50, 4) if vocab_size is None else vocab_size, low=4)
    check_int("coded_word_length", coded_word_length, low=1)
    zeta = _zeta(alpha)
    weights = [k**-alpha / zeta for k in range(1, vocab_size + 1)]
    samples = []
    for index in range(num_samples):
        rng = random.Random(f"frequent_words:{seed}:{index}")
        vocab = _coded_words(rng, tokenizer, vocab_size, coded_word_length, words)
        vocab[0] = "..."

        def build(n: int, index: int = index, vocab: list[str] = vocab) -> tuple[str, str]:
            text = [w for w, weight in zip(vocab, weights) for _ in range(int(n * weight))]
            random.Random(f"frequent_words:{seed}:{index}:{n}").shuffle(text)
            return FWE_INTRO + " ".join(text), FWE_QUERY

        num_words, num_tokens = fit_prompt(build, tokenizer, length)
        context, query = build(num_words)
        answers = vocab[1:4]
        meta = {
            "length": length,
            "num_tokens": num_tokens,
            "num_words": num_words,
            "vocab_size": vocab_size,
            "alpha": alpha,
            "seed": seed,
            "index": index,
        }
        turn = Turn(query=query, answers=answers, max_new_tokens=_answer_budget(tokenizer, answers))
        samples.append(Sample(f"frequent_words-{seed}-{index}", "frequent_words", context, [turn], meta))
    return samples


# ----------------------------------------------------------------------------------------------------------------------
# QA over local SQuAD / HotpotQA files
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QAItem:
    """A question of a QA file.

    Attributes:
        question: the question.
        answers: accepted answers.
        gold: indices (into the document list) of the documents that answer it.
        related: indices of other documents of the same article (SQuAD), tried first as distractors.
    """

    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]
    related: tuple[int, ...] = ()


def _load_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"QA file not found: {os.fspath(path)!r}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {error}") from None


def _bad(path: Any, where: str, what: str) -> ValueError:
    return ValueError(f"{os.fspath(path)!r} is not in the expected format: {where} {what}")


def read_squad(path: str | os.PathLike) -> tuple[list[QAItem], list[str]]:
    """Questions and documents of a SQuAD-format JSON file (v1.1 or v2.0), as RULER's ``read_squad``.

    Documents are the distinct paragraph contexts, sorted; unanswerable (``is_impossible``) questions are skipped.

    Raises:
        ValueError: for a missing or malformed file (the message names the offending entry).
    """
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise _bad(path, "the top level", 'must be an object with a "data" list (SQuAD format)')
    for a, article in enumerate(data["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise _bad(path, f"data[{a}]", 'must have a "paragraphs" list')
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise _bad(path, where, 'must have a "context" string')
            if not isinstance(paragraph.get("qas"), list):
                raise _bad(path, where, 'must have a "qas" list')
            for q, qa in enumerate(paragraph["qas"]):
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                    raise _bad(path, f"{where}.qas[{q}]", 'must have a "question" string')
                answers = qa.get("answers")
                if not isinstance(answers, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("text"), str) for x in answers
                ):
                    raise _bad(path, f"{where}.qas[{q}]", 'must have an "answers" list of {"text": ...} objects')
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    items = []
    for article in data["data"]:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            gold = index[paragraph["context"]]
            for qa in paragraph["qas"]:
                answers = tuple(a["text"] for a in qa["answers"])
                if qa.get("is_impossible", False) or not answers:
                    continue
                related = tuple(dict.fromkeys(i for i in article_docs if i != gold))
                items.append(QAItem(qa["question"], answers, (gold,), related))
    if not items:
        raise _bad(path, "the file", "holds no answerable question")
    return items, docs


def read_hotpotqa(path: str | os.PathLike) -> tuple[list[QAItem], list[str]]:
    """Questions and documents of a HotpotQA-format JSON file, as RULER's ``read_hotpotqa``.

    A document is ``title + "\\n" + "".join(sentences)`` of a ``context`` entry; every context entry of a question
    (supporting paragraphs and the distractor-setting paragraphs) is one of its gold documents, as in RULER.

    Raises:
        ValueError: for a missing or malformed file.
    """
    data = _load_json(path)
    if not isinstance(data, list):
        raise _bad(path, "the top level", "must be a list of questions (HotpotQA format)")
    for i, row in enumerate(data):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise _bad(path, f"[{i}]", 'must have "question" and "answer" strings')
        context = row.get("context")
        ok = isinstance(context, list) and all(
            isinstance(c, list)
            and len(c) == 2
            and isinstance(c[0], str)
            and isinstance(c[1], list)
            and all(isinstance(s, str) for s in c[1])
            for c in context
        )
        if not ok or not context:
            raise _bad(path, f"[{i}].context", "must be a non-empty list of [title, [sentence, ...]] pairs")
    docs = sorted({f"{t}\n{''.join(p)}" for row in data for t, p in row["context"]})
    index = {c: i for i, c in enumerate(docs)}
    items = [
        QAItem(
            row["question"],
            (row["answer"],),
            tuple(dict.fromkeys(index[f"{t}\n{''.join(p)}"] for t, p in row["context"])),
        )
        for row in data
    ]
    if not items:
        raise _bad(path, "the file", "holds no question")
    return items, docs


QA_READERS: dict[str, Callable[[str | os.PathLike], tuple[list[QAItem], list[str]]]] = {
    "squad": read_squad,
    "hotpotqa": read_hotpotqa,
}


def _qa_documents(rng: random.Random, item: QAItem, num_docs: int, num_all: int) -> list[int]:
    """RULER's document choice: gold, then related, then other documents (a seeded order); all of them repeated
    when more are needed than the file holds."""
    if num_docs >= num_all:
        return (list(range(num_all)) * math.ceil(num_docs / num_all))[:num_docs]
    chosen = set(item.gold) | set(item.related)
    others = [i for i in range(num_all) if i not in chosen]
    rng.shuffle(others)
    return (list(item.gold) + list(item.related) + others)[:num_docs]


def qa(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    path: str | os.PathLike,
    dataset: str = "squad",
    task: str | None = None,
) -> list[Sample]:
    """RULER ``qa_1`` / ``qa_2``: a question over its gold documents hidden among distractor documents.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`hf_longmem.evals.tasks.passkey`.
        path: a local SQuAD-format (``dataset="squad"``) or HotpotQA-format (``"hotpotqa"``) JSON file.
        dataset: the file's format.
        task: the samples' task name (default ``"qa_" + dataset``).

    Returns:
        Single-turn samples; ``answers`` are the accepted answers (scored with ``string_match_part``). The prompt
        always holds the gold documents; a length too short for them raises ``ValueError``.
    """
    _check_common(tokenizer, length, num_samples, seed)
    if dataset not in QA_READERS:
        raise ValueError(f"`dataset` must be one of {sorted(QA_READERS)}, got {dataset!r}")
    task = task or f"qa_{dataset}"
    items, docs = QA_READERS[dataset](path)
    order = random.Random(f"{task}:{seed}").sample(range(len(items)), len(items))
    samples = []
    for index in range(num_samples):
        item = items[order[index % len(items)]]
        query = QA_QUERY.format(question=item.question)

        def build(n: int, item: QAItem = item, index: int = index, query: str = query) -> tuple[str, str]:
            rng = random.Random(f"{task}:{seed}:{index}")
            chosen = [docs[i] for i in _qa_documents(rng, item, len(item.gold) + n, len(docs))]
            rng.shuffle(chosen)
            body = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(chosen))
            return QA_INTRO + body, query

        num_extra, num_tokens = fit_prompt(build, tokenizer, length)
        context, _ = build(num_extra)
        meta = {
            "length": length,
            "num_tokens": num_tokens,
            "num_docs": len(item.gold) + num_extra,
            "dataset": dataset,
            "seed": seed,
            "index": index,
        }
        turn = Turn(
            query=query,
            answers=list(item.answers),
            max_new_tokens=max(_max_new_tokens(tokenizer, a) for a in item.answers),
        )
        samples.append(Sample(f"{task}-{seed}-{index}", task, context, [turn], meta))
    return samples


@register_task("qa_squad", metric="string_match_part")
def qa_squad(tokenizer: Any, length: int, num_samples: int, seed: int = 0, *, path: str | os.PathLike) -> list[Sample]:
    """RULER ``qa_1``: SQuAD questions from the local file ``path`` (see :func:`qa`)."""
    return qa(tokenizer, length, num_samples, seed, path=path, dataset="squad")


@register_task("qa_hotpotqa", metric="string_match_part")
def qa_hotpotqa(
    tokenizer: Any, length: int, num_samples: int, seed: int = 0, *, path: str | os.PathLike
) -> list[Sample]:
    """RULER ``qa_2``: HotpotQA questions from the local file ``path`` (see :func:`qa`)."""
    return qa(tokenizer, length, num_samples, seed, path=path, dataset="hotpotqa")
