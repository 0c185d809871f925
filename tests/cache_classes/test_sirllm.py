"""SirLLM: self-information scores, per-turn eviction and decay, shared decisions, pos-shift, hook lifecycle."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import DynamicCache

from hf_longmem import SirLLMCache, make_cache
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy
from tests.helpers.rope_models import SHIFT_ARCHS, arch_model
from tests.helpers.tiny_models import random_ids, tiny_model

# The shared cache suites (tests/helpers/cache_cases.py). SirLLM evicts only between turns: within one prompt and its
# answer it holds every token.
CASE = CacheCase(
    "sirllm",
    kept=lambda prompt, decoded, **_: prompt + decoded,
    skip={
        "test_seen_vs_stored_and_memory_bytes": "evicts between turns only: one prompt and its answer hold what the "
        "full cache holds (memory_saving = 'between_turns'; the architecture matrix's check (b) measures a second turn)"
    },
)


def test_under_capacity_equals_dynamic_cache_and_scores_are_self_information():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(), max_new_tokens=4)
    cache = make_cache("sirllm", model, entropy_size=100)
    seq, logits = greedy(model, ids, cache, max_new_tokens=4)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(seq[:, :-1]).logits.float(), -1)[0]
    expected = -logprobs[:-1].gather(-1, seq[0, 1:-1, None]).squeeze(-1)  # token i scored by logits i-1
    torch.testing.assert_close(cache.scores[0, 1:], expected, rtol=1e-4, atol=1e-4)
    assert cache.scores[0, 0] == cache.scores[0, 1:30].max()  # first token of the turn: the turn's max


def two_turns(model, cache, first=30, second=7):
    seq, _ = greedy(model, random_ids(1, first), cache, max_new_tokens=3)
    turn = torch.cat((seq, random_ids(1, second, seed=9)), dim=1)
    return greedy(model, turn, cache, max_new_tokens=3)


def test_a_new_turn_evicts_to_capacity_minus_its_length_with_the_same_slots_in_every_layer():
    model = tiny_model("llama_gqa", num_hidden_layers=3)
    cache = make_cache("sirllm", model, entropy_size=12, start_size=2, recent_size=3)
    seq, _ = two_turns(model, cache)
    # capacity 17; before the 8 new tokens (7 + the last generated one) it kept 17 - 8 = 9, then 8 + 2 decoded
    assert cache.get_stored_length() == 9 + 8 + 2
    assert cache.get_seq_length() == seq.shape[1] - 1
    first = cache.layers[0].positions
    for layer in cache.layers[1:]:
        assert torch.equal(layer.positions, first)
    kept = first[0, 0].tolist()
    assert kept[:2] == [0, 1]  # start tokens
    assert kept[9:] == list(range(32, 42))  # the new turn (last generated token + 7) and its generation


def test_the_highest_self_information_tokens_survive_and_scores_decay_per_turn():
    model = tiny_model("llama_gqa")
    cache = make_cache("sirllm", model, entropy_size=10, start_size=1, decay_ratio=0.5)
    greedy(model, random_ids(1, 30), cache, max_new_tokens=1)
    before = cache.scores.clone()  # [1, 30]
    top = before[0].topk(10 - 5).indices  # entropy_size - n (5 new tokens), over all tokens as the official code
    cache_ids = torch.cat((random_ids(1, 30), random_ids(1, 1)), dim=1)
    greedy(model, torch.cat((cache_ids, random_ids(1, 4, seed=3)), dim=1), cache, max_new_tokens=1)
    kept = cache.layers[0].positions[0, 0, :6].tolist()
    assert kept[0] == 0
    assert set(top.tolist()) <= set(kept)
    torch.testing.assert_close(cache.scores[0, :6], before[0, kept] * 0.5)


@pytest.mark.parametrize("arch", list(SHIFT_ARCHS))
def test_shift_places_kept_tokens_at_contiguous_positions(arch):
    """Rule (g) of issue 15 on every RoPE layout: after eviction, a fresh run over the kept tokens at 0..S."""
    model = arch_model(arch, 1, **SHIFT_ARCHS[arch])
    cache = make_cache("sirllm", model, entropy_size=6, start_size=2)
    ids = random_ids(1, 20)
    with torch.no_grad():
        model(ids, cache=cache)
        turn = random_ids(1, 3, seed=2)
        logits = model(turn, cache=cache, position_ids=torch.tensor([[20, 21, 22]])).logits[0]
        kept = cache.layers[0].positions[0, 0, :5].tolist()
        fresh = model(torch.cat((ids[:, kept], turn), dim=1)).logits[0, -3:]
    torch.testing.assert_close(logits, fresh, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("gemma3", dict(layer_types=["sliding_attention", "full_attention"])),  # layer 0 sliding
        ("exaone4", dict(sliding_window_pattern=2)),  # sliding, NoPE full
        ("llama", dict(num_hidden_layers=2)),
    ],
)
def test_a_sliding_first_layer_is_not_read_for_positions(arch, overrides):
    """Issue 15: SirLLM read ``layers[0].positions``, which transformers' sliding layer does not have."""
    model = arch_model(arch, 2, **overrides)
    cache = make_cache("sirllm", model, entropy_size=8, start_size=2)
    seq, logits = two_turns(model, cache, first=12, second=4)
    assert torch.isfinite(logits).all()
    full = [layer for layer in cache.layers if hasattr(layer, "positions")]
    assert full and cache.scores.shape[-1] == full[0].get_stored_length()
    assert full[0].get_stored_length() < seq.shape[1] - 1  # the full layer did evict


def test_a_model_with_only_sliding_layers_runs():
    model = tiny_model("mistral", sliding_window=8)
    cache = make_cache("sirllm", model, entropy_size=8, start_size=2)
    seq, logits = two_turns(model, cache, first=12, second=4)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_left_padded_batch_equals_rows_alone(attn_impl):
    model = tiny_model("llama_gqa", attn_impl)
    rows = (random_ids(1, 30, seed=1), random_ids(1, 12, seed=2))
    batch = torch.cat((rows[0], torch.cat((torch.zeros(1, 18, dtype=torch.long), rows[1]), 1)))
    mask = (torch.arange(30)[None] >= torch.tensor([[0], [18]])).long()
    options = dict(entropy_size=8, start_size=2)
    cache = make_cache("sirllm", model, **options)
    seq, logits = greedy(model, batch, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=3)
    turn = torch.cat((seq, random_ids(2, 4, seed=5)), 1)
    seq2, logits2 = greedy(
        model,
        turn,
        cache,
        attention_mask=torch.cat((mask, torch.ones(2, 7, dtype=torch.long)), 1),
        pad_token_id=0,
        max_new_tokens=3,
    )
    for row, ids in enumerate(rows):
        alone = make_cache("sirllm", model, **options)
        row_seq, row_logits = greedy(model, ids, alone, max_new_tokens=3)
        row_turn = torch.cat((row_seq, turn[row : row + 1, -4:]), 1)
        row_seq2, row_logits2 = greedy(model, row_turn, alone, max_new_tokens=3)
        assert torch.equal(seq2[row, 30:], row_seq2[0, ids.shape[1] :])
        torch.testing.assert_close(logits2[:, row], row_logits2[:, 0], rtol=1e-4, atol=1e-4)


def test_hook_is_removed_on_close_and_when_the_cache_is_collected():
    model = tiny_model("llama_gqa")
    decoder = model.get_decoder()
    cache = make_cache("sirllm", model, entropy_size=8)
    assert len(decoder._forward_hooks) == 1
    cache.close()
    assert len(decoder._forward_hooks) == 0
    make_cache("sirllm", model, entropy_size=8)
    gc.collect()
    assert len(decoder._forward_hooks) == 0


def test_forwards_of_other_caches_are_not_scored():
    model = tiny_model("llama_gqa")
    cache = make_cache("sirllm", model, entropy_size=8)
    greedy(model, random_ids(1, 10), DynamicCache(), max_new_tokens=2)
    assert cache.scores is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(entropy_size=0), "entropy_size"),
        (dict(start_size=-1), "start_size"),
        (dict(decay_ratio=0.0), "decay_ratio"),
        (dict(decay_ratio=1.5), "decay_ratio"),
        (dict(position_mode="rotate"), "position_mode"),
        (dict(), "position_mode='shift' needs"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SirLLMCache(**kwargs)


@pytest.mark.parametrize("position_mode", ["shift", "true"])
def test_static_layout_equals_the_dynamic_one_over_turns_with_a_padded_batch(position_mode):
    """static=True: the same tokens and logits as static=False over two turns (the second one evicts, then shifts
    the kept keys), the same kept slots and scores once thawed, and capacity overflow refused."""
    model = tiny_model("llama_gqa")
    ids, mask = random_ids(2, 30), torch.ones(2, 30, dtype=torch.long)
    ids[1, :5], mask[1, :5] = 0, 0
    options = dict(entropy_size=12, start_size=2, recent_size=3, position_mode=position_mode)
    dynamic = make_cache("sirllm", model, **options)
    static = make_cache("sirllm", model, static=True, max_new_tokens=6, **options)
    assert static.is_compileable and not dynamic.is_compileable
    turn, turn_mask = ids, mask
    for _ in range(2):
        kwargs = dict(attention_mask=turn_mask, pad_token_id=0, max_new_tokens=6)
        want_seq, want_logits = greedy(model, turn, dynamic, **kwargs)
        got_seq, got_logits = greedy(model, turn, static, **kwargs)
        assert torch.equal(got_seq, want_seq)
        # the same attended tokens in ring order vs position order: float32 softmax sums in another order
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        turn = torch.cat((want_seq, random_ids(2, 7, seed=9)), dim=1)
        turn_mask = torch.cat((turn_mask, torch.ones(2, turn.shape[1] - turn_mask.shape[1], dtype=torch.long)), 1)
    assert dynamic.layers[0]._evicted  # the second turn evicted
    static.layers[0].thaw()  # back to the dynamic layout: the same slots and scores
    assert torch.equal(static.layers[0].positions, dynamic.layers[0].positions)
    torch.testing.assert_close(static.scores, dynamic.scores, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_cache("sirllm", model, static=True)
    with pytest.raises(RuntimeError, match="capacity exceeded"):
        greedy(model, ids, make_cache("sirllm", model, static=True, max_new_tokens=2, **options), max_new_tokens=4)
