"""Pins the aten ops each registered cache adds to a decode step (issue 20): a regression fails here.

On a GPU at batch 1 a decode step is bound by kernel launches and Python, and the ops a cache dispatches per step
(counted with a ``TorchDispatchMode``, ``benchmarks/decode_overhead.py``) are a deterministic proxy for both. Pinned is
the excess over transformers' DynamicCache on the same model and steps (the model's own ops cancel out), the largest
over a few steady decode steps. A lower count than pinned passes: lower the pin with it.
"""

from __future__ import annotations

import functools

import pytest
import torch

import hf_longmem
from benchmarks.decode_overhead import step_ops, tiny_llama

LAYERS, PROMPT, BUDGET, WARMUP, STEPS = 2, 160, 64, 3, 6

#: Ops per decode step above DynamicCache's (2 layers, 160-token prompt, budget 64, largest of 6 steps after 3).
PINNED_EXCESS = {
    "full": 0,
    "d2o": 137,
    "duo_attention": 15,
    "emllm": 205,
    "h2o": 53,
    "infllm": 145,
    "kvmerger": 6,
    "sirllm": 17,
    "snapkv": 6,
    "pyramidkv": 6,
    "streaming": 10,
    "think": 28,
}


def builtin_caches() -> list[str]:
    return [
        name
        for name in hf_longmem.available_caches()
        if hf_longmem.get_cache_spec(name).cls.__module__.startswith("hf_longmem.cache_classes.")
    ]


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(LAYERS)
    prompt = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    baseline = step_ops("dynamic", model, prompt, BUDGET, WARMUP, STEPS)
    assert len(set(baseline)) == 1, baseline  # the model's own step is the same every step
    return model, prompt, baseline[0]


def test_every_registered_cache_has_a_pinned_count():
    missing = sorted(set(builtin_caches()) - set(PINNED_EXCESS))
    assert not missing, f"pin the decode ops of {missing} in PINNED_EXCESS (benchmarks/decode_overhead.py measures)"


@pytest.mark.filterwarnings("ignore:EMLLMCache got a forward longer")  # the prompt in one forward, on purpose
@pytest.mark.parametrize("name", builtin_caches())
def test_decode_step_ops_do_not_grow(setup, name):
    model, prompt, baseline = setup
    counts = step_ops(name, model, prompt, BUDGET, WARMUP, STEPS)
    excess = max(counts) - baseline
    assert excess <= PINNED_EXCESS[name], (
        f"{name} dispatches {excess} more aten ops per decode step than DynamicCache, pinned at "
        f"{PINNED_EXCESS[name]} (steps: {counts}, DynamicCache: {baseline})"
    )


def test_h2o_single_eviction_keeps_what_keep_plan_keeps_ties_included():
    """The decoding fast path of H2O (one slot out per row and head) against the general ranking, on scores quantised
    so that ties are common: the latest of equally scored slots goes, as the stable ranking of keep_plan drops it."""
    from hf_longmem.cache_classes.base import keep_plan
    from hf_longmem.cache_classes.h2o import H2OLayer

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        batch, heads, budget, recent = 3, 2, 9 + trial % 4, 1 + trial % 3
        n = budget + 1
        layer = H2OLayer(budget, recent)
        layer.scores = torch.randint(0, 3, (batch, heads, n), generator=generator).float()
        positions = torch.arange(n, dtype=torch.int32).expand(batch, heads, n)
        keys = torch.zeros(batch, heads, n, 1)
        index, filler = keep_plan(positions, budget, functools.partial(layer.priority, keys, keys, positions))
        assert filler is None
        assert torch.equal(layer._evict_one(n), index)
