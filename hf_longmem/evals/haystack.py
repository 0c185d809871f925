"""Haystack rendering and token-length fitting shared by the synthetic task generators.

A context is ``prefix`` followed by ``num_units`` filler sentences, with planted statements inserted between
them at relative depths. The generators choose ``num_units`` so that context + query has at most ``length``
tokens of the caller's tokenizer and adding one more filler sentence would exceed it; the gap to ``length``
is therefore smaller than the token count of one filler sentence (a handful of tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: Landmark-attention style filler, cycled in this order.
FILLER_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


class PromptTooLongError(ValueError):
    """The prompt without any filler already has more tokens than the requested length."""


@dataclass(frozen=True)
class Plant:
    """A statement planted in the haystack.

    Attributes:
        depth: relative position in ``[0, 1]``; 0 puts it before the first filler sentence, 1 after the last.
        text: the statement, e.g. ``"The pass key is 71432. Remember it. 71432 is the pass key."``.
    """

    depth: float
    text: str


def render_haystack(
    prefix: str, plants: Sequence[Plant], num_units: int, filler: Sequence[str] = FILLER_SENTENCES
) -> str:
    """Join ``prefix``, ``num_units`` filler sentences and the planted statements with single spaces.

    A plant at depth ``d`` goes into slot ``round(d * num_units)`` (before filler sentence of that index).
    Plants are inserted in order of depth; equal depths keep their order in ``plants``, so a chain whose
    depths ascend keeps its statement order.

    Args:
        prefix: task instruction placed first (may be empty).
        plants: statements to insert.
        num_units: number of filler sentences, ``>= 0``.
        filler: the filler sentences, cycled (default: :data:`FILLER_SENTENCES`).

    Returns:
        The context string.
    """
    slots: list[list[str]] = [[] for _ in range(num_units + 1)]
    for plant in sorted(plants, key=lambda p: p.depth):
        slots[round(plant.depth * num_units)].append(plant.text)
    pieces = [prefix] if prefix else []
    for index, slot in enumerate(slots):
        pieces.extend(slot)
        if index < num_units:
            pieces.append(filler[index % len(filler)])
    return " ".join(pieces)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of token ids ``tokenizer(text)`` produces, special tokens (e.g. BOS) included."""
    return len(tokenizer(text, verbose=False)["input_ids"])


def fit_num_units(count: Callable[[int], int], length: int) -> tuple[int, int]:
    """Largest number of filler sentences whose rendering fits in ``length`` tokens.

    Args:
        count: maps a number of filler sentences to the token count of the rendered prompt; assumed
            non-decreasing (true for word-level and BPE tokenizers on this filler).
        length: token budget.

    Returns:
        ``(num_units, num_tokens)`` with ``num_tokens = count(num_units) <= length``.

    Raises:
        PromptTooLongError: (a ``ValueError``) if the prompt without any filler already exceeds ``length``.
    """
    cache: dict[int, int] = {}

    def f(n: int) -> int:
        if n not in cache:
            cache[n] = count(n)
        return cache[n]

    base = f(0)
    if base > length:
        raise PromptTooLongError(f"length={length} is too short: the prompt needs {base} tokens without any filler")
    probe = len(FILLER_SENTENCES)
    per_unit = max((f(probe) - base) / probe, 1e-3)
    guess = max(int((length - base) / per_unit), 0)
    # Bracket the answer: f(lo) <= length < f(hi).
    step = probe
    if f(guess) <= length:
        lo, hi = guess, guess + step
        while f(hi) <= length:
            lo, hi, step = hi, hi + step, step * 2
    else:
        lo, hi = max(guess - step, 0), guess
        while f(lo) > length:
            hi, lo, step = lo, max(lo - step, 0), step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) <= length:
            lo = mid
        else:
            hi = mid
    return lo, f(lo)
