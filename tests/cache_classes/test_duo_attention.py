"""DuoAttention: exactness at the extremes, a per-head masked reference, thresholding, memory, pattern files."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from hf_longmem import enable_longmem_attention, make_cache
from hf_longmem.cache_classes.duo_attention import (
    DuoAttentionCache,
    DuoAttentionLayer,
    load_head_pattern,
    load_head_pattern_metadata,
    num_streaming_heads,
    save_head_pattern,
    select_retrieval_heads,
)
from hf_longmem.memory.padding import PAD_POSITION
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy, streaming_visibility
from tests.helpers.tiny_models import random_ids, tiny_config, tiny_model


def half_retrieval_heads(model) -> list[list[bool]]:
    """DuoAttention pattern ``[layers][kv_heads]``: every other (layer, KV head) is a retrieval head, the rest stream
    (with one KV head, as in multi-query attention, every other layer streams)."""
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return [[(layer + head) % 2 == 0 for head in range(heads)] for layer in range(config.num_hidden_layers)]


# The shared cache suites (tests/helpers/cache_cases.py). No pattern is shipped for random models: at full budget
# every head streams with S + R >= 52; at a small one half the KV heads stream (one per layer of llama_gqa).
CASE = CacheCase(
    "duo_attention",
    full={"head_pattern": False, "sink_size": 4, "recent_size": 60},
    small={"head_pattern": [[True, False], [False, True]], "sink_size": 4, "recent_size": 8},
    # retrieval heads keep every token (streaming heads are checked in this module)
    kept=lambda prompt, decoded, **_: prompt + decoded,
    matrix_full={"head_pattern": False},
    matrix_small={"head_pattern": half_retrieval_heads},
)

MIXED = torch.tensor([[True, False], [False, True]])  # llama_gqa: 2 layers x 2 KV heads, half streaming


def duo(model, head_pattern, **options):
    enable_longmem_attention(model)
    return DuoAttentionCache(head_pattern=head_pattern, config=model.config, **options)


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("attn_impl, chunk", [("sdpa", None), ("eager", 8)])  # the contract matrix does the rest
def test_all_retrieval_equals_the_full_cache(attn_impl, chunk):
    model = tiny_model("llama_gqa", attn_impl)
    ids = random_ids(1, 30)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(config=model.config), prefill_chunk_size=chunk)
    cache = duo(model, torch.ones(2, 2), sparsity=0.0, sink_size=2, recent_size=4)  # gates at sparsity 0
    seq, logits = greedy(model, ids, cache, prefill_chunk_size=chunk)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].streaming_keys is None and cache.get_stored_length() == seq.shape[1] - 1


@pytest.mark.parametrize("shape", ["llama_gqa", "llama_mha"])
def test_mixed_pattern_with_a_window_longer_than_the_sequence_equals_the_full_cache(shape):
    model = tiny_model(shape)
    kv_heads = model.config.num_key_value_heads
    pattern = torch.arange(2 * kv_heads).view(2, kv_heads) % 2 == 0
    ids = random_ids(1, 30)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(config=model.config))
    seq, logits = greedy(model, ids, duo(model, pattern, sink_size=4, recent_size=60))
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_impl, chunk", [("sdpa", None), ("eager", None), ("sdpa", 8)])
def test_all_streaming_equals_streaming_llm(attn_impl, chunk):
    model = tiny_model("llama_gqa", attn_impl)
    ids = random_ids(1, 30)
    ref = make_cache("streaming", model, budget=4 + 8, sink_size=4)
    ref_seq, ref_logits = greedy(model, ids, ref, prefill_chunk_size=chunk)
    cache = duo(model, False, sink_size=4, recent_size=8)
    seq, logits = greedy(model, ids, cache, prefill_chunk_size=chunk)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for layer, ref_layer in zip(cache.layers, ref.layers):
        assert layer.keys is None
        keys, _, positions = layer.streaming_state()
        assert torch.equal(positions[:, 0], ref_layer.positions[:, 0])
        torch.testing.assert_close(keys, ref_layer.keys)


# ------------------------------------------------------------------------------------- per-head reference
def per_head_reference_logits(model, sequence, prompt, pattern, sink, recent):
    """One full forward of ``sequence`` ``[1, T]`` with eager attention over repeated keys and a per-query-head mask:
    heads of retrieval KV heads are causal, heads of streaming KV heads see (after the prompt) only the sinks and
    the last ``recent`` keys plus themselves. Returns ``[T, vocab]``."""
    total = sequence.shape[1]
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    streaming = streaming_visibility(total, prompt, sink + recent, sink)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    visible = torch.where(pattern.repeat_interleave(group, dim=1)[..., None, None], causal, streaming)  # [L, Hq, T, T]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
        scores = (query @ key.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~visible[module.layer_idx], float("-inf"))
        return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None

    AttentionInterface.register("duo_test_reference", attention)
    AttentionMaskInterface.register("duo_test_reference", lambda *args, **kwargs: None)
    previous = model.config._attn_implementation
    model.set_attn_implementation("duo_test_reference")
    try:
        with torch.no_grad():
            return model(sequence).logits[0]
    finally:
        model.set_attn_implementation(previous)


# llama_mha (4 KV heads): groups scattered over the heads (index_select), or contiguous ranges in either order (split)
MHA_PATTERNS = {
    "scattered": [[True, False, False, True], [False, True, False, False]],
    "contiguous": [[True, True, True, False], [False, False, True, True]],
}


@pytest.mark.parametrize(
    "shape, attn_impl, layout",
    [
        ("llama_gqa", "sdpa", None),
        ("llama_gqa", "eager", None),
        ("llama_mha", "sdpa", "scattered"),
        ("llama_mha", "eager", "contiguous"),
    ],
)
def test_mixed_pattern_equals_a_per_head_masked_reference(shape, attn_impl, layout):
    model = tiny_model(shape, attn_impl)
    pattern = MIXED if layout is None else torch.tensor(MHA_PATTERNS[layout])
    sink, recent, prompt = 3, 6, 24
    seq, logits = greedy(model, random_ids(1, prompt), duo(model, pattern, sink_size=sink, recent_size=recent))
    reference = per_head_reference_logits(model, seq[:, :-1], prompt, pattern, sink, recent)
    torch.testing.assert_close(logits[:, 0], reference[prompt - 1 :], rtol=1e-4, atol=1e-4)
    # the reference really differs from full attention (the window is short enough to matter)
    full = per_head_reference_logits(model, seq[:, :-1], prompt, torch.ones_like(pattern), sink, recent)
    assert not torch.allclose(full[prompt:], reference[prompt:], atol=1e-3)


def test_contiguous_groups():
    from hf_longmem.cache_classes.duo_attention import _contiguous_groups

    assert _contiguous_groups([True, True, False]) == ([2, 1], True)
    assert _contiguous_groups([False, True, True, True]) == ([1, 3], False)
    assert _contiguous_groups([True, False, True]) is None  # scattered: index_select per group
    assert _contiguous_groups([True, True]) is None and _contiguous_groups([False]) is None  # one group only


# ------------------------------------------------------------------------------------- storage and padding
def test_streaming_heads_hold_exactly_sink_plus_recent_and_the_right_tokens():
    model = tiny_model("llama_gqa")
    sink, recent = 3, 5
    cache = duo(model, MIXED, sink_size=sink, recent_size=recent)
    seq, _ = greedy(model, random_ids(1, 20), cache, max_new_tokens=4)
    seen = seq.shape[1] - 1
    for layer in cache.layers:
        keys, _, positions = layer.streaming_state()
        assert keys.shape == (1, 1, sink + recent, 16) and layer.get_streaming_length() == sink + recent
        expected = list(range(sink)) + list(range(seen - recent, seen))
        assert positions[0, 0].tolist() == expected
        # decoding writes into a ring of R + 1 recent slots: one spare slot, marked as a pad, nothing else
        assert layer.streaming_keys.shape == (1, 1, sink + recent + 1, 16)
        assert sorted(layer.streaming_positions[0, 0].tolist()) == [PAD_POSITION, *expected]
        assert layer.keys.shape == (1, 1, seen, 16) and layer.positions[0, 0].tolist() == list(range(seen))
    assert cache.get_seq_length() == seen == cache.get_stored_length()
    assert cache.get_mask_sizes(1, 0) == (seen + 1, 0)
    # a prompt shorter than the window keeps everything
    short = duo(model, MIXED, sink_size=sink, recent_size=recent)
    greedy(model, random_ids(1, 5), short, max_new_tokens=2)
    assert short.layers[0].get_streaming_length() == 6


def test_left_padded_mixed_batch_equals_rows_alone_and_never_keeps_pads():
    model = tiny_model("llama_gqa")
    long_row, short_row = random_ids(1, 30, seed=1), random_ids(1, 9, seed=2)
    batch = torch.cat((long_row, torch.cat((torch.zeros(1, 21, dtype=torch.long), short_row), dim=1)))
    mask = (torch.arange(30) >= torch.tensor([[0], [21]])).long()
    options = dict(sink_size=4, recent_size=8)
    cache = duo(model, MIXED, **options)
    seq, logits = greedy(model, batch, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=6)
    for row, ids in enumerate((long_row, short_row)):
        row_seq, row_logits = greedy(model, ids, duo(model, MIXED, **options), max_new_tokens=6)
        assert torch.equal(seq[row, 30:], row_seq[0, ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)
    for layer in cache.layers:
        positions = layer.streaming_state()[2]
        real = (positions >= 0).sum(-1)[:, 0]
        assert real.tolist() == [12, 12]  # both rows saw more than sink + recent real tokens (35 and 14)
        short_kept = positions[1, 0]
        assert short_kept[short_kept >= 0].tolist() == [0, 1, 2, 3] + list(range(6, 14))


def test_beam_search_reorders_both_groups():
    model = tiny_model("llama_gqa")
    cache = duo(model, MIXED, sink_size=2, recent_size=4)
    out = model.generate(random_ids(1, 16), cache=cache, max_new_tokens=6, num_beams=3, do_sample=False)
    assert out.shape == (1, 22)
    layer = cache.layers[0]
    for name in layer.batch_state:
        assert getattr(layer, name).shape[0] == 3
    assert layer.get_streaming_length() == 6 and layer.keys.shape[-2] == 21


def test_missing_attention_hook_is_reported():
    model = tiny_model("llama_gqa")  # plain sdpa: the layer never gets the attention call
    cache = DuoAttentionCache(head_pattern=MIXED, sink_size=2, recent_size=4, config=model.config)
    with pytest.raises(RuntimeError, match="enable_longmem_attention"):
        greedy(model, random_ids(1, 12), cache, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------- memory
def test_half_streaming_at_8k_tokens_holds_at_most_55_percent_of_the_full_cache():
    model = tiny_model("llama_gqa", num_hidden_layers=1, max_position_embeddings=8192)
    ids = torch.randint(3, 97, (1, 8192), generator=torch.Generator().manual_seed(0))
    cache = duo(model, torch.tensor([[0.9, 0.1]]), sparsity=0.5, sink_size=64, recent_size=256)
    with torch.no_grad():
        model(ids, cache=cache, logits_to_keep=1)
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 1, 8192, 16) and layer.streaming_keys.shape == (1, 1, 320, 16)
    full_bytes = 2 * 2 * 8192 * 16 * 4  # keys + values, 2 KV heads, fp32: what DynamicCache holds
    ratio = cache.memory_bytes() / full_bytes
    assert ratio <= 0.55, ratio
    assert cache.memory_bytes() == sum(getattr(layer, name).nbytes for name in layer.batch_state)


# ---------------------------------------------------------------------------------------------- thresholding
@pytest.mark.parametrize("num_heads", [4, 7, 64, 256])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_sparsity_gives_about_sparsity_times_n_streaming_heads(num_heads, sparsity):
    gates = torch.rand(num_heads, 1, generator=torch.Generator().manual_seed(num_heads))
    retrieval = select_retrieval_heads(gates, sparsity)
    streaming = int((~retrieval).sum())
    assert abs(streaming - sparsity * num_heads) <= 1
    # the official rule: heads whose gate is below the quantile threshold stream (distinct gates)
    threshold = torch.quantile(gates.double().flatten(), sparsity)
    assert torch.equal(retrieval, gates.double() >= threshold)
    # streaming heads are the lowest gates
    if 0 < streaming < num_heads:
        assert gates[~retrieval].max() <= gates[retrieval].min()


def test_ties_are_broken_deterministically_and_none_uses_one_half():
    gates = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    first = select_retrieval_heads(gates, 0.75)
    assert torch.equal(first, select_retrieval_heads(gates.clone(), 0.75))
    assert int((~first).sum()) == num_streaming_heads(8, 0.75) == 6
    # the four zero gates stream, then the earliest (layer, head) of the tied ones
    assert first.tolist() == [[False, False, False, False], [False, True, True, False]]
    assert torch.equal(
        select_retrieval_heads(torch.tensor([[0.2, 0.5, 0.7]]), None), torch.tensor([[False, True, True]])
    )


# -------------------------------------------------------------------------------------------- pattern files
def test_pattern_files_round_trip_atomically(tmp_path):
    gates = torch.tensor([[0.25, 1.0], [0.0, 0.75]])
    for suffix in (".tsv", ".json", ".safetensors"):
        path = save_head_pattern(tmp_path / f"gates{suffix}", gates, metadata={"sparsity": 0.5})
        torch.testing.assert_close(load_head_pattern(path), gates)
    assert load_head_pattern_metadata(tmp_path / "gates.json") == {"sparsity": 0.5}
    assert load_head_pattern_metadata(tmp_path / "gates.safetensors") == {"sparsity": 0.5}
    for suffix in (".json", ".safetensors"):
        path = save_head_pattern(tmp_path / f"pattern{suffix}", MIXED)
        assert torch.equal(load_head_pattern(path), MIXED)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers
    # the official tsv (tab-separated, gates outside [0, 1] are clipped) and an official pattern folder
    folder = tmp_path / "attn_patterns" / "model"
    folder.mkdir(parents=True)
    (folder / "full_attention_heads.tsv").write_text("1.2\t0.0\n-0.1\t5e-01\n")
    (folder / "config.json").write_text('{"sink_size": 128, "recent_size": 256}')
    assert load_head_pattern(folder).tolist() == [[1.0, 0.0], [0.0, 0.5]]
    model = tiny_model("llama_gqa")
    cache = duo(model, str(folder / "full_attention_heads.tsv"), sparsity=0.5, sink_size=2, recent_size=4)
    assert torch.equal(cache.retrieval_pattern, torch.tensor([[True, False], [False, True]]))
    greedy(model, random_ids(1, 12), cache, max_new_tokens=2)


def test_pattern_saved_in_the_model_folder_is_found(tmp_path):
    tiny_model("llama_gqa").save_pretrained(tmp_path)
    save_head_pattern(tmp_path / "duo_attention_heads.json", MIXED)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    cache = make_cache("duo_attention", model, sink_size=2, recent_size=4)
    assert torch.equal(cache.retrieval_pattern, MIXED)
    with pytest.raises(ValueError, match="head_pattern"):
        make_cache("duo_attention", tiny_model("llama_gqa"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_pattern=torch.ones(3, 2)), "head_pattern"),  # 3 layers, the model has 2
        (dict(head_pattern=torch.ones(2, 4)), "head_pattern"),  # 4 KV heads, the model has 2
        (dict(head_pattern=torch.ones(4)), "head_pattern"),  # not 2-D
        (dict(head_pattern=[[float("nan"), 1.0], [1.0, 1.0]]), "head_pattern"),
        (dict(head_pattern="/nonexistent/full_attention_heads.tsv"), "head_pattern"),
        (dict(head_pattern=MIXED, sparsity=1.0), "sparsity"),
        (dict(head_pattern=MIXED, sparsity=-0.1), "sparsity"),
        (dict(head_pattern=MIXED, sink_size=-1), "sink_size"),
        (dict(head_pattern=MIXED, recent_size=-4), "recent_size"),
        (dict(head_pattern=MIXED, recent_size=0), "recent_size"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DuoAttentionCache(config=tiny_config("llama_gqa"), **kwargs)


def test_pattern_without_config_is_checked_at_the_first_step():
    model = tiny_model("llama_gqa")
    enable_longmem_attention(model)
    cache = DuoAttentionCache(head_pattern=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="head_pattern"):
        model(random_ids(1, 4), cache=cache)
    assert math.isclose(DuoAttentionCache(head_pattern=MIXED).streaming_fraction, 0.5)


def test_decoding_ring_equals_append_and_truncate_across_a_later_chunk(monkeypatch):
    """The decoding ring buffer is a storage detail: decode, then a multi-token chunk (which unrolls the ring), then
    decode again gives what appending + truncating at every step gives."""
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 40, seed=3)

    def run():
        cache = duo(model, MIXED, sink_size=3, recent_size=5)
        logits = []
        with torch.no_grad():
            for start, stop in (
                (0, 14),
                *((t, t + 1) for t in range(14, 25)),
                (25, 31),
                *((t, t + 1) for t in range(31, 40)),
            ):
                position_ids = torch.arange(start, stop)[None]
                out = model(ids[:, start:stop], cache=cache, position_ids=position_ids)
                logits.append(out.logits)
        return torch.cat(logits, dim=1), cache

    ring_logits, ring_cache = run()
    assert ring_cache.layers[0]._oldest is not None  # the ring was in use at the end
    monkeypatch.setattr(DuoAttentionLayer, "_ring_ready", lambda self: False)
    plain_logits, plain_cache = run()
    torch.testing.assert_close(ring_logits, plain_logits, rtol=1e-5, atol=1e-5)
    for ring_layer, plain_layer in zip(ring_cache.layers, plain_cache.layers):
        for ring_state, plain_state in zip(ring_layer.streaming_state(), plain_layer.streaming_state()):
            torch.testing.assert_close(ring_state, plain_state)


@pytest.mark.parametrize("shape, layout", [("llama_gqa", None), ("llama_mha", "contiguous")])
def test_decoding_through_sdpa_itself_gives_the_bits_of_the_models_attention_function(monkeypatch, shape, layout):
    """With transformers' SDPA function and no mask, a decoding step makes that function's SDPA calls for both groups
    itself (one transpose for both, fewer ops): the same tokens and logits, bit for bit, as calling the function once
    per group. GQA (``enable_gqa``) and MHA."""
    model = tiny_model(shape, "sdpa")
    pattern = MIXED if layout is None else torch.tensor(MHA_PATTERNS[layout])
    ids = random_ids(1, 24)
    taken = []
    plain = DuoAttentionLayer._plain_sdpa_decode

    def spy(*args, **kwargs):
        taken.append(plain(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(DuoAttentionLayer, "_plain_sdpa_decode", staticmethod(spy))
    seq, logits = greedy(model, ids, duo(model, pattern, sink_size=3, recent_size=6))
    assert any(taken) and not taken[0]  # decoding steps take it, the prefill does not
    monkeypatch.setattr(DuoAttentionLayer, "_plain_sdpa_decode", staticmethod(lambda *args, **kwargs: False))
    ref_seq, ref_logits = greedy(model, ids, duo(model, pattern, sink_size=3, recent_size=6))
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
