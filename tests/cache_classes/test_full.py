"""FullCache, the uncompressed baseline: a ``DynamicCache`` that accounts its bytes like every hf_longmem cache."""

from __future__ import annotations

from transformers import DynamicCache

from hf_longmem import make_cache
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model

_NO_BUDGET = "the uncompressed baseline has no budget: it never evicts"

# The shared cache suites (tests/helpers/cache_cases.py): exact at any size; nothing to evict.
CASE = CacheCase(
    "full",
    small=None,
    skip={
        "test_pads_are_never_kept_when_evicting": _NO_BUDGET,
        "test_beam_search_reorders_all_per_row_state": _NO_BUDGET,
        "test_seen_vs_stored_and_memory_bytes": _NO_BUDGET,
    },
)


def test_memory_bytes_are_the_keys_and_values_held():
    model = tiny_model("llama_gqa")
    cache = make_cache("full", model)
    assert isinstance(cache, DynamicCache)
    greedy(model, random_ids(2, 9), cache, max_new_tokens=3)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held > 0 and cache.memory_bytes() == held
    assert cache.get_seq_length() == 11
