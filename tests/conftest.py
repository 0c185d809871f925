"""Shared fixtures: tiny random models built from configs (never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

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
