"""score_choices: full cache == one-forward log-likelihoods; a compressed cache moves the choice distribution."""

from __future__ import annotations

import random

import pytest
import torch

import hf_longmem
from hf_longmem import make_cache
from hf_longmem.evals import tasks
from hf_longmem.evals.choices import ChoiceScores, choice_kl, score_choices
from tests.helpers.tiny_models import tiny_model
from tests.helpers.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama_gqa", "sdpa"), tiny_tokenizer()


@pytest.fixture(scope="module")
def embedded():
    return hf_longmem.load_default_model()


def _one_forward(model, tokenizer, context, query, choice):
    """Summed log-probability of ``choice`` after ``context + query`` from one forward without a cache."""
    ctx = tokenizer(context)["input_ids"] + tokenizer(query, add_special_tokens=False)["input_ids"]
    ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + ids]), use_cache=False).logits[0].double()
    logprobs = torch.log_softmax(logits[len(ctx) - 1 : -1], dim=-1)
    return float(logprobs.gather(1, torch.tensor(ids)[:, None]).sum())


def _random_case(seed, length=300):
    rng = random.Random(seed)
    context = "".join(rng.choice("abcdefgh .") for _ in range(length))
    choices = [" " + "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 5))) for _ in range(4)]
    return context, choices


@pytest.mark.parametrize("query", ["", "\nkey?"])
def test_full_cache_equals_one_forward(tiny, query):
    model, tok = tiny
    context, choices = _random_case(0)
    result = score_choices(model, tok, context, choices, query=query)
    expected = [_one_forward(model, tok, context, query, c) for c in choices]
    # float32 logits over ~300 positions: log-softmax differences stay well below 1e-5 per token.
    assert result.logprobs == pytest.approx(expected, abs=1e-5)
    assert result.num_tokens == [len(c) for c in choices]  # one character = one token
    assert result.context_tokens == len(context) + 1
    assert result.best == max(range(4), key=lambda i: expected[i])


def test_cache_instance_is_left_holding_the_context(tiny):
    model, tok = tiny
    context, choices = _random_case(1)
    cache = make_cache("streaming", model, budget=64)
    by_instance = score_choices(model, tok, context, choices, cache)
    assert cache.get_seq_length() == len(context) + 1
    by_name = score_choices(model, tok, context, choices, "streaming", cache_options={"budget": 64})
    assert by_instance.logprobs == by_name.logprobs
    # Choices do not see each other: scoring one alone gives its score in the group.
    alone = score_choices(model, tok, context, choices[2:3], "streaming", cache_options={"budget": 64})
    assert alone.logprobs[0] == by_name.logprobs[2]


def test_budget_covering_everything_is_exact_and_kl_grows_as_budget_shrinks(tiny):
    model, tok = tiny
    budgets = [512, 256, 128, 64]
    kls = {b: [] for b in budgets}
    for seed in range(4):
        context, choices = _random_case(seed)
        full = score_choices(model, tok, context, choices, query="\nkey?")
        for budget in budgets:
            small = score_choices(
                model, tok, context, choices, "streaming", cache_options={"budget": budget}, query="\nkey?"
            )
            kls[budget].append(choice_kl(full, small))
    assert kls[512] == pytest.approx([0.0] * 4, abs=1e-9)
    means = [sum(kls[b]) / 4 for b in budgets]
    assert means[1] > 0 and means[1] < means[2] < means[3], means


def test_embedded_model_passkey_choices(embedded):
    """The full cache picks the pass key; streaming(64) evicts it (the context is compressed before the question)."""
    model, tok = embedded
    for sample in tasks.passkey(tok, 512, 2, seed=3, depth=0.3):
        key = sample.turns[0].answers[0]
        rng = random.Random(sample.id)
        choices = [" " + key] + [" " + str(rng.randrange(10000, 100000)) for _ in range(3)]
        query = sample.turns[0].query
        full = score_choices(model, tok, sample.context, choices, query=query)
        assert full.best == 0 and full.greedy[0]
        covering = score_choices(
            model, tok, sample.context, choices, "streaming", cache_options={"budget": 512}, query=query
        )
        assert choice_kl(full, covering) < 1e-9
        small = score_choices(
            model, tok, sample.context, choices, "streaming", cache_options={"budget": 64}, query=query
        )
        assert choice_kl(full, small) > 1.0


def test_choice_kl_and_distribution():
    a = ChoiceScores(logprobs=[-1.0, -2.0], num_tokens=[1, 2], greedy=[True, False], context_tokens=3)
    assert float(a.distribution().exp().sum()) == pytest.approx(1.0)
    assert a.distribution(normalize=True).tolist() == pytest.approx(
        torch.log_softmax(torch.tensor([-1.0, -1.0]), 0).tolist()
    )
    assert choice_kl(a, a) == 0.0
    b = ChoiceScores(logprobs=[-2.0, -1.0], num_tokens=[1, 2], greedy=[False, True], context_tokens=3)
    p = torch.softmax(torch.tensor([-1.0, -2.0], dtype=torch.float64), 0)
    assert choice_kl(a, b) == pytest.approx(float((p * (p.log() - p.flip(0).log())).sum()))
    with pytest.raises(ValueError, match="different choices"):
        choice_kl(a, ChoiceScores([-1.0], [1], [True], 3))


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="non-empty list"):
        score_choices(model, tok, "abc", [])
    with pytest.raises(ValueError, match="non-empty list"):
        score_choices(model, tok, "abc", " a")
    with pytest.raises(ValueError, match="encode to no tokens"):
        score_choices(model, tok, "abc", [" a", ""])
    with pytest.raises(ValueError, match="only when `cache` is a registry name"):
        score_choices(model, tok, "abc", [" a"], make_cache("full", model), cache_options={"budget": 4})
    used = make_cache("full", model)
    score_choices(model, tok, "abc", [" a"], used)
    with pytest.raises(ValueError, match="must be empty"):
        score_choices(model, tok, "abc", [" a"], used)
    with pytest.raises(ValueError, match="registry name or a transformers Cache"):
        score_choices(model, tok, "abc", [" a"], 3)


def test_prefill_in_the_cache_chunks(tiny):
    """A cache that asks for chunked prefill (``generate_kwargs``, e.g. EM-LLM) gets it; with the full cache the
    scores do not change."""
    model, tok = tiny
    context, choices = _random_case(2, length=50)
    cache = make_cache("full", model)
    cache.generate_kwargs = {"prefill_chunk_size": 16}
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    try:
        chunked = score_choices(model, tok, context, choices[:1], cache)
    finally:
        handle.remove()
    assert calls[:4] == [16, 16, 16, 3]  # 51 context tokens (BOS included), then the choice
    assert chunked.logprobs == pytest.approx(score_choices(model, tok, context, choices[:1]).logprobs, abs=1e-5)
