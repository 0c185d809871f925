"""Closed word-level tokenizer covering the synthetic tasks (used by the embedded tiny model).

Pieces are words with an optional leading space (``"The"``, ``" grass"``), single digits with an optional
leading space (``" 7"``, ``"1"``), single punctuation marks with an optional leading space, ``"\\n"`` and
runs of spaces. Decoding concatenates the pieces, so ``decode(encode(text)) == text`` for any text made
of known pieces; unknown pieces map to ``[UNK]``. Encoding prepends ``<s>`` (BOS), like Llama tokenizers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .tasks import vocabulary_texts

UNK, BOS, EOS, PAD = "[UNK]", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)

#: One piece per match: a word, a digit or a symbol (each with an optional leading space), a newline, spaces.
PIECE_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]|\n| +|\s"


def pieces(text: str) -> list[str]:
    """Split ``text`` the way the tokenizer's pre-tokenizer does."""
    return re.findall(PIECE_PATTERN, text)


def build_vocab(texts: Iterable[str] | None = None) -> dict[str, int]:
    """Piece -> id: special tokens first, then every piece of ``texts`` with and without a leading space.

    Args:
        texts: texts to cover; defaults to :func:`hf_longmem.evals.tasks.vocabulary_texts`.

    Returns:
        A deterministic vocabulary (sorted pieces) that also contains all digits and ``"\\n"``, ``" "``.
    """
    found: set[str] = {"\n", " "}
    for text in vocabulary_texts() if texts is None else texts:
        for piece in pieces(text):
            if piece.strip():
                word = piece.lstrip(" ")
                found.update((word, " " + word))
    found.update(d for digit in "0123456789" for d in (digit, " " + digit))
    ordered = list(SPECIAL_TOKENS) + sorted(found)
    return {piece: index for index, piece in enumerate(ordered)}


def extended_vocabulary_texts() -> list[str]:
    """The task generators' texts plus RULER's multi-value / multi-query needle phrasing and the fictional facts.

    The vocabulary of these texts (``build_tokenizer(extended=True)``) also covers
    :func:`hf_longmem.evals.ruler.niah_multivalue`, :func:`~hf_longmem.evals.ruler.niah_multiquery` (", and"),
    :func:`hf_longmem.evals.facts.fact_qa` and the WISE fictional facts of :mod:`hf_longmem.editing.data`.
    """
    from hf_longmem.editing.data import UNRELATED_TEMPLATES

    from . import facts, ruler

    texts = vocabulary_texts() + facts.vocabulary_texts()
    for kind in ("numbers", "number"):
        keys = ruler._join_keys(["apple", "river", "candle"])
        texts += [ruler.NIAH_INTRO.format(kind=kind), ruler.NIAH_QUERY.format(kind=kind, query=keys)]
    texts.append(ruler._singular(ruler.NIAH_QUERY.format(kind="numbers", query="apple"), "numbers"))
    texts += [f"{prompt} {answer}" for prompt, answer in UNRELATED_TEMPLATES]
    return texts


def build_tokenizer(
    texts: Iterable[str] | None = None, model_max_length: int = 1 << 20, extended: bool = False
) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer over :func:`build_vocab` (left padding, BOS prepended).

    Args:
        texts: texts whose pieces form the vocabulary; defaults to the task generators' texts
            (:func:`extended_vocabulary_texts` with ``extended``).
        model_max_length: stored in the tokenizer config (the tiny model itself is limited by RoPE quality,
            not by a hard maximum).

    Returns:
        A ``PreTrainedTokenizerFast`` that ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip.
    """
    if texts is None and extended:
        texts = extended_vocabulary_texts()
    vocab = build_vocab(texts)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
