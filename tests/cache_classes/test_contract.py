"""The cache contract of DESIGN.md, checked on every shipped compressing cache (full budget, padding, beams...)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from hf_longmem import available_caches, make_cache
from hf_longmem.cache_classes.snapkv import pyramid_budgets
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model

# name -> options at a budget that holds every token of these tests (prompt <= 40, + 12 new)
FULL_BUDGET = {
    "full": {},
    "streaming": {"budget": 64, "sink_size": 4},
    "streaming_shift": {"budget": 64, "sink_size": 4, "position_mode": "shift"},
    "h2o": {"budget": 64},
    "snapkv": {"budget": 64, "window_size": 4},
    "pyramidkv": {"budget": 64, "window_size": 4},
    "duo_attention": {"head_pattern": False, "sink_size": 4, "recent_size": 60},  # every head streams, S + R >= 52
    # D2O's budget is a layer average: on 2 layers each gets >= 0.54 x budget / length of the prompt, clamped to 1
    "d2o": {"budget": 128, "uncompressed_layers": []},
    "kvmerger": {"budget": 64, "window_size": 4, "sim_threshold": 0.5},  # merges only to meet the budget
}
SMALL_BUDGET = {
    "h2o": {"budget": 12},
    "snapkv": {"budget": 12, "window_size": 4},
    "pyramidkv": {"budget": 12, "window_size": 4},
    "streaming": {"budget": 12, "sink_size": 4},
    "streaming_shift": {"budget": 12, "sink_size": 4, "position_mode": "shift"},
    # half the KV heads stream (one per layer of llama_gqa); `keys`/`positions` are the retrieval heads
    "duo_attention": {"head_pattern": [[True, False], [False, True]], "sink_size": 4, "recent_size": 8},
    "d2o": {"budget": 12, "uncompressed_layers": []},  # by default layers 0, 1 and L-1 (all of these models) keep all
    "kvmerger": {"budget": 12, "window_size": 4, "sim_threshold": 0.5},
}


def build(label: str, model, options: dict):
    name = label if label in available_caches() else label.rsplit("_", 1)[0]  # "streaming_shift" -> "streaming"
    return make_cache(name, model, **options)


@pytest.mark.parametrize("label", sorted(FULL_BUDGET))
def test_full_budget_equals_dynamic_cache(label, shape_name, attn_impl):
    model = tiny_model(shape_name, attn_impl)
    ids = random_ids(1, 40)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(config=model.config))
    cache = build(label, model, FULL_BUDGET[label])
    seq, logits = greedy(model, ids, cache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == seq.shape[1] - 1


@pytest.mark.parametrize("label", sorted(FULL_BUDGET))
def test_chunked_prefill_and_continuation_at_full_budget(label):
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    ref_cache = DynamicCache(config=model.config)
    ref_seq, ref_logits = greedy(model, ids, ref_cache, prefill_chunk_size=8)
    cache = build(label, model, FULL_BUDGET[label])
    seq, logits = greedy(model, ids, cache, prefill_chunk_size=8)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # Multi-turn: the full history plus a new turn, generated on the same cache.
    turn = torch.cat((seq, random_ids(1, 5, seed=3)), dim=1)
    ref2, _ = greedy(model, turn, ref_cache, max_new_tokens=6)
    seq2, _ = greedy(model, turn, cache, max_new_tokens=6)
    assert torch.equal(seq2, ref2)


@pytest.mark.parametrize("label", sorted(SMALL_BUDGET) + ["full"])
@pytest.mark.parametrize("budget_case", ["evicting", "holding"])
def test_left_padded_batch_equals_rows_alone(label, budget_case, attn_impl):
    model = tiny_model("llama_gqa", attn_impl)
    long_row, short_row = random_ids(1, 30, seed=1), random_ids(1, 9, seed=2)
    pad = torch.zeros(1, 21, dtype=torch.long)
    batch = torch.cat((long_row, torch.cat((pad, short_row), dim=1)))
    mask = torch.cat((torch.ones(1, 30), torch.cat((torch.zeros(1, 21), torch.ones(1, 9)), dim=1))).long()
    options = dict(SMALL_BUDGET.get(label, {}))
    if budget_case == "holding" and options:
        options.update({"recent_size": 64} if "recent_size" in options else {"budget": 64})
    seq, logits = greedy(model, batch, build(label, model, options), attention_mask=mask, pad_token_id=0)
    for row, ids in enumerate((long_row, short_row)):
        row_seq, row_logits = greedy(model, ids, build(label, model, options))
        assert torch.equal(seq[row, 30:], row_seq[0, ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)


def kept_real_tokens(
    label: str, layer_idx: int, num_layers: int, prompt: int, decoded: int, cache=None, row: int = 0
) -> int:
    """How many real tokens a row of ``prompt`` tokens keeps after ``decoded`` decoding steps."""
    options = SMALL_BUDGET[label]
    if label == "kvmerger":
        return options["budget"] + decoded  # prompt merged once, generated tokens appended
    if label == "d2o":  # per layer and row, fixed at the first decoding step from every layer's prefill density
        return min(prompt + decoded, int(cache.layers[layer_idx].layer_budget[row]))
    if label == "snapkv":
        return options["budget"] + decoded  # prompt compressed once, generated tokens appended
    if label == "pyramidkv":
        budgets = pyramid_budgets(options["budget"], options["window_size"], num_layers, prompt, beta=20)
        return budgets[layer_idx] + decoded
    if label == "duo_attention":
        return prompt + decoded  # retrieval heads keep every token (streaming heads are checked in test_duo_attention)
    return options["budget"]


@pytest.mark.parametrize("label", sorted(SMALL_BUDGET))
def test_pads_are_never_kept_when_evicting(label):
    model = tiny_model("llama_gqa")
    batch = torch.cat(
        (random_ids(1, 30, seed=1), torch.cat((torch.zeros(1, 10, dtype=torch.long), random_ids(1, 20)), 1))
    )
    mask = (batch != 0).long()
    cache = build(label, model, SMALL_BUDGET[label])
    greedy(model, batch, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=3)
    for layer_idx, layer in enumerate(cache.layers):
        real_slots = (layer.positions >= 0).sum(-1)  # [batch, kv_heads]
        for row, prompt in enumerate((30, 20)):
            expected = kept_real_tokens(label, layer_idx, len(cache.layers), prompt, decoded=2, cache=cache, row=row)
            assert (real_slots[row] == expected).all()
        # the shorter row's kept positions are its own tokens: 0..prompt+1, never one of the 10 pads
        assert layer.positions[1].max() <= 21


@pytest.mark.parametrize("label", sorted(FULL_BUDGET))
def test_beam_search_at_full_budget_equals_dynamic(label):
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 20)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    ref = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    out = model.generate(ids, cache=build(label, model, FULL_BUDGET[label]), **kwargs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("label", sorted(SMALL_BUDGET))
def test_beam_search_reorders_all_per_row_state(label):
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 20)
    cache = build(label, model, SMALL_BUDGET[label])
    out = model.generate(ids, cache=cache, max_new_tokens=8, num_beams=3, do_sample=False)
    assert out.shape == (1, 28)
    layer = cache.layers[0]
    assert layer.keys.shape[0] == layer.positions.shape[0] == layer.real_seen.shape[0] == 3
    assert layer.keys.shape[-2] == kept_real_tokens(label, 0, len(cache.layers), 20, decoded=7, cache=cache)


@pytest.mark.parametrize("label", sorted(SMALL_BUDGET))
def test_seen_vs_stored_and_memory_bytes(label):
    model = tiny_model("llama_gqa")
    cache = build(label, model, SMALL_BUDGET[label])
    seq, _ = greedy(model, random_ids(1, 30), cache, max_new_tokens=5)
    assert cache.get_seq_length() == seq.shape[1] - 1
    stored = kept_real_tokens(label, 0, len(cache.layers), 30, decoded=4, cache=cache)
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
