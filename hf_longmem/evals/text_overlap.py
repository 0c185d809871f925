"""Text-overlap scores as the long-context benchmarks' official scorers compute them, without their packages.

- :func:`rouge_l_f`: ROUGE-L F of the ``rouge`` package (pltrdy/rouge 1.0.1, ``Rouge().get_scores([hyp], [ref],
  avg=True)["rouge-l"]["f"]`` inside LongBench's ``try/except -> 0.0``), used by LongBench and SCBench's
  ``rouge_score``.
- :func:`rouge_lsum_f`: ``rougeLsum`` F of Google's ``rouge_score`` 0.1.2 as HF ``evaluate.load("rouge")`` runs it
  (default tokenizer, no stemmer, sentences split on newlines), used by InfiniteBench and SCBench summaries.
- :func:`fuzz_ratio`: ``fuzzywuzzy.fuzz.ratio`` 0.18.0 **without** python-Levenshtein, i.e. on
  :class:`difflib.SequenceMatcher` (LongBench's ``requirements.txt`` installs fuzzywuzzy alone; with
  python-Levenshtein installed fuzzywuzzy uses a Levenshtein ratio instead and gives different numbers).
- :func:`jieba_words`: jieba's accurate-mode word segmentation (``jieba.cut(text, cut_all=False)``) for the Chinese
  LongBench datasets; jieba is an optional dependency (``pip install 'hf-longmem[zh]'``).

Deviation, and why: pltrdy's ROUGE-L rebuilds the longest common subsequence recursively, so a sentence pair of more
than ~1000 words exceeds Python's recursion limit there and LongBench's bare ``except`` scores it 0.0 (this happens
mostly on the Chinese summaries, whose sentences are never split because they end in "。", not "."); here the
reconstruction is iterative and such pairs get their real score (checked: two random 800-word one-sentence texts over
8 letters score 0.0 with the package and 0.999999995 here).
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections import Counter

__all__ = ["JIEBA_MISSING", "fuzz_ratio", "jieba_available", "jieba_words", "rouge_l_f", "rouge_lsum_f"]

JIEBA_MISSING = (
    "LongBench's Chinese datasets (multifieldqa_zh, dureader, vcsum) are scored on jieba word segmentation, as the "
    "official scorer does; install it with `pip install 'hf-longmem[zh]'` (or `pip install jieba`)"
)


def _lcs_table(x: list[str], y: list[str]) -> list[list[int]]:
    """``table[i][j]``: LCS length of ``x[:i]`` and ``y[:j]``."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, xi in enumerate(x, start=1):
        row, previous = table[i], table[i - 1]
        for j, yj in enumerate(y, start=1):
            row[j] = previous[j - 1] + 1 if xi == yj else max(previous[j], row[j - 1])
    return table


# ----------------------------------------------------------------------------------------------------------------------
# pltrdy/rouge (LongBench, SCBench's rouge_score)
# ----------------------------------------------------------------------------------------------------------------------


def _pltrdy_sentences(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(".") if len(part) > 0]


def _pltrdy_words(sentences: list[str]) -> list[str]:
    return list(itertools.chain(*[sentence.split(" ") for sentence in sentences]))


def _pltrdy_lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of pltrdy's ``_recon_lcs(x, y)`` (its tie-breaking: up only when strictly better), iteratively."""
    table = _lcs_table(x, y)
    i, j, words = len(x), len(y), set()
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_f(hypothesis: str, reference: str) -> float:
    """LongBench's ``rouge_score``: pltrdy ``rouge`` 1.0.1 ROUGE-L (summary level) F, 0.0 where the package raises.

    The package splits both texts into sentences on ``"."`` (whitespace collapsed), words on single spaces, and works
    on *sets* of words (its default ``exclusive=True``): ``m``/``n`` are the numbers of distinct reference/hypothesis
    words and the hit count is the number of distinct words in the union of the LCS of every (reference sentence,
    hypothesis sentence) pair. ``F = 2 P R / (P + R + 1e-8)``. A text without a sentence (``""``, ``"..."``) makes the
    package raise, which LongBench scores 0.0.

    >>> rouge_l_f("the cat sat", "the cat sat on the mat")  # P = 1, R = 3/5
    0.7499999953125
    """
    hyp, ref = _pltrdy_sentences(hypothesis), _pltrdy_sentences(reference)
    if not hyp or not ref:  # rouge-1 raises "Hypothesis is empty." / "Reference is empty."
        return 0.0
    m = len(set(_pltrdy_words(ref)))
    n = len(set(_pltrdy_words(hyp)))
    union: set[str] = set()
    hyp_words = [_pltrdy_words([sentence]) for sentence in hyp]
    for sentence in ref:
        ref_words = _pltrdy_words([sentence])
        for words in hyp_words:
            union |= _pltrdy_lcs_words(ref_words, words)
    recall, precision = len(union) / m, len(union) / n
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


# ----------------------------------------------------------------------------------------------------------------------
# Google rouge_score rougeLsum (InfiniteBench / SCBench via HF evaluate)
# ----------------------------------------------------------------------------------------------------------------------

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def _rouge_score_tokens(text: str) -> list[str]:
    """``rouge_score.tokenize.tokenize(text, stemmer=None)``: lower case, ``[a-z0-9]+`` tokens."""
    return [t for t in _SPACES.split(_NON_ALPHANUM.sub(" ", text.lower())) if _VALID_TOKEN.match(t)]


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    """``rouge_score``'s ``lcs_ind``: indices into ``ref`` of one LCS (its tie-breaking: left only when strictly
    better)."""
    table = _lcs_table(ref, can)
    i, j, indices = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            indices.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return indices[::-1]


def rouge_lsum_f(prediction: str, target: str) -> float:
    """``rougeLsum`` F of ``rouge_score`` 0.1.2 (``RougeScorer(["rougeLsum"]).score(target, prediction)``).

    Sentences are the non-empty lines; tokens are lower-cased ``[a-z0-9]+`` runs; hits count the tokens of the union
    LCS of each reference sentence with all prediction sentences, each token at most as often as it occurs in both
    texts (ROUGE 1.5.5). ``F = 2 P R / (P + R)``, 0 without tokens.

    >>> round(rouge_lsum_f("the cat sat", "the cat sat on the mat"), 6)
    0.666667
    """
    ref = [_rouge_score_tokens(s) for s in target.split("\n") if len(s)]
    can = [_rouge_score_tokens(s) for s in prediction.split("\n") if len(s)]
    if not ref or not can:
        return 0.0
    m, n = sum(map(len, ref)), sum(map(len, can))
    if not n or not m:
        return 0.0
    counts_r = Counter(itertools.chain(*ref))
    counts_c = Counter(itertools.chain(*can))
    hits = 0
    for sentence in ref:
        union = sorted(set().union(*[_lcs_indices(sentence, c) for c in can]))
        for token in (sentence[i] for i in union):
            if counts_c[token] > 0 and counts_r[token] > 0:
                hits += 1
                counts_c[token] -= 1
                counts_r[token] -= 1
    recall, precision = hits / m, hits / n
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# fuzzywuzzy ratio, jieba
# ----------------------------------------------------------------------------------------------------------------------


def fuzz_ratio(s1: str, s2: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` on :class:`difflib.SequenceMatcher` (fuzzywuzzy without python-Levenshtein):
    100 for equal strings, 0 when one is empty, else ``round(100 * SequenceMatcher(None, s1, s2).ratio())``
    (Python's round-half-to-even, as fuzzywuzzy's ``intr``).

    >>> fuzz_ratio("abcd", "abce")
    75
    """
    if s1 == s2:
        return 100
    if not s1 or not s2:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, s1, s2).ratio()))


def jieba_words(text: str) -> list[str]:
    """jieba's accurate-mode segmentation (``list(jieba.cut(text, cut_all=False))``); ``ValueError`` naming the
    optional dependency when jieba is not installed."""
    try:
        import jieba
    except ImportError:
        raise ValueError(JIEBA_MISSING) from None
    return list(jieba.cut(text, cut_all=False))


def jieba_available() -> bool:
    """Whether jieba can be imported (checked by the loaders before any work is done)."""
    try:
        import jieba  # noqa: F401
    except ImportError:
        return False
    return True
