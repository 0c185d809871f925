"""Shared fixtures: tiny random models built from configs (never downloaded)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Triton kernels: without a GPU they run on CPU tensors under the interpreter, which must be chosen before triton
# is first imported (TRITON_INTERPRET=0 on a GPU machine runs tests/kernels compiled, on CUDA tensors). Under the
# interpreter an autotuner would time every config; keep the first.
os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ["TRITON_INTERPRET"] == "1" and importlib.util.find_spec("triton") is not None:
    from triton.runtime.autotuner import Autotuner

    Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]

from tests.helpers.tiny_models import MODEL_SHAPES, tiny_model  # noqa: E402


@pytest.fixture(params=sorted(MODEL_SHAPES))
def shape_name(request):
    return request.param


@pytest.fixture(params=["sdpa", "eager"])
def attn_impl(request):
    return request.param


@pytest.fixture
def llama_gqa():
    return tiny_model("llama_gqa", "sdpa")
