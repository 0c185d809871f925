"""Static layouts (``static=True``): the decode step compiles with ``fullgraph=True`` and equals the dynamic layout.

Compiled runs use ``backend="aot_eager"`` (the whole dynamo + AOT-autograd trace, no C++ codegen), which keeps the
file fast on a busy 2-core machine; one test runs inductor on one layer's decode step (its first compile costs
about 25 s of CPU, 60-100 s of wall time on that machine when busy).

Tolerances: the static layout attends to the same tokens in ring order instead of position order, so only the order
of the float32 softmax sums differs: logits within 1e-4 (values of order 1-10, float32 eps 1.2e-7 per addition).
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.configuration_utils import CompileConfig

from hf_longmem import StreamingCache, make_cache
from hf_longmem.attention import LAYER_KWARG
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model

PROMPT, PADS, NEW = 24, 5, 8

#: (method, options of both layouts, options of the static one)
CASES = {
    "streaming": ("streaming", dict(budget=10, sink_size=2), dict(static=True)),
    "streaming_shift": ("streaming", dict(budget=10, sink_size=2, position_mode="shift"), dict(static=True)),
    "h2o": ("h2o", dict(budget=10), dict(static=True)),
    "snapkv": ("snapkv", dict(budget=12, window_size=4), dict(static=True, max_new_tokens=NEW)),
    "pyramidkv": ("pyramidkv", dict(budget=12, window_size=4), dict(static=True, max_new_tokens=NEW)),
    "duo_attention": (
        "duo_attention",
        dict(head_pattern=torch.tensor([[True, False], [False, True]]), sink_size=2, recent_size=6),
        dict(static=True, max_new_tokens=NEW),
    ),
    "think": ("think", dict(budget=12, window_size=4, key_channel_ratio=0.5), dict(static=True, max_new_tokens=NEW)),
    "kvmerger": ("kvmerger", dict(budget=12, window_size=4, sim_threshold=0.2), dict(static=True, max_new_tokens=NEW)),
    "d2o": (
        "d2o",
        dict(budget=10, num_sink=2, uncompressed_layers=[], first_eviction="prefill"),
        dict(static=True, max_new_tokens=NEW),
    ),
    "sirllm": ("sirllm", dict(entropy_size=12, start_size=2, recent_size=3), dict(static=True, max_new_tokens=NEW)),
}


def _padded_batch():
    ids = random_ids(2, PROMPT)
    mask = torch.ones_like(ids)
    ids[1, :PADS], mask[1, :PADS] = 0, 0  # left padding: row 1 has PROMPT - PADS real tokens
    return ids, mask


def _compile_config(backend: str = "aot_eager") -> CompileConfig:
    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # generate compiles on CUDA only unless asked
    return config


@pytest.mark.parametrize(
    "case, attn_impl", [(case, "sdpa") for case in sorted(CASES)] + [("h2o", "eager"), ("duo_attention", "eager")]
)
def test_compiled_generate_equals_the_dynamic_layout(case, attn_impl):
    """A padded batch: same greedy tokens, logits within float tolerance, one graph for every decode step (eager
    attention: the additive slot mask)."""
    name, options, static = CASES[case]
    model = tiny_model("llama_gqa", attn_impl)
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=NEW)
    ref_seq, ref_logits = greedy(model, ids, make_cache(name, model, **options), **kwargs)
    cache = make_cache(name, model, **options, **static)
    assert cache.is_compileable and not make_cache(name, model, **options).is_compileable
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    seq, logits = greedy(model, ids, cache, compile_config=_compile_config(), **kwargs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation from step to step
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["streaming", "h2o"])
def test_static_layout_evicts_what_the_dynamic_layout_evicts(case):
    """Eager, past many evictions: the set of (row, head, position) kept equals the dynamic layout's, plus the
    slot the next step overwrites."""
    name, options, static = CASES[case]
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    ids, mask = _padded_batch()
    kwargs = dict(attention_mask=mask, pad_token_id=0, max_new_tokens=12)
    dynamic, frozen = make_cache(name, model, **options), make_cache(name, model, **options, **static)
    greedy(model, ids, dynamic, **kwargs)
    greedy(model, ids, frozen, **kwargs)
    want, got = dynamic.layers[0].positions, frozen.layers[0].positions
    for row in range(2):
        for head in range(want.shape[1]):
            kept = {p for p in want[row, head].tolist() if p >= 0}
            held = {p for p in got[row, head].tolist() if p >= 0}
            assert kept <= held and len(held) == len(kept) + 1


def test_beam_search_equals_the_dynamic_layout():
    """Beam search reorders the static buffers (eager): the same beams as the dynamic layout."""
    model = tiny_model("llama_gqa")
    ids = random_ids(2, 20)
    for case in ("h2o", "duo_attention"):
        name, options, static = CASES[case]
        kwargs = dict(max_new_tokens=NEW, num_beams=3, do_sample=False)
        want = model.generate(ids, cache=make_cache(name, model, **options), **kwargs)
        got = model.generate(ids, cache=make_cache(name, model, **options, **static), **kwargs)
        assert torch.equal(got, want)


def _decode_steps(model, cache, step_fn, steps: int = 6):
    """Prefills ``cache`` through ``model``, then runs ``steps`` decode steps of layer 0 on seeded random states;
    returns the attention outputs ``[steps, batch, 1, q_heads, head_dim]``."""
    ids = random_ids(1, PROMPT)
    with torch.no_grad():
        model(ids, cache=cache)
    attention = model.model.layers[0].self_attn
    config = model.config
    generator = torch.Generator().manual_seed(1)
    outputs = []
    for step in range(steps):
        query = torch.randn(1, config.num_attention_heads, 1, config.head_dim, generator=generator)
        key, value = (torch.randn(1, config.num_key_value_heads, 1, config.head_dim, generator=generator) for _ in "kv")
        outputs.append(step_fn(cache.layers[0], attention, query, key, value, torch.tensor([[PROMPT + step]])))
    return torch.stack(outputs)


def _step(layer, attention, query, key, value, position_ids):
    """One decode step of one layer: the cache update, then the attention call hf_longmem attention makes."""
    attn_kwargs = {"position_ids": position_ids}
    keys, values = layer.update(key, value, kwargs=attn_kwargs)
    taker = attn_kwargs.pop(LAYER_KWARG)
    return taker.attend(attention, query, keys, values, None, scaling=attention.scaling)[0]


def test_inductor_decode_step_equals_the_dynamic_layout():
    """The inductor backend (C++ codegen on CPU) on H2O's decode step (per-head slot choice, scatter, scores):
    six steps past eviction equal the dynamic layer's. One layer's step, not the whole model: inductor's first
    compile of a whole model takes 60-100 s on a busy 2-core machine (``benchmarks/compiled_decode.py`` compiles
    the model)."""
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    want = _decode_steps(model, make_cache("h2o", model, budget=10), _step)
    torch._dynamo.reset()
    compiled = torch.compile(_step, backend="inductor", fullgraph=True)
    got = _decode_steps(model, make_cache("h2o", model, budget=10, static=True), compiled)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_snapkv_refuses_more_tokens_than_reserved():
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    cache = make_cache("snapkv", model, budget=12, window_size=4, static=True, max_new_tokens=3)
    with pytest.raises(RuntimeError, match="capacity exceeded"):
        greedy(model, random_ids(1, PROMPT), cache, max_new_tokens=5)


def test_bad_static_options_are_refused():
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_cache("snapkv", model, budget=12, window_size=4, static=True)
    with pytest.raises(ValueError, match="static=True"):
        make_cache("snapkv", model, budget=12, window_size=4, max_new_tokens=4)
    with pytest.raises(ValueError, match="static"):
        make_cache("h2o", model, budget=12, static="yes")
    sliding = tiny_model("mistral", num_hidden_layers=1, sliding_window=8)  # every layer sliding: compressed by ours
    with pytest.raises(ValueError, match="full-attention layers only"):
        make_cache("streaming", sliding, budget=4, sink_size=1, static=True)
    base = make_cache("snapkv", model, budget=12, window_size=4, static=True, max_new_tokens=4)
    with pytest.raises(ValueError, match="dynamic layout"):
        make_cache("think", model, base=base, static=True, max_new_tokens=4)


def _two_turns(model, cache, **kwargs):
    """Two generate calls on one cache (a padded batch; the second turn adds 6 tokens to the first's output):
    the final sequences and every step's logits."""
    ids, mask = _padded_batch()
    first = greedy(model, ids, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=6, **kwargs)
    turn = torch.cat((first[0], random_ids(2, 6, seed=3)), dim=1)
    mask = torch.cat((mask, torch.ones(2, turn.shape[1] - mask.shape[1], dtype=mask.dtype)), dim=1)
    second = greedy(model, turn, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=6, **kwargs)
    return second[0], torch.cat((first[1], second[1]))


@pytest.mark.parametrize("case", ["streaming_shift", "h2o", "snapkv", "kvmerger"])
def test_a_new_turn_thaws_and_equals_the_dynamic_layout(case):
    """A multi-token step after decoding goes back to the dynamic layout (with the eviction pending), then freezes
    again: eager, the same tokens and logits as the dynamic layout over both turns."""
    name, options, static = CASES[case]
    model = tiny_model("llama_gqa")
    want_seq, want_logits = _two_turns(model, make_cache(name, model, **options))
    got_seq, got_logits = _two_turns(model, make_cache(name, model, **options, **static))
    assert torch.equal(got_seq, want_seq)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["duo_attention", "think"])
def test_multi_token_step_after_prefill_is_refused(case):
    """DuoAttention and ThinK keep no way back to their dynamic layout: a second multi-token step is refused."""
    name, options, static = CASES[case]
    model = tiny_model("llama_gqa")
    cache = make_cache(name, model, **options, **static)
    with torch.no_grad():
        model(random_ids(1, PROMPT), cache=cache)
        with pytest.raises(ValueError, match="one token per step"):
            model(random_ids(1, 2, seed=1), cache=cache)


def test_static_layer_without_longmem_attention_is_refused():
    """A cache built by hand for a model left on SDPA: its slot mask would not apply, so the next step raises."""
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    cache = StreamingCache(budget=10, sink_size=2, config=model.config, static=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="hf_longmem attention"):
        greedy(model, random_ids(1, PROMPT), cache, max_new_tokens=3)
