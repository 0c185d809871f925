"""One small interface for the LLM steps of the policies (summaries, reflections, answers): ``generate(prompt,
max_new_tokens) -> str``.

:class:`TransformersLLM` backs it with any transformers causal LM (greedy decoding, offline); :class:`FunctionLLM`
wraps a Python function (a deterministic fake for tests, or a user's own client).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_longmem.validation import check_int, check_optional_int

__all__ = ["LLM", "FunctionLLM", "TransformersLLM"]


class LLM:
    """The interface: ``generate(prompt, max_new_tokens) -> str`` (the continuation only, without the prompt)."""

    def generate(self, prompt: str, max_new_tokens: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` (whitespace words unless the backend has a tokenizer)."""
        return len(text.split())

    def truncate(self, text: str, max_tokens: int) -> str:
        """The first ``max_tokens`` tokens of ``text`` (whitespace words unless the backend has a tokenizer)."""
        return " ".join(text.split()[:max_tokens])


def _check_prompt(prompt, max_new_tokens) -> int:
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string, got {type(prompt).__name__}")
    return check_int("max_new_tokens", max_new_tokens, low=1)


class FunctionLLM(LLM):
    """``generate`` calls ``fn(prompt, max_new_tokens) -> str``; every call is kept in ``calls`` (prompt, tokens)."""

    def __init__(self, fn: Callable[[str, int], str]):
        if not callable(fn):
            raise ValueError(f"`fn` must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.calls: list[tuple[str, int]] = []

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        max_new_tokens = _check_prompt(prompt, max_new_tokens)
        self.calls.append((prompt, max_new_tokens))
        out = self.fn(prompt, max_new_tokens)
        if not isinstance(out, str):
            raise ValueError(f"`fn` must return a string, got {type(out).__name__}")
        return out


class TransformersLLM(LLM):
    """Greedy generation with a transformers causal LM.

    Args:
        model: any ``AutoModelForCausalLM`` model.
        tokenizer: its tokenizer.
        max_input_tokens: prompts longer than this keep their last ``max_input_tokens`` tokens (``None``: no limit).
    """

    def __init__(self, model, tokenizer, *, max_input_tokens: int | None = None):
        if not callable(tokenizer):
            raise ValueError(f"`tokenizer` must be a callable Hugging Face tokenizer, got {type(tokenizer).__name__}")
        if not hasattr(model, "generate"):
            raise ValueError(f"`model` must be a transformers model with `generate`, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_input_tokens = check_optional_int("max_input_tokens", max_input_tokens, low=1)
        #: Prompt tokens of the last call (after truncation): what the prefill cost.
        self.last_prompt_tokens = 0

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens])

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int) -> str:
        max_new_tokens = _check_prompt(prompt, max_new_tokens)
        device = next(self.model.parameters()).device
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, T)
        if self.max_input_tokens is not None and ids.shape[1] > self.max_input_tokens:
            ids = ids[:, -self.max_input_tokens :]
        self.last_prompt_tokens = int(ids.shape[1])
        ids = ids.to(device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        )  # (1, T + new)
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
