"""Helpers of the WISE tests: tiny random models sized for a tokenizer, fast editor settings."""

from __future__ import annotations

from hf_longmem.editing import WISEConfig
from tests.helpers.tiny_models import tiny_model

#: Fast settings: the bare prompt as the only context template, few steps.
FAST = dict(context_templates=["{}"], n_iter=25)


def make_model(tokenizer, shape: str = "llama_gqa", seed: int = 0, **overrides):
    """A tiny random model (``tests.helpers.tiny_models``) whose vocabulary fits ``tokenizer``."""
    return tiny_model(shape, seed=seed, vocab_size=len(tokenizer), **overrides)


def fast_config(**overrides) -> WISEConfig:
    return WISEConfig(**{**FAST, **overrides})
