"""Text embedders for the memory store: a model-free hashing embedder (the default) and any transformers model.

Both map a list of ``N`` texts to an ``(N, dim)`` float32 tensor of unit rows, so that a dot product is the cosine
similarity and :func:`top_k` is one matmul. An embedder describes itself with :meth:`config` (a JSON dict), which the
store saves next to its records and checks when it is reopened: vectors from two different embedders never mix.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import torch

from hf_longmem.validation import check_int

__all__ = ["BM25Embedder", "Embedder", "HashingEmbedder", "LMEmbedder", "embedder_from_config", "top_k"]

_WORD = re.compile(r"[a-z0-9]+")


class Embedder:
    """The interface: ``dim``, ``embed(texts) -> (N, dim)`` unit rows, ``config() -> dict`` (JSON)."""

    dim: int

    def embed(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def config(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``query (dim,)``, ``keys (N, dim)`` -> ``(N,)`` similarities (cosine: one matmul of unit rows)."""
        return keys @ query


class HashingEmbedder(Embedder):
    """Signed feature hashing of lower-cased word n-grams (1..``ngram``), sublinear term frequency, L2-normalised.

    Deterministic across processes and machines (BLAKE2b of the n-gram, not Python's salted ``hash``), needs no
    weights and no fitting, and is fast: the default embedder of :class:`~hf_longmem.agents.MemoryStore`.

    Args:
        dim: vector size (>= 16). Collisions fall as ``dim`` grows.
        ngram: longest word n-gram hashed (1..4).
    """

    def __init__(self, dim: int = 1024, ngram: int = 2):
        self.dim = check_int("dim", dim, low=16)
        self.ngram = check_int("ngram", ngram, low=1, high=4)

    def _features(self, text: str) -> dict[int, float]:
        words = _WORD.findall(text.lower())
        counts: dict[tuple[int, float], int] = {}
        for n in range(1, self.ngram + 1):
            for i in range(len(words) - n + 1):
                gram = " ".join(words[i : i + n]).encode("utf-8")
                digest = int.from_bytes(hashlib.blake2b(gram, digest_size=8).digest(), "little")
                key = (digest % self.dim, 1.0 if (digest >> 63) & 1 else -1.0)
                counts[key] = counts.get(key, 0) + 1
        features: dict[int, float] = {}
        for (index, sign), count in counts.items():
            features[index] = features.get(index, 0.0) + sign * (1.0 + math.log(count))
        return features

    def embed(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (N strings) -> ``(N, dim)`` float32, unit rows (an empty text gives a zero row)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("`texts` must be a list of strings")
        out = torch.zeros(len(texts), self.dim, dtype=torch.float32)
        for row, text in enumerate(texts):
            for index, value in self._features(text).items():
                out[row, index] = value
        return torch.nn.functional.normalize(out, dim=-1)

    def config(self) -> dict[str, Any]:
        return {"type": "hashing", "dim": self.dim, "ngram": self.ngram}


class BM25Embedder(Embedder):
    """Okapi BM25 over hashed words: the model-free default of the store.

    ``embed`` gives each text its raw word counts hashed (unsigned, BLAKE2b) into ``dim`` buckets; :meth:`score`
    computes BM25 against the searched rows, with document frequencies, lengths and the average length taken over
    those rows (as ``rank_bm25.BM25Okapi``, which LongMemEval's ``flat-bm25`` retriever uses, does over its corpus):
    ``sum_t idf(t) * qtf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))`` with
    ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))``. Rare words (a name, a subject) outweigh common ones, which
    plain hashing cannot do.

    Args:
        dim: hash buckets (collisions fall as it grows; stored rows are ``dim`` float32).
        k1, b: BM25's term-saturation and length-normalisation constants.
    """

    def __init__(self, dim: int = 4096, k1: float = 1.5, b: float = 0.75):
        self.dim = check_int("dim", dim, low=16)
        if not isinstance(k1, (int, float)) or isinstance(k1, bool) or not k1 > 0:
            raise ValueError(f"`k1` must be a number > 0, got {k1!r}")
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0 <= b <= 1:
            raise ValueError(f"`b` must be a number in [0, 1], got {b!r}")
        self.k1, self.b = float(k1), float(b)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (N strings) -> ``(N, dim)`` float32 hashed word counts."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("`texts` must be a list of strings")
        out = torch.zeros(len(texts), self.dim, dtype=torch.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                digest = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
                out[row, digest % self.dim] += 1.0
        return out

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``query (dim,)`` counts, ``keys (N, dim)`` counts -> ``(N,)`` BM25 scores over these ``N`` rows."""
        n = keys.shape[0]
        df = (keys > 0).sum(0).to(torch.float32)  # (dim,)
        idf = torch.log1p((n - df + 0.5) / (df + 0.5))  # (dim,)
        length = keys.sum(1, keepdim=True)  # (N, 1)
        norm = self.k1 * (1 - self.b + self.b * length / length.mean().clamp(min=1e-9))  # (N, 1)
        saturated = keys * (self.k1 + 1) / (keys + norm)  # (N, dim)
        return saturated @ (idf * query)

    def config(self) -> dict[str, Any]:
        return {"type": "bm25", "dim": self.dim, "k1": self.k1, "b": self.b}


class LMEmbedder(Embedder):
    """Mean of one layer's hidden states (over the non-padding tokens) of any transformers model, L2-normalised.

    Args:
        model: a transformers model that returns ``hidden_states`` (``output_hidden_states=True``).
        tokenizer: its tokenizer.
        layer: index into ``hidden_states`` (``-1``: the last layer; ``0``: the embeddings).
        max_length: texts are truncated to this many tokens.
        batch_size: texts per forward pass.
    """

    def __init__(self, model, tokenizer, *, layer: int = -1, max_length: int = 512, batch_size: int = 8):
        if not callable(tokenizer):
            raise ValueError(f"`tokenizer` must be a callable Hugging Face tokenizer, got {type(tokenizer).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        num_layers = int(getattr(model.config, "num_hidden_layers", 0))
        self.layer = check_int("layer", layer, low=-(num_layers + 1), high=num_layers)
        self.max_length = check_int("max_length", max_length, low=1)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.dim = int(model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (N strings) -> ``(N, hidden_size)`` float32, unit rows."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("`texts` must be a list of strings")
        device = next(self.model.parameters()).device
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            # One text at a time when the tokenizer has no pad token; otherwise a padded batch with its mask.
            for chunk in [batch] if self.tokenizer.pad_token_id is not None else [[t] for t in batch]:
                enc = self.tokenizer(
                    chunk, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
                ).to(device)
                attention_mask = enc["attention_mask"]  # (B, T)
                # Positions count real tokens only, so a left-padded row gets the positions it has alone.
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
                hidden = self.model(
                    input_ids=enc["input_ids"],
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    output_hidden_states=True,
                ).hidden_states[self.layer]  # (B, T, H)
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
                rows.append(mean.float().cpu())
        out = torch.cat(rows) if rows else torch.zeros(0, self.dim)
        return torch.nn.functional.normalize(out, dim=-1)

    def config(self) -> dict[str, Any]:
        name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return {"type": "lm", "model": str(name), "layer": self.layer, "dim": self.dim}


def embedder_from_config(config: dict[str, Any]) -> Embedder:
    """Rebuilds a model-free embedder from its :meth:`~Embedder.config`; an LM embedder must be passed explicitly."""
    if config.get("type") == "hashing":
        return HashingEmbedder(dim=int(config["dim"]), ngram=int(config["ngram"]))
    if config.get("type") == "bm25":
        return BM25Embedder(dim=int(config["dim"]), k1=float(config["k1"]), b=float(config["b"]))
    raise ValueError(
        f"the store was written with the embedder {config!r}; pass `embedder=` (an embedder with this config) to open it"
    )


def top_k(
    query: torch.Tensor, keys: torch.Tensor, k: int, embedder: Embedder | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (``embedder.score``, default ``keys @ query``) and the indices of the ``k`` best (ties: lower index
    first).

    Args:
        query: ``(dim,)`` vector.
        keys: ``(N, dim)`` rows.
        k: how many (clipped to ``N``).
        embedder: whose ``score`` to use (``None``: the dot product).

    Returns:
        ``(scores (k,), indices (k,))``, best first.
    """
    if keys.shape[0] == 0:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    scores = keys @ query if embedder is None else embedder.score(query, keys)  # (N,)
    k = min(k, scores.shape[0])
    # Stable descending sort so that equal scores keep insertion order (deterministic ranking).
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return scores[order], order
