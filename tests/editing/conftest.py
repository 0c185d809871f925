"""Fixtures of the WISE tests: the closed word-level tokenizer of the embedded model, one torch thread."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.evals.vocab import build_tokenizer


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """Tiny models run fastest on one thread (idle OpenMP threads spin and slow a shared machine down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def word_tokenizer():
    """The closed word-level tokenizer of the embedded model (354 pieces; pad 0, BOS 1, EOS 2, UNK 3)."""
    return build_tokenizer()
