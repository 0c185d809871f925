"""Turning user documents into token-id pieces of at most ``max_tokens`` for :meth:`CMTForCausalLM.memorize`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SENTENCE_END = ".!?\n"


def _check_max_tokens(max_tokens: int, prefix: list[int]) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= len(prefix):
        raise ValueError(f"max_tokens must be an integer > {len(prefix)} (the special prefix), got {max_tokens!r}")
    return max_tokens - len(prefix)


def pack_pieces(ids: list[int], boundaries: list[bool], room: int) -> list[list[int]]:
    """Greedy split of ``ids`` into pieces of at most ``room`` tokens, cutting after the last boundary that fits.

    Args:
        ids: token ids.
        boundaries: ``boundaries[i]`` is True when a piece may end after token ``i`` (a sentence end).
        room: the most tokens per piece (``>= 1``).
    """
    pieces, start = [], 0
    while start < len(ids):
        end = min(start + room, len(ids))
        if end < len(ids):
            cut = next((i + 1 for i in range(end - 1, start - 1, -1) if boundaries[i]), None)
            end = cut if cut is not None else end  # a sentence longer than the room is cut mid-sentence
        pieces.append(ids[start:end])
        start = end
    return pieces


def split_text(text: str, tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Token ids of ``text`` in pieces of at most ``max_tokens`` (special prefix such as BOS included in each).

    Pieces end at sentence ends (a token whose text ends with ``.``, ``!``, ``?`` or a newline) whenever one fits,
    so that a fact stated in one sentence lands in one memory.
    """
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    room = _check_max_tokens(max_tokens, prefix)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    boundaries = [end > 0 and text[end - 1] in SENTENCE_END for _, end in offsets]
    return [prefix + piece for piece in pack_pieces(ids, boundaries, room)]


def as_token_pieces(
    documents: str | Sequence[str] | Sequence[Sequence[int]] | torch.Tensor,
    tokenizer: Any | None,
    max_tokens: int,
) -> tuple[list[list[int]], list[int]]:
    """Normalise ``documents`` into token-id pieces of at most ``max_tokens``.

    Args:
        documents: one text, a list of texts (needs ``tokenizer``), a list of token-id lists, or a ``[n, T]`` tensor
            of token ids (every row a whole document without padding).
        tokenizer: turns texts into ids.
        max_tokens: the most tokens per piece; longer documents are split (texts at sentence ends).

    Returns:
        ``(pieces, owners)``: the pieces and, for each, the index of the document it came from.

    Raises:
        ValueError: no documents, an empty document, texts without a tokenizer, or non-integer ids.
    """
    if isinstance(documents, str):
        documents = [documents]
    if isinstance(documents, torch.Tensor):
        if documents.dim() != 2 or documents.dtype.is_floating_point:
            raise ValueError(f"documents as a tensor must be [n, T] integer ids, got {tuple(documents.shape)}")
        documents = documents.tolist()
    if not isinstance(documents, Sequence) or len(documents) == 0:
        raise ValueError("documents must be a non-empty list of texts or token-id lists")
    pieces: list[list[int]] = []
    owners: list[int] = []
    for index, document in enumerate(documents):
        if isinstance(document, str):
            if tokenizer is None:
                raise ValueError("tokenizer is required to memorize texts (or pass token-id lists)")
            if not document.strip():
                raise ValueError(f"documents[{index}] is empty")
            split = split_text(document, tokenizer, max_tokens)
        else:
            ids = document.tolist() if isinstance(document, torch.Tensor) else list(document)
            if not ids:
                raise ValueError(f"documents[{index}] is empty")
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"documents[{index}] must hold non-negative integer token ids")
            split = pack_pieces(ids, [False] * len(ids), _check_max_tokens(max_tokens, []))
        if not split:
            raise ValueError(f"documents[{index}] is empty")
        pieces.extend(split)
        owners.extend([index] * len(split))
    return pieces, owners


def left_pad(pieces: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: ``[n, max_len]`` left-padded ids and their 0/1 attention mask."""
    width = max(len(p) for p in pieces)
    ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pieces), width), dtype=torch.long)
    for row, piece in enumerate(pieces):
        if piece:
            ids[row, width - len(piece) :] = torch.as_tensor(piece, dtype=torch.long)
            mask[row, width - len(piece) :] = 1
    return ids, mask
