"""Log-likelihood scoring of answer choices *through the cache under test*.

lm-eval's log-likelihood path feeds ``context + continuation`` in one forward, so a compressed KV cache never
changes its scores. :func:`score_choices` instead prefills the context once into the cache (which compresses it as
it does during generation), then scores every choice from a ``copy.deepcopy`` of that cache: the choices never see
each other and the compression decision is the same for all of them. With the full cache the scores equal the
one-forward log-likelihoods (up to float rounding); with an evicting cache they drift, and :func:`choice_kl` measures
how far the distribution over the choices moved.

Tokenisation follows the harness (:mod:`hf_longmem.evals.runner`): the context is encoded with the tokenizer's
special tokens (BOS), every choice without them, and the ids are concatenated; so a choice normally starts with a
space (``" 71432"``).

Example::

    from hf_longmem import load_default_model
    from hf_longmem.evals import choice_kl, score_choices
    model, tok = load_default_model()
    full = score_choices(model, tok, context, [" 71432", " 50211"])
    small = score_choices(model, tok, context, [" 71432", " 50211"], cache="streaming", cache_options={"budget": 64})
    full.best, choice_kl(full, small)
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

from hf_longmem.cache_classes.base import cache_memory_bytes
from hf_longmem.registry import make_cache

from .metrics import metric_for, metric_options, score
from .profiling import PeakMemory, model_device, prefill
from .schema import Sample

__all__ = ["ChoiceScores", "choice_kl", "choice_logprobs", "evaluate_choices", "is_choice_task", "score_choices"]


@dataclass
class ChoiceScores:
    """Scores of the choices of one context.

    Attributes:
        logprobs: summed log-probability (nats) of each choice's tokens after the context.
        num_tokens: token count of each choice.
        greedy: whether each choice is the greedy continuation (every token the argmax), as lm-eval's ``is_greedy``.
        context_tokens: tokens prefilled before the choices' copies (the context, special tokens included, and the
            query with ``query_in_prefill``).
        prefill_s: seconds of the context prefill (the forward that fills and compresses the cache).
    """

    logprobs: list[float]
    num_tokens: list[int]
    greedy: list[bool]
    context_tokens: int
    prefill_s: float = 0.0

    @property
    def best(self) -> int:
        """Index of the most likely choice (the first one on ties)."""
        return max(range(len(self.logprobs)), key=lambda i: (self.logprobs[i], -i))

    def distribution(self, normalize: bool = False) -> torch.Tensor:
        """``[num_choices]`` float64 log-probabilities of a choice given that one of the choices is picked.

        Args:
            normalize: divide each summed log-probability by the choice's token count first (lm-eval's
                ``acc_norm`` uses characters; per token keeps the measure tokenizer-independent in length).
        """
        scores = torch.tensor(self.logprobs, dtype=torch.float64)
        if normalize:
            scores = scores / torch.tensor(self.num_tokens, dtype=torch.float64)
        return torch.log_softmax(scores, dim=0)


def choice_kl(reference: ChoiceScores, other: ChoiceScores, *, normalize: bool = False) -> float:
    """``KL(p_reference || p_other)`` in nats between the choice distributions of two scorings of the same choices.

    Raises:
        ValueError: if the two scorings have different numbers of choices or different choice token counts.
    """
    if reference.num_tokens != other.num_tokens:
        raise ValueError(
            f"the two scorings are of different choices (token counts {reference.num_tokens} vs {other.num_tokens})"
        )
    log_p, log_q = reference.distribution(normalize), other.distribution(normalize)
    return float((log_p.exp() * (log_p - log_q)).sum().clamp_min(0.0))


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


def _cache_arg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


@torch.inference_mode()
def choice_logprobs(
    model: torch.nn.Module, cache: Cache, last_logits: torch.Tensor, past_length: int, choice_ids: list[int]
) -> tuple[float, bool]:
    """Summed log-probability of ``choice_ids`` continuing a cache that has seen ``past_length`` tokens.

    Args:
        model: the causal LM.
        cache: a cache holding the context; it is extended by the choice (pass a copy to keep it).
        last_logits: ``[1, vocab]`` next-token logits after the context's last token.
        past_length: tokens the cache has seen.
        choice_ids: the choice's tokens, at least one.

    Returns:
        ``(logprob, greedy)``.
    """
    device = model_device(model)
    target = torch.tensor(choice_ids, dtype=torch.long, device=device)
    logits = last_logits.float().reshape(1, -1)
    if len(choice_ids) > 1:
        fed = target[None, :-1]
        positions = torch.arange(past_length, past_length + fed.shape[1], device=device)[None]
        out = model(input_ids=fed, position_ids=positions, use_cache=True, **{_cache_arg(model): cache})
        logits = torch.cat([logits, out.logits[0].float()], dim=0)
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(1, target[:, None])[:, 0]
    greedy = bool((logprobs.argmax(-1) == target).all())
    return float(picked.double().sum()), greedy


def score_choices(
    model: torch.nn.Module,
    tokenizer: Any,
    context: str,
    choices: Sequence[str],
    cache: str | Cache = "full",
    *,
    query: str = "",
    query_in_prefill: bool = False,
    cache_options: Mapping[str, Any] | None = None,
) -> ChoiceScores:
    """Summed log-probability of each choice's tokens after ``context`` (and ``query``), read through ``cache``.

    The context is prefilled once (in one forward, or in chunks where the cache's ``generate_kwargs`` or the model's
    ``generation_config`` set ``prefill_chunk_size``, as ``generate`` does) into ``cache``, which compresses it;
    the query and each choice are then fed from a deep copy of that cache, so the base cache ends holding the
    context only.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        context: the text before the choices (encoded with special tokens).
        choices: candidate continuations (encoded without special tokens), usually starting with a space.
        cache: a registry name (built with ``cache_options``) or a fresh, empty ``Cache``.
        query: text between the context and the choices (encoded without special tokens), e.g. the question and an
            answer prefix; by default fed *after* the context is compressed (the runner's rollback mode).
        query_in_prefill: prefill context and query in one forward instead, so that a query-aware cache (SnapKV)
            compresses with the question in view (the runner's single mode).
        cache_options: options of a cache given by name, e.g. ``{"budget": 64}``.

    Returns:
        A :class:`ChoiceScores` (``.best`` is the most likely choice).

    Raises:
        ValueError: for no choices, a choice or context without tokens, options with a ``Cache`` instance, or a
            cache that already holds tokens.
    """
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
        raise ValueError("`choices` must be a non-empty list of strings")
    if not isinstance(context, str) or not all(isinstance(c, str) for c in choices):
        raise ValueError("`context` and every choice must be strings")
    if isinstance(cache, str):
        cache = make_cache(cache, model, **dict(cache_options or {}))
    elif not isinstance(cache, Cache):
        raise ValueError(f"`cache` must be a registry name or a transformers Cache, got {type(cache).__name__}")
    elif cache_options:
        raise ValueError("`cache_options` applies only when `cache` is a registry name, not a Cache instance")
    elif cache.get_seq_length() != 0:
        raise ValueError(f"`cache` must be empty, it has seen {cache.get_seq_length()} tokens; pass a fresh cache")
    context_ids = _encode(tokenizer, context, special=True)
    if not context_ids:
        raise ValueError("`context` encodes to no tokens; the first choice token needs a context to follow")
    query_ids = _encode(tokenizer, query, special=False) if query else []
    encoded = [_encode(tokenizer, choice, special=False) for choice in choices]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"choice(s) {empty} encode to no tokens: {[choices[i] for i in empty]}")
    if query_in_prefill:
        context_ids, query_ids = context_ids + query_ids, []
    ids = torch.tensor([context_ids], dtype=torch.long, device=model_device(model))
    last_logits, prefill_s = prefill(model, ids, cache)
    past = len(context_ids)
    results = []
    for choice_ids in encoded:
        work = copy.deepcopy(cache)
        logits = last_logits
        if query_ids:
            logits, _ = prefill(
                model, torch.tensor([query_ids], dtype=torch.long, device=ids.device), work, past_length=past
            )
        results.append(choice_logprobs(model, work, logits, past + len(query_ids), choice_ids))
    return ChoiceScores(
        logprobs=[r[0] for r in results],
        num_tokens=[len(c) for c in encoded],
        greedy=[r[1] for r in results],
        context_tokens=len(context_ids),
        prefill_s=prefill_s,
    )


def is_choice_task(samples: Sequence[Sample]) -> bool:
    """Whether ``samples`` are scored by choice (every sample has ``meta["choices"]``); ``ValueError`` if mixed."""
    flags = {isinstance(s.meta.get("choices"), list) for s in samples}
    if len(flags) > 1:
        raise ValueError("some samples have meta['choices'] and others do not; evaluate them separately")
    return flags == {True}


def evaluate_choices(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    cache_name: str,
    cache_options: Mapping[str, Any] | None = None,
    *,
    mode: str = "rollback",
    metric: str | None = None,
    cache_label: str | None = None,
    fidelity: bool = False,
    references: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Scores samples whose turns are answered by choice (``meta["choices"]``, e.g. SORT's ``[" A", " B"]``).

    Every turn is :func:`score_choices` of ``sample.context`` and ``turn.query`` through a fresh
    ``make_cache(cache_name, model, **cache_options)``; the prediction is the most likely choice, stripped, scored
    against ``turn.answers``.

    Args:
        model, tokenizer, samples, cache_name, cache_options, metric, cache_label: as in
            :func:`hf_longmem.evals.runner.evaluate`.
        mode: ``"rollback"``: the context is compressed before the question is seen, each turn from a copy;
            ``"single"``: context and question are prefilled (and compressed) together. Ranking has no ``"append"``
            mode (there is no generated answer to append).
        fidelity: also score with the full cache: ``top1_agreement`` is 1.0 when both caches pick the same choice,
            ``kl`` is :func:`choice_kl` (full vs this cache), on every turn.
        references: memo of the full cache's scores, keyed ``"choices:<sample id>:<turn>"`` (shared between caches).

    Returns:
        One record per (sample, turn) with the keys of :func:`hf_longmem.evals.runner.evaluate`'s records
        (``decode_*`` are ``None``), plus ``choice_logprobs`` and ``scored_by = "choices"``.
    """
    if mode not in ("single", "rollback"):
        raise ValueError(f"choice-scored samples are answered in mode 'single' or 'rollback', got mode={mode!r}")
    in_prefill = mode == "single"
    options = dict(cache_options or {})
    make_cache(cache_name, model, **options)  # fail fast on bad options
    memo = references if references is not None else {}
    records = []
    for sample in samples:
        choices = sample.meta["choices"]
        for index, turn in enumerate(sample.turns):
            cache = make_cache(cache_name, model, **options)
            with PeakMemory(model_device(model)) as peak:
                result = score_choices(
                    model, tokenizer, sample.context, choices, cache, query=turn.query, query_in_prefill=in_prefill
                )
            prediction = choices[result.best].strip()
            query_tokens = len(_encode(tokenizer, turn.query, special=False)) if turn.query else 0
            name = metric or metric_for(sample.task, sample.meta, turn)
            record = {
                "sample_id": sample.id,
                "task": sample.task,
                "turn": index,
                "context_length": sample.meta.get("length"),
                "prediction": prediction,
                "answers": list(turn.answers),
                "metric": name,
                "score": score(prediction, turn.answers, name, **metric_options(sample.meta, name)),
                "num_new_tokens": result.num_tokens[result.best],
                "stopped_at_eos": False,
                "mode": mode,
                "cache": cache_label or cache_name,
                "cache_name": cache_name,
                "cache_kwargs": options,
                # As the runner counts them: tokens fed this turn, and tokens the cache saw before it.
                "num_prompt_tokens": result.context_tokens if in_prefill else query_tokens,
                "num_cached_tokens": 0 if in_prefill else result.context_tokens,
                "prefill_s": result.prefill_s,
                "decode_s": None,
                "decode_tokens_per_s": None,
                "context_prefill_s": None,
                "kv_bytes": cache_memory_bytes(cache),
                "peak_memory_bytes": peak.peak_bytes,
                "peak_memory_kind": peak.kind,
                "batch_size": 1,
                "top1_agreement": None,
                "kl": None,
                "choice_logprobs": result.logprobs,
                "scored_by": "choices",
            }
            if fidelity:
                key = f"choices:{mode}:{sample.id}:{index}"
                if key not in memo:
                    memo[key] = score_choices(
                        model, tokenizer, sample.context, choices, "full", query=turn.query, query_in_prefill=in_prefill
                    )
                full = memo[key]
                record.update(top1_agreement=float(full.best == result.best), kl=choice_kl(full, result))
            records.append(record)
    return records
