"""benchmarks/gpu_check.py: options for every registered cache come from the registry, kernels are chosen per cache."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_check import (
    DYNAMIC,
    cache_options,
    full_budget_options,
    random_llama,
    speed_caches,
    with_kernel_backend,
)
from hf_longmem import available_caches, make_cache
from hf_longmem.cache_classes.infllm import InfLLMLayer
from hf_longmem.cache_classes.scored import ScoredLayer
from hf_longmem.cache_classes.think import ThinKLayer


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


def test_kernel_backend_is_set_per_cache_instance(model):
    defaults = [cls.kernel_backend for cls in (ScoredLayer, ThinKLayer, InfLLMLayer)]
    forced = with_kernel_backend(make_cache("snapkv", model, **cache_options("snapkv", 24, model)), "triton")
    other = make_cache("snapkv", model, **cache_options("snapkv", 24, model))
    assert [layer.kernel_backend for layer in forced.layers] == ["triton", "triton"]
    assert [layer.kernel_backend for layer in other.layers] == [None, None]
    assert [cls.kernel_backend for cls in (ScoredLayer, ThinKLayer, InfLLMLayer)] == defaults
