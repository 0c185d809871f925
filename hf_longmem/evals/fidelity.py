"""Fidelity of a compressed cache against the full (dense) cache on the same prompt.

The full cache generates a greedy continuation of the prompt. That continuation is then fed, token by token, through
the compressed cache (teacher forcing), so both runs predict the same positions from the same prefixes and only the
cache differs. At every generated position we compare the two next-token distributions:

* ``top1_agreement``: fraction of positions where both caches pick the same most likely token;
* ``kl``: mean ``KL(p_full || p_compressed)`` in nats.

Dense against dense gives agreement 1 and KL ~0; a cache that drops context the prompt needs gives KL > 0. Unlike
task accuracy, this is informative on randomly initialised models too.

Example::

    from hf_longmem.evals.fidelity import prompt_fidelity
    result = prompt_fidelity(model, input_ids, "streaming", cache_options={"budget": 64}, max_new_tokens=16)
    result.kl, result.top1_agreement
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache

from hf_longmem.registry import make_cache

from .profiling import greedy_generate, prefill

__all__ = [
    "FidelityResult",
    "Reference",
    "compare_to_reference",
    "kl_divergence",
    "prompt_fidelity",
    "reference_continuation",
]


@dataclass
class Reference:
    """The full cache's greedy continuation of a prompt.

    Attributes:
        input_ids: ``[1, n]`` the prompt.
        tokens: ``[T]`` int64 greedy continuation (EOS included when it stopped there).
        logprobs: ``[T, vocab]`` float32 next-token log-probabilities at each continuation position.
    """

    input_ids: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor


@dataclass
class FidelityResult:
    """Agreement of a cache with the full cache over ``num_positions`` teacher-forced positions.

    Attributes:
        top1_agreement: fraction of positions where the argmax tokens agree, in ``[0, 1]``.
        kl: mean ``KL(p_full || p_cache)`` in nats (``>= 0``).
        num_positions: positions compared (the length of the reference continuation).
        kl_per_position: ``KL`` at each position.
    """

    top1_agreement: float
    kl: float
    num_positions: int
    kl_per_position: list[float] = field(default_factory=list)


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dimension from log-probabilities.

    Args:
        reference_logprobs: ``[..., vocab]`` ``log p`` (the full cache).
        logprobs: ``[..., vocab]`` ``log q`` (the compressed cache).

    Returns:
        ``[...]`` float32 divergences in nats, clamped at 0 (rounding can make identical distributions slightly
        negative). Tokens with ``p = 0`` contribute 0.
    """
    if reference_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"`reference_logprobs` and `logprobs` must have the same shape, got {tuple(reference_logprobs.shape)} "
            f"and {tuple(logprobs.shape)}"
        )
    log_p = reference_logprobs.float()
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - logprobs.float()), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)


def _as_batch_of_one(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"`input_ids` must be [n] or [1, n] (one prompt), got shape {tuple(input_ids.shape)}")
    return input_ids


def reference_continuation(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None = None,
    reference_cache: str = "full",
    stop_at_eos: bool = True,
) -> Reference:
    """Greedy continuation of ``input_ids`` (``[n]`` or ``[1, n]``) with the uncompressed ``reference_cache``.

    Args:
        model: the causal LM.
        input_ids: one prompt.
        max_new_tokens: positions to generate and later compare.
        eos_token_id: ids that end the continuation (default: the model's).
        reference_cache: registry name of the dense cache.
        stop_at_eos: stop at EOS (else always generate ``max_new_tokens`` positions).
    """
    input_ids = _as_batch_of_one(input_ids)
    eos = eos_token_id if stop_at_eos else []
    out = greedy_generate(
        model,
        input_ids,
        make_cache(reference_cache, model),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        return_logprobs=True,
    )
    length = out.lengths[0]
    return Reference(input_ids=input_ids, tokens=out.sequences[0, :length], logprobs=out.logprobs[0, :length])


def compare_to_reference(
    model: torch.nn.Module, reference: Reference, cache: Cache, *, context_length: int | None = None
) -> FidelityResult:
    """Teacher-forces the reference continuation through a fresh ``cache`` and compares the distributions.

    The prompt is prefilled in one forward (so the cache compresses it as in generation), or, with
    ``context_length``, as two forwards: the first ``context_length`` tokens (the context, compressed without seeing
    the question, as in the harness's rollback/append modes), then the rest. The continuation is then fed one token
    per step (so decode-time eviction happens as in generation).

    Args:
        model: the causal LM.
        reference: the full cache's :func:`reference_continuation` of the prompt.
        cache: an empty cache.
        context_length: split point of the prompt, ``0 < context_length < n``; ``None`` prefills it at once.
    """
    prompt = reference.input_ids
    forced = reference.tokens[None].to(prompt.device)
    past = 0
    if context_length is not None:
        if not 0 < context_length < prompt.shape[1]:
            raise ValueError(f"`context_length` must be in (0, {prompt.shape[1]}), got {context_length}")
        prefill(model, prompt[:, :context_length], cache)
        prompt, past = prompt[:, context_length:], context_length
    out = greedy_generate(
        model,
        prompt,
        cache,
        max_new_tokens=forced.shape[1],
        forced_tokens=forced,
        eos_token_id=[],
        return_logprobs=True,
        past_length=past,
    )
    logprobs = out.logprobs[0].to(reference.logprobs.device)
    kl = kl_divergence(reference.logprobs, logprobs)
    agree = (logprobs.argmax(-1) == reference.logprobs.argmax(-1)).float()
    return FidelityResult(
        top1_agreement=float(agree.double().mean()),
        kl=float(kl.double().mean()),
        num_positions=int(kl.numel()),
        kl_per_position=kl.tolist(),
    )


def prompt_fidelity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: str | Cache,
    *,
    max_new_tokens: int = 16,
    cache_options: Mapping[str, Any] | None = None,
    reference: Reference | None = None,
    eos_token_id: int | Iterable[int] | None = None,
) -> FidelityResult:
    """Fidelity of one cache on one prompt.

    Args:
        model: the causal LM.
        input_ids: ``[n]`` or ``[1, n]`` prompt.
        cache: a registry name (built with ``cache_options``) or a fresh ``Cache`` instance.
        max_new_tokens: positions compared (fewer when the reference stops at EOS).
        cache_options: options of a cache given by name.
        reference: a precomputed :func:`reference_continuation` of this prompt (reused across caches).
        eos_token_id: ids that end the reference continuation (default: the model's).

    Returns:
        A :class:`FidelityResult`.
    """
    input_ids = _as_batch_of_one(input_ids)
    if isinstance(cache, str):
        cache = make_cache(cache, model, **dict(cache_options or {}))
    elif cache_options:
        raise ValueError("`cache_options` applies only when `cache` is a registry name, not a Cache instance")
    if reference is None:
        reference = reference_continuation(model, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    elif not torch.equal(reference.input_ids.cpu(), input_ids.cpu()):
        raise ValueError("`reference` was computed for a different prompt than `input_ids`")
    return compare_to_reference(model, reference, cache)
