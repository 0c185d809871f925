"""benchmarks/gpu_check.py: every registered cache is checked, with options from the registry."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_check import (
    DYNAMIC,
    cache_options,
    full_budget_options,
    random_llama,
    speed_caches,
)
from hf_longmem import available_caches, make_cache


@pytest.fixture(scope="module")
def model():
    size = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=97)
    return random_llama("cpu", torch.float32, max_positions=256, **size)


def test_speed_section_enumerates_the_registry():
    assert speed_caches() == [DYNAMIC, *(name for name in available_caches() if name != "full")]


@pytest.mark.parametrize("name", available_caches())
def test_every_registered_cache_builds_at_the_checks_budgets(name, model):
    make_cache(name, model, **cache_options(name, 24, model))  # the parity section's smoke budget
    make_cache(name, model, **cache_options(name, 128, model))  # the speed section's smoke budget
    make_cache(name, model, **full_budget_options(name, 51, model))
