"""Fidelity invariants: dense vs dense is exact, a tiny streaming budget diverges, and the math is KL(p || q)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_longmem import make_cache
from hf_longmem.evals.fidelity import (
    compare_to_reference,
    kl_divergence,
    prompt_fidelity,
    reference_continuation,
)
from tests.helpers.tiny_models import random_ids, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread (idle OpenMP threads spin and slow a shared machine down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama_gqa", "sdpa")


def test_kl_divergence_hand_case():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5]])
    kl = kl_divergence(p.log(), q.log())
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(math.log(2.0), rel=1e-5)  # zero-probability tokens of p contribute 0
    assert kl_divergence(q.log(), q.log()).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(p.log(), q.log()[:, :2])


def test_dense_vs_dense_is_exact(model):
    ids = random_ids(1, 48, seed=1)
    result = prompt_fidelity(model, ids, "full", max_new_tokens=8, eos_token_id=[])
    assert result.num_positions == 8
    assert result.top1_agreement == 1.0
    assert result.kl == pytest.approx(0.0, abs=1e-5)
    assert len(result.kl_per_position) == 8


def test_streaming_budget_covering_prompt_is_exact(model):
    ids = random_ids(1, 40, seed=2)
    result = prompt_fidelity(model, ids, "streaming", cache_options={"budget": 64}, max_new_tokens=6, eos_token_id=[])
    assert result.top1_agreement == 1.0
    assert result.kl == pytest.approx(0.0, abs=1e-5)


def test_tiny_streaming_budget_diverges(model):
    ids = random_ids(1, 96, seed=3)
    reference = reference_continuation(model, ids, max_new_tokens=8, eos_token_id=[])
    small = compare_to_reference(model, reference, make_cache("streaming", model, budget=8, sink_size=2))
    assert small.kl > 1e-3
    assert 0.0 <= small.top1_agreement <= 1.0
    # The reference is reusable across caches; a bigger budget is closer to the full cache.
    large = compare_to_reference(model, reference, make_cache("streaming", model, budget=80, sink_size=2))
    assert large.kl < small.kl


def test_reference_is_the_greedy_continuation(model):
    ids = random_ids(1, 30, seed=4)
    reference = reference_continuation(model, ids, max_new_tokens=5, eos_token_id=[])
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert reference.tokens.tolist() == generated[0, 30:].tolist()
    assert reference.logprobs.shape == (5, model.config.vocab_size)
    assert torch.equal(reference.logprobs.argmax(-1), reference.tokens)


def test_bad_arguments(model):
    ids = random_ids(2, 10)
    with pytest.raises(ValueError, match="input_ids"):
        prompt_fidelity(model, ids, "full")
    reference = reference_continuation(model, random_ids(1, 10), max_new_tokens=2, eos_token_id=[])
    with pytest.raises(ValueError, match="reference"):
        prompt_fidelity(model, random_ids(1, 12), "full", reference=reference)
    with pytest.raises(ValueError, match="cache_options"):
        prompt_fidelity(model, random_ids(1, 10), make_cache("full", model), cache_options={"budget": 4})


def test_context_split_prefill(model):
    ids = random_ids(1, 60, seed=5)
    reference = reference_continuation(model, ids, max_new_tokens=6, eos_token_id=[])
    dense = compare_to_reference(model, reference, make_cache("full", model), context_length=50)
    assert dense.top1_agreement == 1.0 and dense.kl == pytest.approx(0.0, abs=1e-5)
    small = compare_to_reference(model, reference, make_cache("streaming", model, budget=8), context_length=50)
    assert small.kl > 1e-3
    with pytest.raises(ValueError, match="context_length"):
        compare_to_reference(model, reference, make_cache("full", model), context_length=60)
