"""The one memory-accounting protocol: ``memory_parts`` -> ``memory_breakdown`` -> ``memory_bytes``."""

from __future__ import annotations

import pytest
import torch

from hf_longmem import available_caches, make_cache
from hf_longmem.memory.accounting import LOCATIONS, bytes_by_location, layer_memory_parts, merge_parts, tensor_bytes
from hf_longmem.registry import get_cache_spec
from tests.helpers.cache_cases import matrix_case, resolve
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model


def test_bytes_by_location_and_merge():
    parts = merge_parts({"kv": ("resident", 10)}, {"kv": ("resident", 5), "blocks": ("offloaded", 7)})
    assert parts == {"kv": ("resident", 15), "blocks": ("offloaded", 7)}
    assert bytes_by_location(parts) == {"resident": 15, "offloaded": 7}
    with pytest.raises(ValueError, match="location"):
        bytes_by_location({"kv": ("gpu", 1)})
    assert tensor_bytes(torch.zeros(3, dtype=torch.float16), None, "not a tensor") == 6


@pytest.mark.parametrize("name", available_caches())
def test_every_cache_reports_by_the_protocol(name):
    """Every registered cache: parts at known locations, breakdown = parts by location, bytes = their sum, and the
    keys/values of every layer counted (a cache holding the whole short prompt holds at least the full cache's)."""
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 96)
    # the registry's options plus what the method's CacheCase adds to compress on tiny models (e.g. a head pattern)
    options = resolve({**get_cache_spec(name).options_for_budget(48), **matrix_case(name).matrix_small}, model)
    cache = make_cache(name, model, **options)
    greedy(model, ids, cache, max_new_tokens=3)
    parts = cache.memory_parts()
    assert parts and all(where in LOCATIONS and size >= 0 for where, size in parts.values())
    assert cache.memory_breakdown() == bytes_by_location(parts)
    assert cache.memory_bytes() == sum(size for _, size in parts.values()) > 0
    assert isinstance(cache.generate_kwargs, dict)  # model.generate(..., **cache.generate_kwargs) works for every cache


def test_full_cache_counts_keys_and_values_exactly():
    model = tiny_model("llama_gqa")
    cache = make_cache("full", model)
    greedy(model, random_ids(2, 20), cache, max_new_tokens=2)
    expected = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in cache.layers)
    assert cache.memory_parts() == {"kv": ("resident", expected)}
    assert sum(size for _, size in layer_memory_parts(cache.layers[0]).values()) == expected // len(cache.layers)
