"""LongGenBench-style long generation (Liu et al., 2024, "LongGenBench: Long-context generation benchmark"): many
questions answered in **one** generation, scored per question and by question index.

LongGenBench concatenates K questions of GSM8K / MMLU / CommonSenseQA and asks for all answers in a single response
(``Answer_1: ... The answer is X. Answer_2: ...``). Every answer has to be produced while the cache also holds the
earlier answers, so a cache that evicts during decoding loses the later questions first: accuracy *by question
index* shows where decode-time memory fails, which prefill-only benchmarks never see.

Here the questions are seeded one-step arithmetic word problems (GSM8K-like in form, with exact integer answers);
:func:`long_generation` fits as many of them as ``length`` tokens hold (the questions are the prompt's units, up to
``max_questions``). The sample's single turn lists the answers in question order and is scored with the
``"answer_by_index"`` metric (the fraction of questions answered right); :func:`accuracy_by_index` turns the
runner's records into per-index accuracy, and :func:`kl_by_index` measures the divergence from the full cache per
question index with the gold response teacher-forced (for models that cannot answer the questions).

Deviations, and why: generated arithmetic questions instead of GSM8K/MMLU/CSQA (no downloads; exact answers); the
length sets the number of questions (LongGenBench fixes K per run; pass ``max_questions`` to cap it).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_longmem.registry import make_cache
from hf_longmem.validation import check_int

from .haystack import count_tokens, fit_num_units
from .metrics import METRICS
from .schema import Sample, Turn
from .tasks import _check_common, register_task

INSTRUCTION = (
    "Answer each of the following questions in order. For question i, write Answer_i: then your reasoning, and end "
    'with "The answer is X." where X is a number.'
)
QUERY = "\nAnswer_1:"
NAMES = ("Tom", "Sara", "Ali", "Mia", "Ben", "Lena", "Omar", "Zoe", "Ravi", "Emma", "Jon", "Ines")
ITEMS = ("apples", "coins", "books", "stamps", "pencils", "shells", "cards", "marbles", "stickers", "eggs")
TEMPLATES = (
    ("{name} has {a} {item}. {pronoun} gets {b} more. How many {item} does {name} have now?", lambda a, b: a + b),
    ("{name} had {a} {item} and gave away {b}. How many {item} does {name} have left?", lambda a, b: a - b),
    ("{name} packs {a} boxes with {b} {item} in each box. How many {item} are packed?", lambda a, b: a * b),
)
_ANSWER_MARK = re.compile(r"Answer_(\d+)\s*:")
_THE_ANSWER = re.compile(r"answer is\s*\$?\s*(-?\d[\d,]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*")


def _question(rng: random.Random) -> tuple[str, int]:
    template, solve = TEMPLATES[rng.randrange(len(TEMPLATES))]
    a, b = rng.randint(10, 60), rng.randint(2, 9)
    name = rng.choice(NAMES)
    pronoun = "She" if name in ("Sara", "Mia", "Lena", "Zoe", "Emma", "Ines") else "He"
    return template.format(name=name, pronoun=pronoun, a=a, b=b, item=rng.choice(ITEMS)), solve(a, b)


def _prompt(questions: Sequence[str]) -> str:
    return INSTRUCTION + "".join(f"\nQuestion_{i + 1}: {q}" for i, q in enumerate(questions))


METRICS["answer_by_index"] = lambda prediction, answers: answer_by_index(prediction, answers)


@register_task("long_generation", metric="answer_by_index")
def long_generation(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    max_questions: int | None = None,
    answer_tokens: int = 24,
) -> list[Sample]:
    """K arithmetic questions answered in one generation (LongGenBench's format), K fitted to ``length``.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`hf_longmem.evals.tasks.passkey`.
        max_questions: at most this many questions (``None``: as many as fit).
        answer_tokens: generation budget per question (``max_new_tokens = K * answer_tokens``).

    Returns:
        Single-turn samples whose ``answers`` are the K answers in question order (``"answer_by_index"`` metric);
        ``meta["num_questions"]`` is K.
    """
    _check_common(tokenizer, length, num_samples, seed)
    if max_questions is not None:
        check_int("max_questions", max_questions, low=1)
    check_int("answer_tokens", answer_tokens, low=1)
    samples = []
    for index in range(num_samples):
        rng = random.Random(f"long_generation:{seed}:{index}")
        pool = [_question(rng) for _ in range(max_questions or max(length // 8, 1))]

        def count(n: int, pool: list[tuple[str, int]] = pool) -> int:
            if n > len(pool):
                return length + 1
            return count_tokens(tokenizer, _prompt([q for q, _ in pool[:n]]) + QUERY)

        k, num_tokens = fit_num_units(count, length)
        if k == 0:
            raise ValueError(f"length={length} is too short for one question ({count(1)} tokens)")
        questions = pool[:k]
        turn = Turn(query=QUERY, answers=[str(a) for _, a in questions], max_new_tokens=k * answer_tokens)
        meta = {
            "length": length,
            "num_tokens": num_tokens,
            "num_questions": k,
            "seed": seed,
            "index": index,
            "metric": "answer_by_index",
        }
        samples.append(
            Sample(
                f"long_generation-{seed}-{index}", "long_generation", _prompt([q for q, _ in questions]), [turn], meta
            )
        )
    return samples


def parse_answers(prediction: str, num_questions: int, *, first_index: int = 1) -> list[int | None]:
    """The integer answer of each question in a one-generation response.

    The response continues the query ``"Answer_1:"``, so the text before the first ``Answer_i:`` marker is answer
    ``first_index``. Within an answer, ``"The answer is X"`` wins, else the last integer; a question whose marker is
    missing has ``None``.

    Args:
        prediction: generated text.
        num_questions: K.
        first_index: the index whose marker the query already wrote.

    Returns:
        ``K`` parsed answers (``None`` where absent), index ``i`` for question ``i + 1``.
    """
    blocks: dict[int, str] = {}
    marks = list(_ANSWER_MARK.finditer(prediction))
    blocks[first_index] = prediction[: marks[0].start()] if marks else prediction
    for mark, following in zip(marks, marks[1:] + [None]):
        number = int(mark.group(1))
        if number not in blocks:  # a repeated marker does not overwrite the first answer
            blocks[number] = prediction[mark.end() : following.start() if following else len(prediction)]
    parsed: list[int | None] = []
    for i in range(1, num_questions + 1):
        text = blocks.get(i, "")
        stated = _THE_ANSWER.search(text)
        numbers = _NUMBER.findall(text)
        value = stated.group(1) if stated else (numbers[-1] if numbers else None)
        parsed.append(None if value is None else int(value.replace(",", "")))
    return parsed


def answer_correct(prediction: str, answers: Sequence[str]) -> list[bool]:
    """Per question (in order): whether the parsed answer equals ``answers[i]``."""
    return [p is not None and p == int(a) for p, a in zip(parse_answers(prediction, len(answers)), answers)]


def answer_by_index(prediction: str, answers: Sequence[str]) -> float:
    """Metric: the fraction of the K questions (``answers`` in order) answered right in one generation."""
    if isinstance(answers, str) or not answers:
        raise ValueError("`answers` must list the answers of the questions in order")
    return sum(answer_correct(prediction, answers)) / len(answers)


def accuracy_by_index(records: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """Accuracy of each question index over the records of :func:`long_generation` samples.

    Args:
        records: runner records (``prediction`` and ``answers`` are read).

    Returns:
        ``[acc_1, acc_2, ...]`` up to the largest K; index ``i`` averages the records with at least ``i + 1``
        questions.
    """
    rows = [answer_correct(r["prediction"], r["answers"]) for r in records]
    width = max((len(r) for r in rows), default=0)
    accuracy: list[float | None] = []
    for i in range(width):
        hits = [r[i] for r in rows if len(r) > i]
        accuracy.append(sum(hits) / len(hits) if hits else None)
    return accuracy


def gold_response(answers: Sequence[str]) -> str:
    """The response a solver writes after the query ``"Answer_1:"``: ``" The answer is a1. Answer_2: The answer is
    a2. ..."``."""
    rest = "".join(f" Answer_{i + 2}: The answer is {a}." for i, a in enumerate(answers[1:]))
    return f" The answer is {answers[0]}.{rest}"


@torch.inference_mode()
def kl_by_index(
    model: torch.nn.Module,
    tokenizer: Any,
    sample: Sample,
    cache: str,
    cache_options: Mapping[str, Any] | None = None,
) -> list[float]:
    """Mean ``KL(p_full || p_cache)`` over the tokens of each answer of the gold response, teacher-forced.

    The gold response (:func:`gold_response`) is fed token by token after ``context + query`` through the full cache
    and through ``cache``, so both predict the same positions and decode-time eviction shows up where it happens:
    by question index. It needs no model that can solve the questions, unlike :func:`accuracy_by_index`.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer.
        sample: a :func:`long_generation` sample.
        cache: registry name of the cache under test.
        cache_options: its options.

    Returns:
        ``K`` mean KL values (nats), question ``i + 1`` at index ``i``.
    """
    from .fidelity import Reference, compare_to_reference
    from .profiling import greedy_generate, model_device

    answers = sample.turns[0].answers
    pieces = [f" The answer is {answers[0]}."] + [
        f" Answer_{i + 2}: The answer is {a}." for i, a in enumerate(answers[1:])
    ]
    forced_ids, owner = [], []
    for index, piece in enumerate(pieces):
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        forced_ids += ids
        owner += [index] * len(ids)
    prompt = tokenizer(sample.context, add_special_tokens=True)["input_ids"]
    prompt += tokenizer(sample.turns[0].query, add_special_tokens=False)["input_ids"]
    device = model_device(model)
    input_ids = torch.tensor([prompt], device=device)
    forced = torch.tensor([forced_ids], device=device)
    full = greedy_generate(
        model,
        input_ids,
        make_cache("full", model),
        max_new_tokens=forced.shape[1],
        forced_tokens=forced,
        eos_token_id=[],
        return_logprobs=True,
    )
    reference = Reference(input_ids=input_ids, tokens=forced[0], logprobs=full.logprobs[0])
    result = compare_to_reference(model, reference, make_cache(cache, model, **dict(cache_options or {})))
    per_index = [[] for _ in pieces]
    for position, kl in enumerate(result.kl_per_position):
        per_index[owner[position]].append(kl)
    return [sum(values) / len(values) for values in per_index]
