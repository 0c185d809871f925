"""StreamingLLM: what is kept, the positions it is kept at, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_longmem import StreamingCache, make_cache
from hf_longmem.memory.rope import RotaryShift
from tests.helpers.reference import greedy, masked_logits, streaming_visibility
from tests.helpers.tiny_models import random_ids, tiny_config, tiny_model


@pytest.mark.parametrize("shape", ["llama_mha", "qwen2"])
def test_true_positions_equal_masking_the_evicted_tokens(shape, attn_impl):
    model = tiny_model(shape, attn_impl)
    prompt, budget, sink = 30, 12, 4
    seq, logits = greedy(model, random_ids(1, prompt), make_cache("streaming", model, budget=budget, sink_size=sink))
    total = seq.shape[1] - 1
    ref = masked_logits(model, seq[:, :total], streaming_visibility(total, prompt, budget, sink))
    torch.testing.assert_close(logits[:, 0], ref[prompt - 1 :], rtol=1e-4, atol=1e-4)


def test_shift_gives_contiguous_positions_inside_the_cache():
    """One layer: the step after eviction must equal a fresh forward over the kept tokens at positions 0..S."""
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    prompt, budget, sink = 24, 10, 3
    ids = random_ids(1, prompt)
    cache = make_cache("streaming", model, budget=budget, sink_size=sink, position_mode="shift")
    with torch.no_grad():
        model(ids, cache=cache)  # prefill, then compress to sinks + last 7
        nxt = random_ids(1, 1, seed=5)
        step = model(nxt, cache=cache, position_ids=torch.tensor([[prompt]])).logits[0, -1]
        kept = torch.cat((ids[:, :sink], ids[:, prompt - (budget - sink) :], nxt), dim=1)
        fresh = model(kept).logits[0, -1]
    torch.testing.assert_close(step, fresh, rtol=1e-4, atol=1e-4)


def test_shift_lets_generation_run_past_the_position_range_with_bounded_distances():
    model = tiny_model("llama_gqa")
    cache = make_cache("streaming", model, budget=8, sink_size=2, position_mode="shift")
    seq, logits = greedy(model, random_ids(1, 20), cache, max_new_tokens=10)
    assert torch.isfinite(logits).all()
    layer = cache.layers[0]
    # stored positions keep the TRUE positions (the shift is applied to the view attended to)
    assert layer.positions[0, 0].tolist() == [0, 1] + list(range(seq.shape[1] - 1 - 6, seq.shape[1] - 1))


def test_rotary_shift_matches_rope_at_the_new_position():
    config = tiny_config("llama_gqa")
    rotary = RotaryShift.from_config(config)
    model = tiny_model("llama_gqa")
    rotary_from_model = RotaryShift.from_model(model)
    torch.testing.assert_close(rotary.inv_freq, rotary_from_model.inv_freq)
    head_dim = config.hidden_size // config.num_attention_heads
    raw = torch.randn(2, 3, 5, head_dim)
    pos = torch.tensor([[0, 3, 7, 9, 11], [2, 4, 6, 8, 10]])
    delta = torch.tensor([[5, 0, 2, 1, 40], [0, 0, 1, 3, 7]])

    def rope(x, p):
        cos, sin = model.model.rotary_emb(x, p)
        return apply_rotary_pos_emb(x, x, cos, sin)[0]

    torch.testing.assert_close(rotary.rotate(rope(raw, pos), delta), rope(raw, pos + delta), rtol=1e-5, atol=1e-5)


def test_rotary_shift_partial_rotary_leaves_the_other_channels():
    rotary = RotaryShift(torch.tensor([1.0, 0.5]))  # rotary_dim 4 of head_dim 6
    keys = torch.randn(1, 1, 3, 6)
    out = rotary.rotate(keys, torch.tensor([[1, 2, 3]]))
    assert torch.equal(out[..., 4:], keys[..., 4:])
    assert not torch.allclose(out[..., :4], keys[..., :4])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget=4, sink_size=4), "budget"),
        (dict(budget=0), "budget"),
        (dict(budget=16.5), "budget"),
        (dict(budget=16, sink_size=-1), "sink_size"),
        (dict(budget=16, position_mode="rerotate"), "position_mode"),
        (dict(budget=16, position_mode="shift"), "position_mode='shift' needs"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamingCache(**kwargs)


def test_shift_refuses_a_rope_that_is_not_linear_in_position():
    config = tiny_config("llama_gqa", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type"):
        StreamingCache(budget=16, position_mode="shift", config=config)
