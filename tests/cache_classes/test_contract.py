"""The cache contract of DESIGN.md, checked on every registered cache (full budget, padding, beams...).

The methods come from the registry (``available_caches``), each as its own test module declares it
(:class:`tests.helpers.cache_cases.CacheCase`); :func:`test_every_registered_cache_is_covered` fails for a
registered method with neither a case nor an ``Exempt``."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from hf_longmem import make_cache
from tests.helpers.cache_cases import CacheCase, cache_cases, declared_cases, resolve, uncovered_caches
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model

# Every registered method, as its own test module declares it (tests/helpers/cache_cases.py): options from the
# registry's options_for_budget, plus what the method needs to be tested.
CASES = {case.id: case for case in cache_cases()}


#: The tests that run every case, and those of them that need an evicting configuration (``CacheCase.small``).
CONTRACT_TESTS = {
    "test_full_budget_equals_dynamic_cache",
    "test_chunked_prefill_and_continuation_at_full_budget",
    "test_left_padded_batch_equals_rows_alone",
    "test_pads_are_never_kept_when_evicting",
    "test_beam_search_at_full_budget_equals_dynamic",
    "test_beam_search_reorders_all_per_row_state",
    "test_seen_vs_stored_and_memory_bytes",
    "test_reset_then_reuse_equals_a_fresh_cache",
    "test_a_deep_copy_is_a_cache_of_its_own",
}
SMALL_BUDGET_TESTS = {
    "test_pads_are_never_kept_when_evicting",
    "test_beam_search_reorders_all_per_row_state",
    "test_seen_vs_stored_and_memory_bytes",
}


def cases_for(test: str) -> list:
    """Every case, as parameters of ``test``; a case that declares the test does not apply to it is skipped with
    its reason."""
    params = []
    for case in CASES.values():
        marks = [pytest.mark.skip(reason=case.skip[test])] if test in case.skip else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def build(case: CacheCase, model, options: dict):
    return make_cache(case.name, model, **resolve(options, model))


def kept_real_tokens(case: CacheCase, layer_idx: int, prompt: int, decoded: int, cache, row: int = 0) -> int:
    """How many real tokens a row of ``prompt`` tokens keeps after ``decoded`` decoding steps (the case says)."""
    options = case.small_options()
    return case.kept(options=options, layer=layer_idx, prompt=prompt, decoded=decoded, cache=cache, row=row)


def test_every_registered_cache_is_covered():
    """A registered method runs in this suite, or its test module says why it cannot (``Exempt``)."""
    missing = uncovered_caches()
    assert not missing, (
        f"registered cache(s) {missing} are not covered by the shared cache suites: declare "
        "`CASE = CacheCase(name, ...)` (tests/helpers/cache_cases.py) in the method's test module "
        "tests/cache_classes/test_<module>.py, or `Exempt(name, reason=...)` (tests/helpers/coverage.py) if the "
        "contract cannot apply"
    )
    assert all(callable(globals().get(name)) for name in CONTRACT_TESTS)
    cases, _ = declared_cases()
    for case in cases.values():
        unknown = set(case.skip) - CONTRACT_TESTS
        assert not unknown, f"{case.id}: `skip` names no contract test: {sorted(unknown)}"
        if case.small is None:
            missing = sorted(SMALL_BUDGET_TESTS - set(case.skip))
            assert not missing, (
                f"{case.id}: no evicting configuration (small=None), so `skip` must say why for {missing}"
            )


@pytest.mark.parametrize("case", cases_for("test_full_budget_equals_dynamic_cache"))
def test_full_budget_equals_dynamic_cache(case, shape_name, attn_impl):
    model = tiny_model(shape_name, attn_impl)
    ids = random_ids(1, 40)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(config=model.config))
    cache = build(case, model, case.full_options())
    seq, logits = greedy(model, ids, cache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == seq.shape[1] - 1


@pytest.mark.parametrize("case", cases_for("test_chunked_prefill_and_continuation_at_full_budget"))
def test_chunked_prefill_and_continuation_at_full_budget(case):
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    ref_cache = DynamicCache(config=model.config)
    ref_seq, ref_logits = greedy(model, ids, ref_cache, prefill_chunk_size=8)
    cache = build(case, model, case.full_options())
    seq, logits = greedy(model, ids, cache, prefill_chunk_size=8)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # Multi-turn: the full history plus a new turn, generated on the same cache.
    turn = torch.cat((seq, random_ids(1, 5, seed=3)), dim=1)
    ref2, _ = greedy(model, turn, ref_cache, max_new_tokens=6)
    seq2, _ = greedy(model, turn, cache, max_new_tokens=6)
    assert torch.equal(seq2, ref2)


@pytest.mark.parametrize("case", cases_for("test_left_padded_batch_equals_rows_alone"))
@pytest.mark.parametrize("budget_case", ["evicting", "holding"])
def test_left_padded_batch_equals_rows_alone(case, budget_case, attn_impl):
    model = tiny_model("llama_gqa", attn_impl)
    long_row, short_row = random_ids(1, 30, seed=1), random_ids(1, 9, seed=2)
    pad = torch.zeros(1, 21, dtype=torch.long)
    batch = torch.cat((long_row, torch.cat((pad, short_row), dim=1)))
    mask = torch.cat((torch.ones(1, 30), torch.cat((torch.zeros(1, 21), torch.ones(1, 9)), dim=1))).long()
    if case.small is None:  # a method without an evicting configuration: its full-budget one
        options = case.full_options()
    else:
        options = case.small_options() if budget_case == "evicting" else case.holding_options()
    seq, logits = greedy(model, batch, build(case, model, options), attention_mask=mask, pad_token_id=0)
    for row, ids in enumerate((long_row, short_row)):
        row_seq, row_logits = greedy(model, ids, build(case, model, options))
        assert torch.equal(seq[row, 30:], row_seq[0, ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", cases_for("test_pads_are_never_kept_when_evicting"))
def test_pads_are_never_kept_when_evicting(case):
    model = tiny_model("llama_gqa")
    batch = torch.cat(
        (random_ids(1, 30, seed=1), torch.cat((torch.zeros(1, 10, dtype=torch.long), random_ids(1, 20)), 1))
    )
    mask = (batch != 0).long()
    cache = build(case, model, case.small_options())
    greedy(model, batch, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=3)
    for layer_idx, layer in enumerate(cache.layers):
        real_slots = (layer.positions >= 0).sum(-1)  # [batch, kv_heads]
        for row, prompt in enumerate((30, 20)):
            expected = kept_real_tokens(case, layer_idx, prompt, decoded=2, cache=cache, row=row)
            assert (real_slots[row] == expected).all()
        # the shorter row's kept positions are its own tokens: 0..prompt+1, never one of the 10 pads
        assert layer.positions[1].max() <= 21


@pytest.mark.parametrize("case", cases_for("test_beam_search_at_full_budget_equals_dynamic"))
def test_beam_search_at_full_budget_equals_dynamic(case):
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 20)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    ref = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    out = model.generate(ids, cache=build(case, model, case.full_options()), **kwargs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("case", cases_for("test_beam_search_reorders_all_per_row_state"))
def test_beam_search_reorders_all_per_row_state(case):
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 20)
    cache = build(case, model, case.small_options())
    out = model.generate(ids, cache=cache, max_new_tokens=8, num_beams=3, do_sample=False)
    assert out.shape == (1, 28)
    layer = cache.layers[0]
    assert layer.keys.shape[0] == layer.positions.shape[0] == layer.real_seen.shape[0] == 3
    assert layer.keys.shape[-2] == kept_real_tokens(case, 0, 20, decoded=7, cache=cache)


@pytest.mark.parametrize("case", cases_for("test_seen_vs_stored_and_memory_bytes"))
def test_seen_vs_stored_and_memory_bytes(case):
    model = tiny_model("llama_gqa")
    cache = build(case, model, case.small_options())
    seq, _ = greedy(model, random_ids(1, 30), cache, max_new_tokens=5)
    assert cache.get_seq_length() == seq.shape[1] - 1
    stored = kept_real_tokens(case, 0, 30, decoded=4, cache=cache)
    assert cache.get_stored_length() == stored
    assert cache.get_mask_sizes(1, 0) == (stored + 1, cache.get_seq_length() - stored)
    # decoding appends into buffers with spare slots: those bytes are held too
    expected = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (
            getattr(layer, "_append_buffers", {}).get(name, (getattr(layer, name),))[0] for name in layer.batch_state
        )
        if t is not None
    )
    assert cache.memory_bytes() == expected
    full = make_cache("full", model)
    greedy(model, random_ids(1, 30), full, max_new_tokens=5)
    assert cache.memory_bytes() < full.memory_bytes()


def test_cache_cannot_be_cropped_but_can_be_copied():
    model = tiny_model("llama_gqa")
    cache = make_cache("streaming", model, budget=8)
    greedy(model, random_ids(1, 12), cache, max_new_tokens=2)
    assert not cache.is_croppable
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)
    snapshot = copy.deepcopy(cache)
    greedy(model, random_ids(1, 15), cache, max_new_tokens=2)
    assert snapshot.get_seq_length() == 13


def test_right_padding_is_refused():
    model = tiny_model("llama_gqa")
    ids = random_ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, -3:] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = make_cache("streaming", model, budget=8)
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=mask, position_ids=position_ids, cache=cache)


def test_positions_that_skip_ahead_are_refused():
    model = tiny_model("llama_gqa")
    cache = make_cache("streaming", model, budget=8)
    model(random_ids(1, 10), cache=cache)
    with pytest.raises(ValueError, match="left padding"):
        model(random_ids(1, 1), position_ids=torch.tensor([[20]]), cache=cache)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "think"])
@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_left_padded_batch_equals_rows_alone_at_the_pooling_cut_off(name, pooling, seed):
    """The short row's first real tokens are within ``kernel_size // 2`` of its pads and of the budget cut-off.

    Pooling that counts the pads as zero-score slots (or lets them take part in a max) ranks those tokens lower in
    the batch than alone, and the batch keeps other tokens.
    """
    model = tiny_model("llama_gqa")
    long_row, short_row = random_ids(1, 24, seed=seed + 50), random_ids(1, 14, seed=seed + 10)
    batch = torch.cat((long_row, torch.cat((torch.zeros(1, 10, dtype=torch.long), short_row), dim=1)))
    mask = (torch.arange(24)[None] >= torch.tensor([[0], [10]])).long()
    options = {"budget": 8, "window_size": 2}
    if name != "think":
        options.update(kernel_size=7, pooling=pooling)
    elif pooling == "max":
        pytest.skip("ThinK runs SnapKV with its default pooling")

    def kept(cache, row):
        return [layer.positions[row][layer.positions[row] >= 0].tolist() for layer in cache.layers]

    batch_cache = make_cache(name, model, **options)
    seq, logits = greedy(model, batch, batch_cache, attention_mask=mask, pad_token_id=0, max_new_tokens=4)
    for row, ids in enumerate((long_row, short_row)):
        row_cache = make_cache(name, model, **options)
        row_seq, row_logits = greedy(model, ids, row_cache, max_new_tokens=4)
        assert kept(batch_cache, row) == kept(row_cache, 0)
        assert torch.equal(seq[row, 24:], row_seq[0, ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", cases_for("test_reset_then_reuse_equals_a_fresh_cache"))
def test_reset_then_reuse_equals_a_fresh_cache(case):
    """``cache.reset()`` forgets every per-sequence state: the next prompt decodes as with a fresh cache, at an
    evicting budget where the method has one (what it kept, scored or pruned must not leak into the next prompt)."""
    model = tiny_model("llama_gqa")
    options = case.small_options() if case.small is not None else case.full_options()
    cache = build(case, model, options)
    greedy(model, random_ids(1, 30, seed=1), cache, max_new_tokens=4)
    cache.reset()
    assert cache.get_seq_length() == 0
    ids = random_ids(1, 26, seed=2)
    seq, logits = greedy(model, ids, cache, max_new_tokens=5)
    fresh_seq, fresh_logits = greedy(model, ids, build(case, model, options), max_new_tokens=5)
    assert torch.equal(seq, fresh_seq)
    torch.testing.assert_close(logits, fresh_logits, rtol=0, atol=0)


@pytest.mark.parametrize("case", cases_for("test_a_deep_copy_is_a_cache_of_its_own"))
def test_a_deep_copy_is_a_cache_of_its_own(case):
    """Rolling back by copy (the harness's shared-context and choice modes): copies of one prefilled cache answer
    their questions as caches prefilled alone do, at an evicting budget where the method has one, whatever the other
    copies did before. A copy whose layers or model hooks still pointed at the original (SirLLM, EM-LLM, InfLLM
    before cache_classes/hooked.py) fails here."""
    model = tiny_model("llama_gqa")
    options = case.small_options() if case.small is not None else case.full_options()
    context = random_ids(1, 30, seed=1)
    questions = [random_ids(1, 6, seed=3), random_ids(1, 9, seed=4)]

    def prefilled():
        cache = build(case, model, options)
        seq, _ = greedy(model, context, cache, max_new_tokens=1)  # the context is in the cache, not its next token
        return cache, seq

    cache, seq = prefilled()
    copies = [copy.deepcopy(cache) for _ in questions]
    answers = [
        greedy(model, torch.cat((seq, question), dim=-1), work, max_new_tokens=4)
        for question, work in zip(questions, copies)
    ]
    answers.append(greedy(model, torch.cat((seq, questions[0]), dim=-1), cache, max_new_tokens=4))  # the original
    for question, (answer, logits) in zip([*questions, questions[0]], answers):
        alone, alone_seq = prefilled()
        ref, ref_logits = greedy(model, torch.cat((alone_seq, question), dim=-1), alone, max_new_tokens=4)
        assert torch.equal(answer, ref)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
