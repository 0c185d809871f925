"""SORT: the Sequence Order Recall Task (Pink et al., 2024, "Assessing episodic memory in LLMs with sequence order
recall tasks"), from any text or from local Book-SORT CSV files.

An excerpt of a text is the context; the question shows two segments of it, labelled A and B in a random order, and
asks which one appeared first. As in the official evaluation (bridge-ai-neuro/SORT ``sort/evaluation``), the answer
is read from the log-likelihoods of the two labels after the answer prefix ``"Answer: Segment"`` — here through
:func:`hf_longmem.evals.choices.score_choices`, i.e. *from the cache under test*: by default (the runner's rollback
mode) the excerpt is prefilled and compressed before the question is seen. A sample carries ``meta["choices"] = [" A", " B"]``; the runner scores such
samples by choice (:func:`hf_longmem.evals.choices.evaluate_choices`) instead of generating. Chance is 50%.

Prompts are the official ``prompt_0`` (``pre_excerpt`` + ``post_excerpt`` + ``model_answer_prefix``), without a chat
template and with ``<tasktype> = "first"``.

Deviations, and why:

- Segments are whole sentences (``segment_words`` is a minimum, the segment runs to the end of its sentence), so that
  word-level tokenizers see whole pieces; Book-SORT cuts exactly ``L_S`` words starting at a sentence boundary.
- Without a ``text``, the excerpt is a seeded synthetic story of "The apple is in the river." sentences over the
  words the tokenizer knows (:func:`hf_longmem.evals.ruler.known_words`).
- The distance between the segments is drawn uniformly (Book-SORT stratifies it in 4 bins); it is recorded in
  ``meta["distance_words"]``.
"""

from __future__ import annotations

import bisect
import csv
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_longmem.validation import check_int

from .haystack import count_tokens, fit_num_units
from .ruler import word_pool
from .schema import Sample, Turn
from .tasks import _check_common, register_task

SORT_PRE = (
    "Please take some time to thoroughly read and comprehend this extract from the book {title}. "
    "The passage is as follows: {excerpt}"
)
SORT_POST = (
    "You will be shown pairs of text fragments from {title}. Please select which of two fragments appeared first in "
    "the book. You will be shown 10 such pairs. Segment A: {a} Segment B: {b}\n"
    "Which fragment appeared first in the book, A or B?"
)
SORT_ANSWER_PREFIX = "Answer: Segment"
SORT_CHOICES = (" A", " B")
SYNTHETIC_TITLE = "The Garden"
_SENTENCE = re.compile(r"[^.!?]+[.!?]+[\"')\]]*\s*|[^.!?]+$")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (ending at ``.``, ``!`` or ``?``), whitespace-normalised."""
    return [s for s in (" ".join(m.split()) for m in _SENTENCE.findall(text)) if s]


def _synthetic_sentences(rng: random.Random, words: Sequence[str], count: int) -> list[str]:
    return [f"The {a} is in the {b}." for a, b in (rng.sample(list(words), 2) for _ in range(count))]


def _place_segments(
    sentences: Sequence[str], u1: float, u2: float, segment_words: int, min_distance: int
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Two segments of whole sentences, ``[start, end)`` each, of at least ``segment_words`` words, the second
    starting at least ``min_distance`` words after the first and after its end; ``u1``, ``u2`` in ``[0, 1)`` pick them
    uniformly among the valid starts. ``None`` when the sentences are too few."""
    cum = [0]
    for sentence in sentences:
        cum.append(cum[-1] + len(sentence.split()))
    n = len(sentences)
    # ends[i]: first e with cum[e] - cum[i] >= segment_words (None past the last completable start).
    ends = [bisect.bisect_left(cum, cum[i] + segment_words) for i in range(n)]
    last = max((i for i in range(n) if ends[i] <= n), default=None)
    if last is None:
        return None

    def earliest_second(i: int) -> int:
        return max(ends[i], bisect.bisect_left(cum, cum[i] + min_distance))

    valid_first = [i for i in range(n) if earliest_second(i) <= last]
    if not valid_first:
        return None
    i1 = valid_first[int(u1 * len(valid_first))]
    j0 = earliest_second(i1)
    i2 = j0 + int(u2 * (last - j0 + 1))
    return (i1, ends[i1]), (i2, ends[i2])


def sort_sample(
    task: str,
    title: str,
    excerpt: str,
    segment_1: str,
    segment_2: str,
    present_seg1_first: bool,
    meta: dict[str, Any],
    sample_id: str,
) -> Sample:
    """A SORT sample: ``segment_1`` appears before ``segment_2`` in ``excerpt``; ``present_seg1_first`` labels
    ``segment_1`` as A (else B), so the answer is ``"A"`` or ``"B"`` accordingly."""
    a, b = (segment_1, segment_2) if present_seg1_first else (segment_2, segment_1)
    context = SORT_PRE.format(title=title, excerpt=excerpt)
    query = "\n" + SORT_POST.format(title=title, a=a, b=b) + "\n" + SORT_ANSWER_PREFIX
    answer = "A" if present_seg1_first else "B"
    meta = {**meta, "choices": list(SORT_CHOICES), "metric": "exact_match", "present_seg1_first": present_seg1_first}
    return Sample(id=sample_id, task=task, context=context, turns=[Turn(query, [answer], 2)], meta=meta)


def _read_text(text: str | None, path: str | os.PathLike | None) -> str | None:
    if text is not None and path is not None:
        raise ValueError("pass either `text` or `path`, not both")
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"text file not found: {os.fspath(path)!r}") from None
    if text is not None and not isinstance(text, str):
        raise ValueError(f"`text` must be a string, got {type(text).__name__}")
    return text


@register_task("sort", metric="exact_match")
def sort(
    tokenizer: Any,
    length: int,
    num_samples: int,
    seed: int = 0,
    *,
    text: str | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    segment_words: int = 20,
    min_distance_words: int | None = None,
) -> list[Sample]:
    """SORT samples from a text (the user's book) or a synthetic story, fitted to ``length`` tokens.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`hf_longmem.evals.tasks.passkey`; the prompt is the excerpt
            and the question with both segments.
        text: the text to draw excerpts from (its sentences); ``None`` with no ``path``: a synthetic story.
        path: a UTF-8 text file to read ``text`` from.
        title: the book title in the prompt (default: the file name, or ``"The Garden"``).
        segment_words: minimum words of a segment (Book-SORT: 20 or 50).
        min_distance_words: minimum words between the starts of the two segments (default ``segment_words``, so they
            never overlap).

    Returns:
        Single-turn samples with ``meta["choices"] = [" A", " B"]``; the answer is the label of the earlier segment.
    """
    _check_common(tokenizer, length, num_samples, seed)
    check_int("segment_words", segment_words, low=1)
    min_distance = check_int(
        "min_distance_words", segment_words if min_distance_words is None else min_distance_words, low=segment_words
    )
    source = _read_text(text, path)
    if title is None:
        title = Path(path).stem if path is not None else (SYNTHETIC_TITLE if text is None else "Untitled")
    book = split_sentences(source) if source is not None else None
    words = None if book is not None else word_pool(tokenizer, None, 2, "a synthetic SORT story")
    if book is not None and len(book) < 2:
        raise ValueError("the text has fewer than two sentences; SORT needs two segments from it")
    samples = []
    for index in range(num_samples):
        rng = random.Random(f"sort:{seed}:{index}")
        story = _synthetic_sentences(rng, words, max(length, 8)) if book is None else book
        start = rng.randrange(len(story))
        story = story[start:] + story[:start]  # the excerpt starts at a random sentence (wrapping around)
        draw = _Draw(rng.random(), rng.random(), rng.random() < 0.5, segment_words, min_distance, title)
        sample_id = f"sort-{seed}-{index}"

        def count(n: int, story: list[str] = story, draw: _Draw = draw, sample_id: str = sample_id) -> int:
            if n > len(story):
                return length + 1
            sample = draw.sample(story[:n], sample_id)
            return 0 if sample is None else count_tokens(tokenizer, sample.context + sample.turns[0].query)

        n, num_tokens = fit_num_units(count, length)
        sample = draw.sample(story[:n], sample_id)
        if sample is None:
            raise ValueError(
                f"length={length} is too short for two {segment_words}-word segments {min_distance} words apart"
                + ("" if book is None else " (or the text is too short)")
            )
        sample.meta.update(length=length, num_tokens=num_tokens, seed=seed, index=index, title=title)
        samples.append(sample)
    return samples


@dataclass(frozen=True)
class _Draw:
    """The random choices of one SORT sample (where the segments fall, which is labelled A), independent of the
    excerpt's length so that the length fit changes only the excerpt."""

    u1: float
    u2: float
    present_seg1_first: bool
    segment_words: int
    min_distance: int
    title: str

    def sample(self, excerpt: list[str], sample_id: str) -> Sample | None:
        placed = _place_segments(excerpt, self.u1, self.u2, self.segment_words, self.min_distance)
        if placed is None:
            return None
        (i1, e1), (i2, e2) = placed
        meta = {
            "distance_words": sum(len(s.split()) for s in excerpt[i1:i2]),
            "excerpt_words": sum(len(s.split()) for s in excerpt),
            "excerpt_sentences": len(excerpt),
        }
        return sort_sample(
            "sort",
            self.title,
            " ".join(excerpt),
            " ".join(excerpt[i1:e1]),
            " ".join(excerpt[i2:e2]),
            self.present_seg1_first,
            meta,
            sample_id,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Book-SORT CSV files
# ----------------------------------------------------------------------------------------------------------------------

BOOKSORT_COLUMNS = {
    "books": ("book_idx", "book_title"),
    "excerpts": ("book_idx", "excerpt_idx", "excerpt_text"),
    "segments": ("book_idx", "excerpt_idx", "segment_1", "segment_2", "present_seg1_first"),
}


def _read_csv(path: Path, kind: str) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in BOOKSORT_COLUMNS[kind] if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{os.fspath(path)!r} ({kind} table) lacks the Book-SORT column(s) {missing}")
            rows = list(reader)
    except FileNotFoundError:
        raise ValueError(f"Book-SORT file not found: {os.fspath(path)!r}") from None
    except csv.Error as error:
        raise ValueError(f"{os.fspath(path)!r} is not a readable CSV file: {error}") from None
    return rows


def _int(value: str, path: Path, row: int, column: str) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise ValueError(
            f"{os.fspath(path)!r} row {row}: column {column!r} must be an integer, got {value!r}"
        ) from None


def load_booksort(
    segments_path: str | os.PathLike, *, max_excerpt_index: int | None = 100, task: str = "booksort"
) -> list[Sample]:
    """SORT samples from local Book-SORT CSV files (``segments_*.csv`` with its ``excerpts_*`` and ``books_*``).

    The three tables of one condition (``segments_{L_E}-s{L_S}-n{n}.csv`` and the ``excerpts_``/``books_`` files of
    the same suffix, in the same folder, as written by ``run_booksort_creation.py``) are joined on ``book_idx`` and
    ``excerpt_idx``; the segments are presented in the order ``present_seg1_first`` says, as the official evaluation
    does.

    Args:
        segments_path: the ``segments_*.csv`` file.
        max_excerpt_index: keep excerpts with ``excerpt_idx`` below this (official: the first 100); ``None``: all.
        task: the samples' task name.

    Returns:
        Samples in file order, not length-fitted (``meta["length"]`` is ``None``).

    Raises:
        ValueError: for a missing file, a missing column, a non-integer index or a segment row without its excerpt.
    """
    segments_path = Path(segments_path)
    if not segments_path.name.startswith("segments"):
        raise ValueError(f"expected a Book-SORT segments_*.csv file, got {segments_path.name!r}")
    suffix = segments_path.name[len("segments") :]
    excerpts_path = segments_path.with_name("excerpts" + suffix)
    books_path = segments_path.with_name("books" + suffix)
    books = {
        _int(r["book_idx"], books_path, i, "book_idx"): r["book_title"]
        for i, r in enumerate(_read_csv(books_path, "books"))
    }
    excerpts = {
        (_int(r["book_idx"], excerpts_path, i, "book_idx"), _int(r["excerpt_idx"], excerpts_path, i, "excerpt_idx")): r
        for i, r in enumerate(_read_csv(excerpts_path, "excerpts"))
    }
    samples = []
    for i, row in enumerate(_read_csv(segments_path, "segments")):
        book = _int(row["book_idx"], segments_path, i, "book_idx")
        excerpt_idx = _int(row["excerpt_idx"], segments_path, i, "excerpt_idx")
        if max_excerpt_index is not None and excerpt_idx >= max_excerpt_index:
            continue
        if (book, excerpt_idx) not in excerpts:
            raise ValueError(f"{os.fspath(segments_path)!r} row {i}: no excerpt {excerpt_idx} of book {book}")
        first = bool(_int(row["present_seg1_first"], segments_path, i, "present_seg1_first"))
        excerpt = excerpts[(book, excerpt_idx)]["excerpt_text"]
        meta = {
            "length": None,
            "book_idx": book,
            "excerpt_idx": excerpt_idx,
            "distance_bin": row.get("distance_bin"),
            "title": books.get(book, ""),
        }
        title = books.get(book, "")
        samples.append(
            sort_sample(task, title, excerpt, row["segment_1"], row["segment_2"], first, meta, f"{task}-{book}-{i}")
        )
    return samples
