"""ThinK: channel ranking, packed storage, exactness against zero-filled keys, composition, memory."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_longmem import SnapKVCache, ThinKCache, enable_longmem_attention, make_cache
from hf_longmem.cache_classes.think import channel_scores
from hf_longmem.memory.attention_features import AttentionFeatures
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model


def widest_head(model) -> int:
    """The largest ``head_dim`` of the model's attention modules (the config's where no module says)."""
    widths = [m.head_dim for m in model.modules() if isinstance(getattr(m, "head_dim", None), int)]
    if not widths:
        config = model.config.get_text_config(decoder=True)
        widths = [config.hidden_size // config.num_attention_heads]
    return max(widths)


def prunes_no_channel(model) -> float:
    """A ``key_channel_ratio`` in (0, 1) that prunes none: half a channel of the widest head (Gemma-4's global layers
    have wider heads), so the full budget is exact and runs ThinK's own attention path."""
    return 0.5 / widest_head(model)


_PACKED = (
    "the prompt is packed per head in pruned_keys / pruned_positions (layer.positions hold only later tokens); "
    "test_think checks padded rows and beam reordering of the packed state"
)

# The shared cache suites (tests/helpers/cache_cases.py). ThinK prunes int(head_dim * ratio) key channels of every
# prompt token whatever the budget; the token budget is SnapKV's (prompt compressed once, generated tokens appended).
CASE = CacheCase(
    "think",
    options={"window_size": 4},
    full={"key_channel_ratio": prunes_no_channel},
    kept=lambda options, decoded, **_: options["budget"] + decoded,
    skip={"test_pads_are_never_kept_when_evicting": _PACKED, "test_beam_search_reorders_all_per_row_state": _PACKED},
    matrix_full={"key_channel_ratio": prunes_no_channel},
    matrix_small={"window_size": 4},
)


def test_channel_ranking_equals_brute_force_frobenius_norms():
    torch.manual_seed(0)
    query, keys = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 10, 8)
    scores = channel_scores(query, keys, torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 2, 10, dtype=torch.bool))
    for kv_head in range(2):
        group = query[0, 2 * kv_head : 2 * kv_head + 2]  # [2, 6, 8]
        brute = torch.stack(
            [
                torch.stack(
                    [
                        torch.linalg.matrix_norm(torch.outer(group[g, :, c], keys[0, kv_head, :, c])) ** 2
                        for c in range(8)
                    ]
                )
                for g in range(2)
            ]
        ).mean(0)
        assert torch.equal(scores[0, kv_head].argsort(), brute.argsort())


def test_a_planted_channel_is_never_pruned():
    query, keys = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 10, 8)
    query[..., 5] *= 30
    keys[..., 5] *= 30
    scores = channel_scores(query, keys, torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 2, 10, dtype=torch.bool))
    assert (scores.topk(4, dim=-1).indices == 5).any(-1).all()


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_packed_attention_equals_zero_filled_keys(attn_impl):
    """Decoding over packed keys == decoding over full-width keys whose pruned channels are zero."""
    model = tiny_model("llama_gqa", attn_impl)
    ids = random_ids(1, 30)
    cache = make_cache("think", model, base="full", key_channel_ratio=0.4, window_size=8)
    seq, logits = greedy(model, ids, cache, max_new_tokens=6)

    ref_cache = DynamicCache()
    with torch.no_grad():
        first = model(ids, cache=ref_cache).logits[0, -1]
        for layer, think_layer in zip(ref_cache.layers, cache.layers):
            keep = torch.zeros(layer.keys.shape[0], layer.keys.shape[1], layer.keys.shape[-1], dtype=torch.bool)
            keep.scatter_(-1, think_layer.channel_index.long(), True)
            layer.keys = layer.keys * keep[:, :, None, :]
        ref = [first]
        for step in range(5):
            token = seq[:, 30 + step : 31 + step]
            ref.append(model(token, cache=ref_cache).logits[0, -1])
    torch.testing.assert_close(logits[:, 0], torch.stack(ref), rtol=1e-4, atol=1e-4)


def test_prefill_step_is_exact_and_generated_keys_stay_full_width():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    _, ref_logits = greedy(model, ids, DynamicCache(), max_new_tokens=1)
    cache = make_cache("think", model, base="snapkv", budget=16, window_size=4, key_channel_ratio=0.5)
    _, logits = greedy(model, ids, cache, max_new_tokens=4)
    torch.testing.assert_close(logits[0], ref_logits[0], rtol=1e-5, atol=1e-5)
    layer = cache.layers[0]
    assert layer.pruned_keys.shape == (1, 2, 16, 8)
    assert layer.keys.shape == (1, 2, 3, 16)  # generated tokens, full width
    assert cache.get_stored_length() == 19 and cache.get_seq_length() == 33


def test_a_recent_window_holding_the_whole_prompt_leaves_nothing_packed_and_equals_the_base():
    """``recent_size`` >= the kept prompt: nothing is packed (an empty span), every key stays full width, and the
    decode equals the base cache (it used to fail reshaping the empty span at the first decoded token)."""
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    ref_seq, ref_logits = greedy(model, ids, make_cache("snapkv", model, budget=16, window_size=4), max_new_tokens=5)
    cache = make_cache("think", model, base="snapkv", budget=16, window_size=4, recent_size=32)
    seq, logits = greedy(model, ids, cache, max_new_tokens=5)
    assert cache.layers[0].pruned_keys.shape[-2] == 0 and cache.layers[0].keys.shape[-2] == 16 + 4
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_a_packed_view_kept_between_steps_does_not_cut_the_autograd_graph():
    """The decode path keeps flat views of the packed prompt between steps, but not of a tensor autograd tracks: a
    view made under ``no_grad`` and reused with gradients on would detach the packed keys and values."""
    model = tiny_model("llama_gqa")
    cache = make_cache("think", model, base="full", key_channel_ratio=0.4, window_size=4)
    greedy(model, random_ids(1, 12), cache, max_new_tokens=2)
    layer = cache.layers[0]
    source_keys = layer.pruned_keys.clone().requires_grad_(True)
    source_values = layer.pruned_values.clone().requires_grad_(True)
    layer.pruned_keys, layer.pruned_values = source_keys * 1.0, source_values * 1.0
    query = torch.randn(1, model.config.num_attention_heads, 1, layer.keys.shape[-1])
    features = AttentionFeatures(scaling=0.25)
    with torch.no_grad():
        layer._attend_pruned(query, features)
    layer._attend_pruned(query, features).sum().backward()
    assert source_keys.grad is not None and source_values.grad is not None
    assert source_keys.grad.abs().sum() > 0 and source_values.grad.abs().sum() > 0


def test_key_bytes_at_ratio_0_4_are_at_most_62_percent_of_the_token_cache():
    model = tiny_model("llama_gqa", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
    ids = random_ids(1, 120)
    snap = make_cache("snapkv", model, budget=64, window_size=8)
    think = make_cache("think", model, base="snapkv", budget=64, window_size=8, key_channel_ratio=0.4)
    with torch.no_grad():
        model(ids, cache=snap)
        model(ids, cache=think)
    snap_key_bytes = sum(layer.keys.numel() * layer.keys.element_size() for layer in snap.layers)
    think_key_bytes = sum(
        layer.pruned_keys.numel() * layer.pruned_keys.element_size()
        + layer.channel_index.numel() * layer.channel_index.element_size()
        + layer.keys.numel() * layer.keys.element_size()
        for layer in think.layers
    )
    assert think_key_bytes <= 0.62 * snap_key_bytes
    assert think.memory_bytes() < snap.memory_bytes()


def test_composes_with_a_base_cache_instance():
    model = tiny_model("llama_gqa")
    enable_longmem_attention(model)
    ids = random_ids(1, 30)
    by_name = make_cache("think", model, base="snapkv", budget=12, window_size=4, key_channel_ratio=0.4)
    by_instance = ThinKCache(
        base=SnapKVCache(budget=12, window_size=4, config=model.config), window_size=4, config=model.config
    )
    seq_a, logits_a = greedy(model, ids, by_name, max_new_tokens=4)
    seq_b, logits_b = greedy(model, ids, by_instance, max_new_tokens=4)
    assert torch.equal(seq_a, seq_b)
    torch.testing.assert_close(logits_a, logits_b)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_left_padded_batch_equals_rows_alone(attn_impl):
    model = tiny_model("llama_gqa", attn_impl)
    long_row, short_row = random_ids(1, 30, seed=1), random_ids(1, 9, seed=2)
    batch = torch.cat((long_row, torch.cat((torch.zeros(1, 21, dtype=torch.long), short_row), dim=1)))
    mask = (torch.arange(30)[None] >= torch.tensor([[0], [21]])).long()
    options = dict(base="snapkv", budget=12, window_size=4, key_channel_ratio=0.4)
    seq, logits = greedy(model, batch, make_cache("think", model, **options), attention_mask=mask, pad_token_id=0)
    for row, ids in enumerate((long_row, short_row)):
        row_seq, row_logits = greedy(model, ids, make_cache("think", model, **options))
        assert torch.equal(seq[row, 30:], row_seq[0, ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)


def test_beam_search_reorders_the_packed_state():
    model = tiny_model("llama_gqa")
    cache = make_cache("think", model, base="snapkv", budget=12, window_size=4)
    out = model.generate(random_ids(1, 20), cache=cache, max_new_tokens=6, num_beams=3, do_sample=False)
    assert out.shape == (1, 26)
    layer = cache.layers[0]
    assert layer.pruned_keys.shape[0] == layer.channel_index.shape[0] == layer.keys.shape[0] == 3


def test_query_channel_index_memo_follows_the_channel_choice():
    """The decode path's memoised gather index (built once per channel choice) gives what the reference gather
    gives, also after a batch reorder replaced ``channel_index`` (rows with different kept channels)."""
    from hf_longmem.kernels.channel_attention.reference import gather_query_channels

    model = tiny_model("llama_gqa")
    batch = torch.cat((random_ids(1, 30, seed=1), random_ids(1, 30, seed=2)))
    cache = make_cache("think", model, base="snapkv", budget=12, window_size=4, key_channel_ratio=0.4)
    greedy(model, batch, cache, max_new_tokens=3)
    layer = cache.layers[0]
    assert not torch.equal(layer.channel_index[0], layer.channel_index[1])
    query = torch.randn(2, model.config.num_attention_heads, 1, layer.keys.shape[-1])
    kv_heads = layer.keys.shape[1]
    flat = query.view(2 * kv_heads, -1, query.shape[-1])  # [b * Hkv, group * q, d], as the decode path folds it

    def reference() -> torch.Tensor:
        return gather_query_channels(query, layer.channel_index).reshape(2 * kv_heads, flat.shape[1], -1)

    for _ in range(2):  # the first call may build the memo, the second uses it
        assert torch.equal(layer._query_channels(flat), reference())
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer._query_channels(flat), reference())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(key_channel_ratio=0.0), "key_channel_ratio"),
        (dict(key_channel_ratio=1.0), "key_channel_ratio"),
        (dict(base="h2o"), "base"),
        (dict(base="full", budget=64), "budget"),
        (dict(window_size=0), "window_size"),
        (dict(recent_size=-1), "recent_size"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThinKCache(**kwargs)


def test_triton_channel_attention_matches_the_torch_path():
    pytest.importorskip("triton")
    model = tiny_model("llama_gqa")
    ids = random_ids(2, 20)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    cache = make_cache("think", model, base="snapkv", budget=12, window_size=4, key_channel_ratio=0.4)
    greedy(model, ids, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=3)
    layer = cache.layers[0]
    query = torch.randn(2, 4, 1, 16)
    features = AttentionFeatures(scaling=0.25)
    torch_out = layer._attend_pruned(query, features)
    layer.kernel_backend = "triton"  # this layer only
    triton_out = layer._attend_pruned(query, features)
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-4, atol=1e-4)


def test_reset_forgets_the_packed_prompt():
    """``cache.reset()`` then a new prompt gives what a fresh cache gives (the packed prompt and channels are gone)."""
    model = tiny_model("llama_gqa")
    options = dict(budget=24, window_size=4, key_channel_ratio=0.5)
    cache = make_cache("think", model, **options)
    greedy(model, random_ids(1, 40, seed=1), cache, max_new_tokens=3)
    assert all(layer.is_pruned for layer in cache.layers)
    cache.reset()
    assert not any(layer.is_pruned for layer in cache.layers) and cache.get_seq_length() == 0
    ids = random_ids(1, 36, seed=2)
    seq, logits = greedy(model, ids, cache, max_new_tokens=4)
    fresh_seq, fresh_logits = greedy(model, ids, make_cache("think", model, **options), max_new_tokens=4)
    assert torch.equal(seq, fresh_seq)
    torch.testing.assert_close(logits, fresh_logits, rtol=0, atol=0)
