"""Slow but obviously-correct references the caches are checked against."""

from __future__ import annotations

import torch


def masked_logits(model, sequence: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits of one full forward over ``sequence`` ``[1, T]`` where token ``i`` may attend to ``j`` iff
    ``allowed[i, j]`` (``[T, T]`` bool). Returns ``[T, vocab]``."""
    mask = allowed[None, None]
    if model.config._attn_implementation.endswith("eager"):
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return model(sequence, attention_mask=mask).logits[0]


def streaming_visibility(total: int, prompt: int, budget: int, sink: int) -> torch.Tensor:
    """``[T, T]``: what each token sees under StreamingLLM with exact prefill (true positions)."""
    i = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    return (j <= i) & ((i < prompt) | (j < sink) | (j >= i - (budget - sink)))


def greedy(model, input_ids, cache, max_new_tokens=12, **kwargs):
    """Greedy generation returning (sequences, stacked logits ``[steps, batch, vocab]``), with the cache's
    ``generate_kwargs`` (EM-LLM's execution-block prefill) unless given."""
    kwargs = {**(getattr(cache, "generate_kwargs", None) or {}), **kwargs}
    out = model.generate(
        input_ids,
        cache=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits)
