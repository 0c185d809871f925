"""RMMPolicy: Reflective Memory Management (Tan et al., ACL 2025, arXiv 2503.08026; no official code).

- **Prospective reflection** (:meth:`RMMPolicy.reflect_session`): at the end of a session the LLM extracts topic-level
  memories (``{"extracted_memories": [{"summary", "reference": [turn ids]}]}`` or ``NO_TRAIT``); each one is compared
  with its most similar memories and the LLM answers ``Add()`` or ``Merge(index, merged summary)``. A merge
  *supersedes* the memory it names (:meth:`MemoryStore.update`), so the pre-merge text stays in its history.
- **Retrospective reflection** (:class:`CitationReranker`): the retriever's top ``candidates`` memories are reranked by
  a learnable adapter, ``q' = q + W_q q``, ``m'_i = m_i + W_m m_i``, ``s_i = q'·m'_i``; the top ``M`` are sampled with
  the Gumbel trick (``s~_i = s_i + g_i``, ``g_i = -log(-log u_i)``, ``p = softmax(s~ / tau)``); after the answer, each
  shown memory gets reward ``R_i = +1`` if the answer cites it, else ``-1``, and the adapter takes one REINFORCE step
  ``phi += eta * sum_i (R_i - b) * grad_phi log p_i`` (the paper's ``Delta phi = eta (R - b) grad log P(M_M | q,
  M_K)``, with the sampled set's log-probability taken as the sum over its members).

Deviations (with the reason):

1. ``W_q`` and ``W_m`` start at zero, so an untrained reranker is the embedder's cosine (the paper does not state its
   initialisation); the update is plain SGD on each answered question (no batching or optimiser state).
2. The reranker embeds with its own dense embedder (default ``HashingEmbedder(dim=256)``; any :class:`Embedder`, e.g.
   :class:`LMEmbedder`): the store's default BM25 rows are sparse counts, not embeddings an adapter can act on.
3. Citations come from ``cite``: ``"brackets"`` reads ``[0, 2]``-style indices in the answer (the paper's generator
   cites this way; indices follow the prompt's order, exposed to ``memory_template`` as ``{index}``), ``"overlap"``
   attributes a memory when a word of 3+ characters of the answer appears in it (for readers that cannot cite, such
   as the embedded model), or a function ``(answer, texts) -> indices``.
4. The prompts are our English renderings of the task (the paper's appendix prompts are not copied); the defaults
   (``candidates=20``, ``tau=0.5``, ``eta=1e-2``, ``b=0.5``) are ours.
5. ``prior_weight`` (default 1) adds the retriever's score, standardised over the ``K`` candidates, to
   ``s_i`` as a constant (it has no gradient, so the update rule is unchanged): with a model-free embedder the paper's
   reranker alone starts far below the BM25 retriever (on the synthetic set below: recall@1 0.07 with Gumbel
   sampling, against 1.00 for BM25), and an online learner must not start by discarding its retriever's ranking.
   ``prior_weight=0`` is the paper's reranker alone.
6. Without an ``llm`` nothing is reflected prospectively: :meth:`ingest` writes the turn as it is (what the synthetic
   evaluation uses, since the embedded model cannot summarise).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hf_longmem.files import atomic_write
from hf_longmem.validation import check_int, check_real

from .embedders import Embedder, HashingEmbedder
from .llm import LLM
from .policy import MemoryPolicy
from .records import MemoryRecord, to_seconds
from .store import MemoryStore

__all__ = ["CitationReranker", "RMMPolicy", "bracket_citations", "overlap_citations", "parse_update_actions"]

EXTRACTION_PROMPT = (
    "Read the dialogue session below between SPEAKER_1 (the assistant) and SPEAKER_2 (the user). Extract short "
    "personal summaries of SPEAKER_2 (experiences, preferences, facts, background), one per topic, each with the "
    "ids of the turns it comes from. Keep names, numbers and dates exactly. Answer in JSON: "
    '{{"extracted_memories": [{{"summary": "...", "reference": [0, 1]}}]}}. If there is nothing personal, answer '
    "NO_TRAIT.\n\nSession:\n{dialogue}\nOutput:"
)
UPDATE_PROMPT = (
    "A new personal summary was extracted from a conversation. Compare it with the existing memories below. If it "
    "repeats or refines memory i, answer Merge(i, <one summary combining both, newest facts winning>). If it is "
    "new, answer Add(). One action per line.\n\nExisting memories:\n{memories}\n\nNew summary: {summary}\nActions:"
)

_MERGE = re.compile(r"Merge\(\s*(\d+)\s*,\s*(.+?)\)\s*$", re.MULTILINE)
_BRACKETS = re.compile(r"\[([\d,\s]+)\]")
_WORD = re.compile(r"[A-Za-z0-9]+")


def parse_update_actions(text: str) -> tuple[bool, list[tuple[int, str]]]:
    """An update reply -> ``(add, [(index, merged summary), ...])``; later merges of an index replace earlier ones."""
    merges: dict[int, str] = {}
    for match in _MERGE.finditer(text):
        summary = match[2].strip()
        if summary:
            merges[int(match[1])] = summary
    return "Add()" in text, list(merges.items())


def _parse_extraction(text: str) -> list[dict[str, Any]]:
    if "NO_TRAIT" in text:
        return []
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start : text.rfind("}") + 1])
        except ValueError:
            start = text.find("{", start + 1)
            continue
        items = value.get("extracted_memories") if isinstance(value, dict) else None
        if not isinstance(items, list):
            return []
        out = []
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("summary"), str) and item["summary"].strip():
                refs = item.get("reference", [])
                refs = (
                    [int(r) for r in refs if isinstance(r, int) and not isinstance(r, bool)]
                    if isinstance(refs, list)
                    else []
                )
                out.append({"summary": item["summary"].strip(), "reference": refs})
        return out
    return []


def bracket_citations(answer: str, texts: Sequence[str]) -> set[int]:
    """Indices cited as ``[0]`` / ``[0, 2]`` in ``answer`` that name one of the ``len(texts)`` shown memories."""
    cited = set()
    for match in _BRACKETS.finditer(answer):
        cited.update(int(p) for p in match[1].replace(" ", "").split(",") if p)
    return {i for i in cited if i < len(texts)}


def overlap_citations(answer: str, texts: Sequence[str]) -> set[int]:
    """Memories that contain (as a whole word, case-insensitive) a word of 3+ characters of ``answer``."""
    words = {w.lower() for w in _WORD.findall(answer) if len(w) >= 3}
    return {i for i, text in enumerate(texts) if words & {w.lower() for w in _WORD.findall(text)}}


class CitationReranker:
    """The retrospective-reflection reranker: a residual linear adapter on query and memory embeddings.

    Args:
        dim: embedding size.
        temperature: ``tau`` of the Gumbel-softmax.
        learning_rate: ``eta`` of the REINFORCE step.
        baseline: ``b``, subtracted from each reward.
        seed: seeds the Gumbel noise.
    """

    def __init__(
        self, dim: int, *, temperature: float = 0.5, learning_rate: float = 1e-2, baseline: float = 0.5, seed: int = 0
    ):
        self.dim = check_int("dim", dim, low=1)
        self.temperature = check_real("temperature", temperature, low=0.0, strict_low=True)
        self.learning_rate = check_real("learning_rate", learning_rate, low=0.0)
        self.baseline = check_real("baseline", baseline)
        self.w_q = torch.zeros(dim, dim)  # (dim, dim)
        self.w_m = torch.zeros(dim, dim)  # (dim, dim)
        self.generator = torch.Generator().manual_seed(check_int("seed", seed, low=0))
        #: REINFORCE steps taken.
        self.updates = 0

    def _check(self, query: torch.Tensor, memories: torch.Tensor) -> None:
        if query.shape != (self.dim,) or memories.ndim != 2 or memories.shape[1] != self.dim:
            raise ValueError(
                f"expected query ({self.dim},) and memories (K, {self.dim}), got {tuple(query.shape)} and "
                f"{tuple(memories.shape)}"
            )

    def scores(self, query: torch.Tensor, memories: torch.Tensor, w_q=None, w_m=None) -> torch.Tensor:
        """``query (dim,)``, ``memories (K, dim)`` -> ``s (K,)`` = ``(m + m W_m^T) (q + W_q q)``."""
        self._check(query, memories)
        w_q = self.w_q if w_q is None else w_q
        w_m = self.w_m if w_m is None else w_m
        q = query + w_q @ query  # (dim,)
        m = memories + memories @ w_m.T  # (K, dim)
        return m @ q

    def gumbel(self, count: int) -> torch.Tensor:
        """``count`` draws of ``-log(-log u)``, ``u ~ U(0, 1)`` (from the reranker's seeded generator)."""
        u = torch.rand(count, generator=self.generator).clamp(1e-10, 1 - 1e-7)
        return -torch.log(-torch.log(u))

    def select(
        self,
        query: torch.Tensor,
        memories: torch.Tensor,
        count: int,
        *,
        explore: bool = True,
        prior: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` memories with the highest ``s + g`` (``g = 0`` without ``explore``) -> ``(indices (M,),
        offset (K,))`` where ``offset = prior + g`` is what :meth:`update` adds to the scores; ties keep the
        retriever's order. ``prior (K,)``: a constant added to the scores (no gradient)."""
        noise = self.gumbel(memories.shape[0]) if explore else torch.zeros(memories.shape[0])
        if prior is not None:
            noise = noise + prior
        perturbed = self.scores(query, memories) + noise
        order = torch.sort(perturbed, descending=True, stable=True).indices
        return order[: min(count, memories.shape[0])], noise

    def gradients(
        self, query: torch.Tensor, memories: torch.Tensor, noise: torch.Tensor, chosen: Sequence[int], rewards
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_i (R_i - b) grad log p_i`` for ``W_q`` and ``W_m``, ``p = softmax((s + noise) / tau)``."""
        w_q = self.w_q.clone().requires_grad_(True)
        w_m = self.w_m.clone().requires_grad_(True)
        log_p = torch.log_softmax((self.scores(query, memories, w_q, w_m) + noise) / self.temperature, dim=0)
        advantage = torch.as_tensor(rewards, dtype=torch.float32) - self.baseline  # (M,)
        objective = (advantage * log_p[torch.as_tensor(list(chosen), dtype=torch.long)]).sum()
        grad_q, grad_m = torch.autograd.grad(objective, (w_q, w_m))
        return grad_q, grad_m

    def update(self, query, memories, noise, chosen: Sequence[int], rewards: Sequence[float]) -> None:
        """One REINFORCE step: ``W += eta * sum_i (R_i - b) grad log p_i`` (rewards of the ``chosen`` rows)."""
        if len(chosen) != len(rewards):
            raise ValueError(f"{len(chosen)} chosen memories but {len(rewards)} rewards")
        if not chosen:
            return
        grad_q, grad_m = self.gradients(query, memories, noise, chosen, rewards)
        self.w_q += self.learning_rate * grad_q
        self.w_m += self.learning_rate * grad_m
        self.updates += 1

    def save(self, path: str | Path) -> Path:
        """The adapter as safetensors (atomic write)."""
        meta = {"temperature": str(self.temperature), "updates": str(self.updates)}
        return atomic_write(path, lambda tmp: save_file({"w_q": self.w_q, "w_m": self.w_m}, str(tmp), metadata=meta))

    def load(self, path: str | Path) -> None:
        """Loads an adapter written by :meth:`save` (shapes checked)."""
        tensors = load_file(str(path))
        for name in ("w_q", "w_m"):
            if name not in tensors or tuple(tensors[name].shape) != (self.dim, self.dim):
                raise ValueError(f"{path}: expected a ({self.dim}, {self.dim}) tensor `{name}`")
        self.w_q, self.w_m = tensors["w_q"].float(), tensors["w_m"].float()


class RMMPolicy(MemoryPolicy):
    """Reflective Memory Management over a :class:`MemoryStore`.

    Args:
        llm: the LLM for prospective reflection (``None``: turns are stored as they are).
        embedder: the reranker's dense embedder (default ``HashingEmbedder(dim=256)``).
        candidates: ``K``, memories the retriever hands to the reranker (``retrieve(k)`` returns ``M = k`` of them).
        merge_candidates: existing memories shown to the Add/Merge step.
        cite: ``"overlap"``, ``"brackets"`` or ``fn(answer, texts) -> indices``: how citations are read.
        explore: sample with Gumbel noise (the paper's online RL); ``False`` takes the top ``M`` deterministically.
        learn: update the reranker after each answer.
        temperature / learning_rate / baseline / seed: the :class:`CitationReranker`'s.
        prior_weight: weight of the retriever's score (standardised over the candidates) added to the reranker's
            score as a constant; ``0`` is the paper's reranker alone.
    """

    def __init__(
        self,
        llm: LLM | None = None,
        *,
        embedder: Embedder | None = None,
        candidates: int = 20,
        merge_candidates: int = 5,
        cite: str | Callable[[str, Sequence[str]], set[int]] = "overlap",
        explore: bool = True,
        learn: bool = True,
        temperature: float = 0.5,
        learning_rate: float = 1e-2,
        baseline: float = 0.5,
        seed: int = 0,
        prior_weight: float = 1.0,
        max_new_tokens: int = 256,
        supersede_key=None,
    ):
        super().__init__(supersede_key=supersede_key)
        if llm is not None and not isinstance(llm, LLM):
            raise ValueError(f"`llm` must be an hf_longmem.agents LLM or None, got {type(llm).__name__}")
        if embedder is not None and not isinstance(embedder, Embedder):
            raise ValueError(f"`embedder` must be an hf_longmem.agents Embedder, got {type(embedder).__name__}")
        if cite == "overlap":
            cite = overlap_citations
        elif cite == "brackets":
            cite = bracket_citations
        elif not callable(cite):
            raise ValueError(f"`cite` must be 'overlap', 'brackets' or a function, got {cite!r}")
        self.llm = llm
        self.embedder = embedder if embedder is not None else HashingEmbedder(dim=256)
        self.candidates = check_int("candidates", candidates, low=1)
        self.merge_candidates = check_int("merge_candidates", merge_candidates, low=1)
        self.cite = cite
        self.explore = bool(explore)
        self.learn = bool(learn)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        self.prior_weight = check_real("prior_weight", prior_weight, low=0.0)
        self.reranker = CitationReranker(
            self.embedder.dim, temperature=temperature, learning_rate=learning_rate, baseline=baseline, seed=seed
        )
        self._last: dict[str, Any] | None = None
        #: Rewards of every update so far (``+1`` cited, ``-1`` not), in order.
        self.rewards: list[float] = []

    # -- prospective reflection ---------------------------------------------------------------------------------

    def reflect_session(
        self,
        store: MemoryStore,
        turns: Sequence[dict[str, str]],
        *,
        session_id: str | None,
        timestamp: Any,
        user_id: str | None = None,
    ) -> list[str]:
        """Extracts topic memories from a finished session and adds or merges each; returns the ids written."""
        self._check_store(store)
        if self.llm is None:
            raise ValueError("prospective reflection needs an `llm`")
        if not isinstance(turns, (list, tuple)) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns
        ):
            raise ValueError("`turns` must be a list of {'role': str, 'content': str} dicts")
        lines, turn = [], 0
        for t in turns:
            speaker = "SPEAKER_2" if t["role"] == "user" else "SPEAKER_1"
            if t["role"] == "user" and lines:
                turn += 1
            if not lines or (t["role"] == "user"):
                lines.append(f"Turn {turn}:")
            lines.append(f"  {speaker}: {t['content']}")
        reply = self.llm.generate(EXTRACTION_PROMPT.format(dialogue="\n".join(lines)), self.max_new_tokens)
        written = []
        for memory in _parse_extraction(reply):
            metadata = {"kind": "topic", "reference": memory["reference"]}
            neighbors = (
                store.search(memory["summary"], self.merge_candidates, filter={"user_id": user_id} if user_id else None)
                if len(store)
                else []
            )
            merges: list[tuple[int, str]] = []
            if neighbors:
                shown = "\n".join(f"{i}. {n.text}" for i, n in enumerate(neighbors))
                decision = self.llm.generate(
                    UPDATE_PROMPT.format(memories=shown, summary=memory["summary"]), self.max_new_tokens
                )
                _, merges = parse_update_actions(decision)
                merges = [(i, s) for i, s in merges if i < len(neighbors)]
            if merges:
                for i, merged in merges:
                    store.update(neighbors[i].id, merged, timestamp=timestamp, metadata=metadata, session_id=session_id)
                    written.append(neighbors[i].id)
            else:
                written.append(
                    super().ingest(
                        store,
                        memory["summary"],
                        session_id=session_id,
                        timestamp=timestamp,
                        user_id=user_id,
                        metadata=metadata,
                    )
                )
        return written

    # -- retrospective reflection -------------------------------------------------------------------------------

    def retrieve(self, store: MemoryStore, query: str, k: int, *, now, as_of=None, filter=None) -> list[MemoryRecord]:
        """The retriever's top ``candidates``, reranked; ``k`` of them (sampled with Gumbel noise when ``explore``)."""
        check_int("k", k, low=1)
        pool = super().retrieve(store, query, max(self.candidates, k), now=now, as_of=as_of, filter=filter)
        if not pool:
            self._last = None
            return []
        vectors = self.embedder.embed([query, *(r.text for r in pool)])  # (1 + K, dim)
        prior = None
        if self.prior_weight:
            scores = torch.tensor([r.score for r in pool], dtype=torch.float32)  # (K,)
            spread = scores.std() if len(pool) > 1 else torch.tensor(0.0)
            prior = self.prior_weight * (scores - scores.mean()) / (spread if spread > 0 else 1.0)
        chosen, noise = self.reranker.select(vectors[0], vectors[1:], k, explore=self.explore, prior=prior)
        out = [pool[i] for i in chosen.tolist()]
        self._last = {"query": vectors[0], "memories": vectors[1:], "noise": noise, "ids": [r.id for r in pool]}
        return out

    def after_answer(self, store: MemoryStore, query: str, shown: list[MemoryRecord], answer: str, *, now) -> None:
        """Rewards each shown memory (``+1`` cited by ``answer``, ``-1`` not) and updates the reranker."""
        to_seconds(now, "now")
        last, self._last = self._last, None
        if not self.learn or last is None or not shown:
            return
        position = {memory_id: i for i, memory_id in enumerate(last["ids"])}
        rows = [position[r.id] for r in shown if r.id in position]
        texts = [r.text for r in shown if r.id in position]
        cited = self.cite(answer, texts)
        rewards = [1.0 if i in cited else -1.0 for i in range(len(rows))]
        self.reranker.update(last["query"], last["memories"], last["noise"], rows, rewards)
        self.rewards.extend(rewards)
