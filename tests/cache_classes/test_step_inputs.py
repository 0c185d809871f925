"""Models whose attention never hands the cache its position ids (GPT-NeoX, Falcon: ``update(k, v, layer_idx)``;
StableLM, Persimmon: ``position_ids`` a named parameter, so not in the kwargs): the cache learns them from a forward pre-hook
that ``make_cache(name, model)`` installs, or refuses a batch it cannot check."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, FalconConfig, GPTNeoXConfig, PersimmonConfig, StableLmConfig

from hf_longmem import make_cache
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import VOCAB, random_ids

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=256,
)
CONFIGS = {
    "gpt_neox": lambda: GPTNeoXConfig(**COMMON, intermediate_size=128),
    "falcon": lambda: FalconConfig(
        **{k: v for k, v in COMMON.items() if k != "max_position_embeddings"},
        new_decoder_architecture=True,
        num_kv_heads=2,
        alibi=False,
    ),
    "stablelm": lambda: StableLmConfig(**COMMON, intermediate_size=128, num_key_value_heads=2),
    "persimmon": lambda: PersimmonConfig(**COMMON, intermediate_size=128),  # position_ids named, as StableLM
}
# tokens of these tests: 20-token prompts + 6 new
OPTIONS = {
    "streaming": {"budget": 10, "sink_size": 2},
    "snapkv": {"budget": 8, "window_size": 2, "kernel_size": 3},
    "h2o": {"budget": 10},
    "duo_attention": {"head_pattern": False, "sink_size": 2, "recent_size": 8},  # every head streams
}


def tiny(arch: str, attn_impl: str = "sdpa"):
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_impl, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None
    return model.eval()


def padded_pair():
    long_row, short_row = random_ids(1, 20, seed=1), random_ids(1, 13, seed=2)
    batch = torch.cat((long_row, torch.cat((torch.zeros(1, 7, dtype=torch.long), short_row), dim=1)))
    mask = (torch.arange(20)[None] >= torch.tensor([[0], [7]])).long()
    return long_row, short_row, batch, mask


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_left_padded_batch_equals_rows_alone(arch, name, attn_impl):
    model = tiny(arch, attn_impl)
    long_row, short_row, batch, mask = padded_pair()
    batch_cache = make_cache(name, model, **OPTIONS[name])
    seq, logits = greedy(model, batch, batch_cache, attention_mask=mask, pad_token_id=0, max_new_tokens=6)
    for row, ids in enumerate((long_row, short_row)):
        row_seq, row_logits = greedy(model, ids, make_cache(name, model, **OPTIONS[name]), max_new_tokens=6)
        assert torch.equal(seq[row, 20:], row_seq[0, ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)
    if name == "duo_attention":
        return
    for layer in batch_cache.layers:  # the 7 pads are never kept
        assert (layer.positions[1] != -1).sum(-1).max() <= OPTIONS[name]["budget"] + 6
        assert int(layer.positions[1].max()) <= 13 + 5


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_a_cache_without_the_model_hook_refuses_a_batch_it_cannot_check(arch):
    from hf_longmem.cache_classes.streaming import StreamingCache

    model = tiny(arch)
    _, _, batch, mask = padded_pair()
    cache = StreamingCache(config=model.config, **OPTIONS["streaming"])  # built from the config: no hook
    with pytest.raises(ValueError, match="position_ids"):
        greedy(model, batch, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=2)
    # one row has no padding to tell apart: it runs
    greedy(model, batch[:1], StreamingCache(config=model.config, **OPTIONS["streaming"]), max_new_tokens=2)


def test_the_hook_is_idempotent_and_harmless_with_other_caches():
    from transformers import DynamicCache

    from hf_longmem.memory.step_inputs import TRACKER_ATTRIBUTE, untrack_step_inputs

    model = tiny("gpt_neox")
    _, _, batch, mask = padded_pair()
    reference = greedy(model, batch, DynamicCache(config=model.config), attention_mask=mask, pad_token_id=0)
    make_cache("snapkv", model, **OPTIONS["snapkv"])
    make_cache("streaming", model, **OPTIONS["streaming"])
    decoder = model.get_decoder()
    assert len(decoder._forward_pre_hooks) == 1
    tracker = getattr(decoder, TRACKER_ATTRIBUTE)
    assert tracker.handoff_modules == model.config.num_hidden_layers
    hooked = greedy(model, batch, DynamicCache(config=model.config), attention_mask=mask, pad_token_id=0)
    assert torch.equal(hooked[0], reference[0]) and torch.equal(hooked[1], reference[1])
    untrack_step_inputs(model)
    assert not decoder._forward_pre_hooks and not hasattr(decoder, TRACKER_ATTRIBUTE)


def test_models_that_pass_position_ids_get_no_attention_hooks():
    from hf_longmem.memory.step_inputs import TRACKER_ATTRIBUTE
    from tests.helpers.tiny_models import tiny_model

    model = tiny_model("llama_gqa")
    make_cache("snapkv", model, budget=8, window_size=2)
    assert getattr(model.get_decoder(), TRACKER_ATTRIBUTE).handoff_modules == 0


def test_inputs_of_an_earlier_forward_are_not_used_by_a_forward_without_the_hook():
    from hf_longmem.memory.step_inputs import untrack_step_inputs

    model = tiny("gpt_neox")
    _, _, batch, mask = padded_pair()
    cache = make_cache("streaming", model, **OPTIONS["streaming"])
    with torch.no_grad():
        model(batch[:, :-1], attention_mask=mask[:, :-1], cache=cache)
    untrack_step_inputs(model)
    with pytest.raises(ValueError, match="position_ids"):  # the recorded inputs were for the previous forward
        with torch.no_grad():
            model(batch[:, -1:], attention_mask=mask, cache=cache)


def test_a_scoring_cache_without_the_hook_is_refused_with_a_value_error():
    from hf_longmem import enable_longmem_attention
    from hf_longmem.cache_classes.snapkv import SnapKVCache

    model = tiny("gpt_neox")
    enable_longmem_attention(model)
    ids = random_ids(1, 12)
    with pytest.raises(ValueError, match="cannot see the queries"):
        greedy(model, ids, SnapKVCache(config=model.config, **OPTIONS["snapkv"]), max_new_tokens=2)


def test_pads_are_told_from_the_mask_when_the_model_gets_no_position_ids():
    model = tiny("gpt_neox")
    _, _, batch, mask = padded_pair()
    cache = make_cache("streaming", model, budget=16, sink_size=2)
    with torch.no_grad():
        model(batch, attention_mask=mask, cache=cache)  # no position_ids: derived from the mask, as generate does
    for layer in cache.layers:
        assert (layer.positions[0] >= 0).all() and layer.positions[0, 0].tolist() == [0, 1, *range(6, 20)]
        assert (layer.positions[1] >= 0).sum(-1).tolist() == [13] * 4  # per head: the short row's 13 tokens, no pad
        assert layer.real_seen.tolist() == [20, 13]
