"""InfLLM: identity with a large window, brute-force equality with every block retrieved, retrieval, memory."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_longmem import available_caches, enable_longmem_attention, make_cache
from hf_longmem.cache_classes.infllm import InfLLMCache, InfLLMLayer, block_representatives
from hf_longmem.memory.rope import RotaryShift
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model
from tests.kernels.common import needs_triton

_KEEPS_EVERYTHING = (
    "keeps every token (older ones in memory blocks, offloaded in deployment), so stored == seen and memory_bytes() "
    "exceeds the full cache's; the budget bounds the device-resident bytes (memory_saving = 'resident', the "
    "architecture matrix's check (b))"
)

# The shared cache suites (tests/helpers/cache_cases.py). At full budget the local window holds every token; evicting,
# layer.positions are the local window's (older tokens live in the memory blocks of `store`).
CASE = CacheCase(
    "infllm",
    full={"n_local": 64, "block_size": 8, "topk": 2, "exc_block_size": 16},
    kept=lambda options, prompt, decoded, **_: min(prompt + decoded, options["n_local"]),
    skip={"test_seen_vs_stored_and_memory_bytes": _KEEPS_EVERYTHING},
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread (idle OpenMP threads spin and slow a shared machine down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(n_init=4, n_local=16, block_size=8, topk=2, repr_topk=2, max_cached_blocks=2, exc_block_size=8)


def infllm(model, **options):
    enable_longmem_attention(model)
    return InfLLMCache.from_model(model, **options)


# ------------------------------------------------------------------------------------------- contract
def test_large_window_equals_dynamic_cache(shape_name, attn_impl):
    model = tiny_model(shape_name, attn_impl)
    ids = random_ids(1, 40)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(config=model.config))
    cache = infllm(model, n_init=4, n_local=64, block_size=8, topk=2, exc_block_size=16)
    seq, logits = greedy(model, ids, cache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=2e-5)
    assert cache.get_seq_length() == seq.shape[1] - 1
    assert cache.layers[0].store.batch_size == 0  # nothing left the window


def test_chunked_prefill_and_continuation_without_eviction():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    ref_cache = DynamicCache(config=model.config)
    ref_seq, ref_logits = greedy(model, ids, ref_cache, prefill_chunk_size=8)
    cache = infllm(model, n_init=4, n_local=64, block_size=8, topk=2, exc_block_size=16)
    seq, logits = greedy(model, ids, cache, prefill_chunk_size=8)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=2e-5)
    turn = torch.cat((seq, random_ids(1, 5, seed=3)), dim=1)
    ref2, _ = greedy(model, turn, ref_cache, max_new_tokens=6)
    seq2, _ = greedy(model, turn, cache, max_new_tokens=6)
    assert torch.equal(seq2, ref2)


def test_prefill_in_execution_blocks_equals_one_forward_with_eviction():
    """One long forward is split in exc_block_size chunks inside attend: same as feeding the chunks one by one."""
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 90)
    single_seq, single_logits = greedy(model, ids, infllm(model, **SMALL), max_new_tokens=8)
    cache = infllm(model, **SMALL)
    chunked_seq, chunked_logits = greedy(model, ids, cache, max_new_tokens=8, prefill_chunk_size=8)
    assert torch.equal(single_seq, chunked_seq)
    torch.testing.assert_close(single_logits, chunked_logits, rtol=1e-5, atol=1e-5)
    assert cache.layers[0].store.num_blocks(0) > SMALL["topk"]  # retrieval really chose among blocks


def test_equal_length_rows_equal_batch_one():
    model = tiny_model("llama_gqa")
    rows = [random_ids(1, 50, seed=1), random_ids(1, 50, seed=2)]
    seq, logits = greedy(model, torch.cat(rows), infllm(model, **SMALL), max_new_tokens=6)
    for row, ids in enumerate(rows):
        row_seq, row_logits = greedy(model, ids, infllm(model, **SMALL), max_new_tokens=6)
        assert torch.equal(seq[row], row_seq[0])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)


def test_beam_search_at_large_window_equals_dynamic():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 20)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    ref = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    out = model.generate(ids, cache=infllm(model, n_local=64, block_size=8, topk=2, exc_block_size=16), **kwargs)
    assert torch.equal(out, ref)
    cache = infllm(model, **SMALL)  # with memory blocks: reordering keeps every row's state aligned
    out = model.generate(random_ids(1, 40), cache=cache, **kwargs)
    layer = cache.layers[0]
    assert out.shape == (1, 46) and layer.keys.shape[0] == layer.store.batch_size == 3


# ----------------------------------------------------------------------------------- brute force, layer level
def brute_force(query, keys, values, rotary, n_local, scale):
    """Every past token visible: the window at true relative positions, all older tokens at one distance.

    ``query [1, H, T, d]``, ``keys``/``values`` ``[1, Hkv, T, d]`` post-RoPE at positions ``0..T-1``.
    """
    heads, total = query.shape[1], query.shape[2]
    group = heads // keys.shape[1]
    pos = torch.arange(total)[None]
    keys_rep, values_rep = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    local = query @ keys_rep.transpose(-1, -2)
    memory_query = rotary.rotate(query, (n_local - 1) - pos)
    memory_keys = rotary.rotate(keys_rep, -pos)
    memory = memory_query @ memory_keys.transpose(-1, -2)
    i, j = torch.arange(total)[:, None], torch.arange(total)[None, :]
    logits = torch.where(i - j < n_local, local, memory) * scale
    logits = logits.masked_fill(j > i, float("-inf"))
    return torch.softmax(logits, -1) @ values_rep  # [1, H, T, d]


def run_layer(layer, query, keys, values, splits, scale):
    """Feeds ``[1, *, T, d]`` states through update + attend in forwards of ``splits`` tokens."""
    outputs, start = [], 0
    for size in splits:
        stop = start + size
        kwargs = {"position_ids": torch.arange(start, stop)[None]}
        layer.update(keys[:, :, start:stop], values[:, :, start:stop], kwargs=kwargs)
        out, _ = layer.attend(None, query[:, :, start:stop], None, None, None, scaling=scale)
        outputs.append(out.transpose(1, 2))
        start = stop
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize(
    "n_init,n_local,block_size,exc,splits",
    [
        (4, 12, 8, 5, [61, 1, 1, 1, 9, 1]),  # long forward in 5-query chunks, decoding, a second turn
        (0, 9, 4, 9, [30, 1, 17, 1]),  # no initial tokens, chunk = window
        (5, 16, 3, 1, [40, 1, 1]),  # one query per execution block
    ],
)
def test_all_blocks_retrieved_equals_brute_force(n_init, n_local, block_size, exc, splits):
    torch.manual_seed(0)
    heads, kv_heads, dim, total = 4, 2, 16, sum(splits)
    rotary = RotaryShift(1.0 / (100.0 ** (torch.arange(0, dim, 2).float() / dim)))
    pos = torch.arange(total)[None]
    query = rotary.rotate(torch.randn(1, heads, total, dim), pos)
    keys = rotary.rotate(torch.randn(1, kv_heads, total, dim), pos)
    values = torch.randn(1, kv_heads, total, dim)
    layer = InfLLMLayer(
        rotary, n_init, n_local, block_size, topk=total, repr_topk=2, max_cached_blocks=total, exc_block_size=exc
    )
    out = run_layer(layer, query, keys, values, splits, dim**-0.5)
    expected = brute_force(query, keys, values, rotary, n_local, dim**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert layer.init_keys.shape[-2] == n_init
    assert layer.store.num_blocks(0) == (total - n_local - n_init) // block_size
    assert layer.keys.shape[-2] == total - n_init - block_size * layer.store.num_blocks(0)


@pytest.mark.parametrize(
    "n_init,n_local,block_size,exc,splits,pad",
    [
        (4, 12, 8, 5, [61, 1, 1, 1, 9, 1], 17),  # the padded row's real tokens end a chunk early
        (0, 9, 4, 9, [30, 1, 17, 1], 12),
        (5, 16, 3, 1, [40, 1, 1], 9),
    ],
)
def test_left_padded_rows_equal_brute_force(n_init, n_local, block_size, exc, splits, pad):
    """Layer level, every block retrieved: row 1 starts with ``pad`` pads (position 0, as generate fills them) and
    gets exactly the brute-force attention of its real tokens; row 0 (no pads) its own; pads are never stored."""
    torch.manual_seed(0)
    heads, kv_heads, dim, total = 4, 2, 16, sum(splits)
    rotary = RotaryShift(1.0 / (100.0 ** (torch.arange(0, dim, 2).float() / dim)))
    rows = []
    for length in (total, total - pad):
        pos = torch.arange(length)[None]
        rows.append(
            (
                rotary.rotate(torch.randn(1, heads, length, dim), pos),
                rotary.rotate(torch.randn(1, kv_heads, length, dim), pos),
                torch.randn(1, kv_heads, length, dim),
            )
        )
    padded = [  # row 1 left-padded with random states (they must not matter)
        torch.cat((rows[0][i], torch.cat((torch.randn(1, rows[1][i].shape[1], pad, dim), rows[1][i]), 2)))
        for i in range(3)
    ]
    position_ids = torch.stack((torch.arange(total), (torch.arange(total) - pad).clamp(min=0)))
    layer = InfLLMLayer(
        rotary, n_init, n_local, block_size, topk=total, repr_topk=2, max_cached_blocks=total, exc_block_size=exc
    )
    outputs, start = [], 0
    for size in splits:
        stop = start + size
        layer.update(
            padded[1][:, :, start:stop],
            padded[2][:, :, start:stop],
            kwargs={"position_ids": position_ids[:, start:stop]},
        )
        out, _ = layer.attend(None, padded[0][:, :, start:stop], None, None, None, scaling=dim**-0.5)
        outputs.append(out.transpose(1, 2))
        start = stop
    out = torch.cat(outputs, dim=2)
    for row, (query, keys, values) in enumerate(rows):
        expected = brute_force(query, keys, values, rotary, n_local, dim**-0.5)
        torch.testing.assert_close(out[row : row + 1, :, total - query.shape[2] :], expected, rtol=1e-4, atol=1e-5)
        length = query.shape[2]
        assert layer.store.num_blocks(row) == (length - n_local - n_init) // block_size
        assert int((layer.positions[row] >= 0).sum()) == length - n_init - block_size * layer.store.num_blocks(row)
    assert layer.init_keys.shape[-2] == n_init and layer.get_seq_length() == total


def test_local_scores_are_the_window_attention_under_the_joint_softmax():
    """Representative scores: the attention each token received while in a query's window (joint softmax)."""
    torch.manual_seed(1)
    heads, kv_heads, dim, total, n_local = 4, 2, 8, 30, 7
    rotary = RotaryShift(1.0 / (100.0 ** (torch.arange(0, dim, 2).float() / dim)))
    pos = torch.arange(total)[None]
    query = rotary.rotate(torch.randn(1, heads, total, dim), pos)
    keys = rotary.rotate(torch.randn(1, kv_heads, total, dim), pos)
    layer = InfLLMLayer(rotary, 0, n_local, 1000, topk=1, repr_topk=1, max_cached_blocks=1, exc_block_size=5)
    run_layer(layer, query, keys, torch.randn(1, kv_heads, total, dim), [23, 1, 6], dim**-0.5)  # no block forms
    keys_rep = keys.repeat_interleave(2, 1)
    local = query @ keys_rep.transpose(-1, -2)
    memory = rotary.rotate(query, (n_local - 1) - pos) @ rotary.rotate(keys_rep, -pos).transpose(-1, -2)
    i, j = torch.arange(total)[:, None], torch.arange(total)[None, :]
    in_window = (i - j < n_local) & (j <= i)
    logits = torch.where(i - j < n_local, local, memory).masked_fill(j > i, float("-inf")) * dim**-0.5
    expected = (torch.softmax(logits, -1) * in_window).sum(-2)  # [1, H, T]
    torch.testing.assert_close(layer.local_scores, expected, rtol=1e-4, atol=1e-5)


def test_representatives_are_the_top_scored_keys():
    torch.manual_seed(0)
    keys, scores = torch.randn(2, 2, 12, 4), torch.rand(2, 4, 12)
    reprs = block_representatives(keys, scores, [5, 4, 3], repr_topk=2)
    assert reprs.shape == (2, 3, 4, 4)
    for b in range(2):
        for head in range(4):
            for block, (start, size) in enumerate([(0, 5), (5, 4), (9, 3)]):
                best = scores[b, head, start : start + size].topk(2).indices + start
                expected = keys[b, head // 2, best].mean(0)
                torch.testing.assert_close(reprs[b, block, head], expected)
    small = block_representatives(keys[:, :, :3], scores[:, :, :3], [1, 2], repr_topk=3)  # blocks < repr_topk
    torch.testing.assert_close(small[:, 1, 0], keys[:, 0, 1:3].mean(1))


def test_needle_block_is_retrieved_first():
    """A query aligned with one block's keys (in slow-rotating channels) ranks that block first."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size = 4, 2, 16, 4
    rotary = RotaryShift(1.0 / (1e4 ** (torch.arange(0, dim, 2).float() / dim)))
    total = 80
    pos = torch.arange(total)[None]
    raw_keys = 0.1 * torch.randn(1, kv_heads, total, dim)
    needle = torch.zeros(dim)
    needle[[7, 15]] = 3.0  # the lowest-frequency channel pair: almost no rotation at any position used here
    raw_keys[:, :, 20:24] = needle
    keys = rotary.rotate(raw_keys, pos)
    query = rotary.rotate(0.1 * torch.randn(1, heads, total, dim), pos)
    layer = InfLLMLayer(rotary, 0, 16, block_size, topk=2, repr_topk=2, max_cached_blocks=2, exc_block_size=16)
    run_layer(layer, query, keys, torch.randn(1, kv_heads, total, dim), [total], dim**-0.5)
    assert layer.store.num_blocks(0) > 10
    probe = rotary.rotate(needle.expand(1, heads, 1, dim), torch.tensor([[total]]))
    memory_query = rotary.rotate(probe, torch.tensor([[16 - 1 - total]]))
    assert layer.select_blocks(memory_query) == [[5, layer.select_blocks(memory_query)[0][1]]]
    scores = torch.einsum("hd,nhd->n", memory_query[0, :, 0], layer.store.representatives()[0])
    assert int(scores.argmax()) == 5  # block 5 holds tokens 20..23


def _forced(layer, pick):
    """Replaces ``layer.select_blocks`` by ``pick(num_blocks, head)`` (per head) or ``pick(num_blocks, None)``."""

    def select(memory_query, query_real=None):
        count = layer.store.num_blocks(0) if layer.store.batch_size else 0
        if count == 0:
            return None
        if not layer.perhead:
            return [pick(count, None)]
        return [[pick(count, head) for head in range(memory_query.shape[1])]]

    layer.select_blocks = select


def _head_pick(head_of_run):
    def pick(count, head):
        head = head_of_run if head is None else head
        chosen = [b for b in range(count) if (b + head) % 3 != 0]
        return chosen or [count - 1]

    return pick


def _rotated_query_and_keys(heads: int, kv_heads: int, dim: int, total: int):
    """A RoPE and random rotated query ``[1, heads, total, dim]`` / keys ``[1, kv_heads, total, dim]`` (global RNG)."""
    rotary = RotaryShift(1.0 / (100.0 ** (torch.arange(0, dim, 2).float() / dim)))
    pos = torch.arange(total)[None]
    query = rotary.rotate(torch.randn(1, heads, total, dim), pos)
    keys = rotary.rotate(torch.randn(1, kv_heads, total, dim), pos)
    return rotary, query, keys


def test_perhead_output_of_each_head_is_the_shared_output_with_its_blocks():
    """Heads attend independently: with ``perhead`` head h's output equals a shared run that retrieves h's blocks."""
    torch.manual_seed(0)
    heads, kv_heads, dim, total = 4, 2, 16, 70
    rotary, query, keys = _rotated_query_and_keys(heads, kv_heads, dim, total)
    values = torch.randn(1, kv_heads, total, dim)
    splits = [50, 1, 1, 9, 1, 8]
    options = dict(n_init=4, n_local=12, block_size=4, topk=3, repr_topk=2, max_cached_blocks=3, exc_block_size=6)
    layer = InfLLMLayer(rotary, **options, perhead=True)
    _forced(layer, _head_pick(None))
    out = run_layer(layer, query, keys, values, splits, dim**-0.5)
    for head in range(heads):
        shared = InfLLMLayer(rotary, **options)
        _forced(shared, _head_pick(head))
        expected = run_layer(shared, query, keys, values, splits, dim**-0.5)
        torch.testing.assert_close(out[:, head], expected[:, head], rtol=1e-5, atol=1e-6)


def test_perhead_selection_is_each_heads_top_k():
    torch.manual_seed(0)
    heads, kv_heads, dim, total = 4, 2, 16, 80
    rotary, query, keys = _rotated_query_and_keys(heads, kv_heads, dim, total)
    layer = InfLLMLayer(rotary, 0, 16, 4, topk=3, repr_topk=2, max_cached_blocks=3, exc_block_size=16, perhead=True)
    run_layer(layer, query, keys, torch.randn(1, kv_heads, total, dim), [total], dim**-0.5)
    probe = torch.randn(1, heads, 2, dim)
    selected = layer.select_blocks(probe)
    reprs = layer.store.representatives()[0]  # [n, H, d]
    for head in range(heads):
        scores = reprs[:, head] @ probe[0, head].mean(0)
        assert selected[0][head] == sorted(scores.topk(3).indices.tolist())
    assert len({tuple(ids) for ids in selected[0]}) > 1  # the heads really differ here


def test_perhead_runs_on_a_model_with_offload():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 80)
    plain = infllm(model, **SMALL, perhead=True)
    seq, logits = greedy(model, ids, plain, max_new_tokens=6)
    offloaded = infllm(model, **SMALL, perhead=True, offload=True)
    seq_off, logits_off = greedy(model, ids, offloaded, max_new_tokens=6)
    assert torch.equal(seq, seq_off)
    torch.testing.assert_close(logits, logits_off)
    large = infllm(model, n_init=4, n_local=128, block_size=8, topk=2, exc_block_size=16, perhead=True)
    ref_seq, _ = greedy(model, ids, DynamicCache(config=model.config), max_new_tokens=6)
    assert torch.equal(greedy(model, ids, large, max_new_tokens=6)[0], ref_seq)


# ------------------------------------------------------------------------------------------- memory, errors
def test_offload_lru_and_memory_breakdown():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 80)
    plain = infllm(model, **SMALL)
    seq, logits = greedy(model, ids, plain, max_new_tokens=6)
    offloaded = infllm(model, **SMALL, offload=True)
    seq_off, logits_off = greedy(model, ids, offloaded, max_new_tokens=6)
    assert torch.equal(seq, seq_off) and torch.equal(logits, logits_off)
    for layer in offloaded.layers:
        assert len(layer.store.resident_blocks(0)) <= SMALL["max_cached_blocks"]
    breakdown = offloaded.memory_breakdown()
    assert breakdown["offloaded"] > 0 and offloaded.memory_bytes() == sum(breakdown.values())
    assert plain.memory_breakdown()["offloaded"] == 0
    lru_copies = sum(
        k.numel() * k.element_size() + v.numel() * v.element_size()
        for layer in offloaded.layers
        for lru in layer.store._resident
        for k, v in lru.values()
    )
    assert plain.memory_bytes() == offloaded.memory_bytes() - lru_copies  # the same bytes, elsewhere
    full = DynamicCache(config=model.config)
    greedy(model, ids, full, max_new_tokens=6)
    assert offloaded.memory_breakdown()["resident"] < sum(
        layer.keys.numel() * layer.keys.element_size() * 2 for layer in full.layers
    )
    layer = plain.layers[0]
    memory_tokens = sum(layer.store.block_sizes(0))
    assert layer.get_stored_length() == layer.keys.shape[-2] + SMALL["n_init"] + memory_tokens
    assert plain.get_seq_length() == seq.shape[1] - 1 == layer.get_stored_length()


@pytest.mark.parametrize("perhead", [False, True])
def test_offload_representatives_keeps_resident_bytes_constant(perhead):
    """Representatives with the offloaded blocks: same outputs, resident bytes independent of the length."""
    model = tiny_model("llama_gqa")
    options = dict(SMALL, offload=True, perhead=perhead)
    resident, offloaded, resident_official = [], [], []
    for length in (80, 160):  # same phase modulo block_size and exc_block_size: same window and remainder
        ids = random_ids(1, length, seed=length)
        official = infllm(model, **options)
        seq, logits = greedy(model, ids, official, max_new_tokens=6)
        cache = infllm(model, **options, offload_representatives=True)
        seq_host, logits_host = greedy(model, ids, cache, max_new_tokens=6)
        assert torch.equal(seq, seq_host) and torch.equal(logits, logits_host)
        parts = cache.memory_parts()
        assert (
            parts["representatives"][0] == "offloaded" and official.memory_parts()["representatives"][0] == "resident"
        )
        assert parts["representatives"][1] == official.memory_parts()["representatives"][1] > 0
        for layer in cache.layers:
            assert layer.store.reprs.device == layer.store.home
            assert len(layer.store.resident_blocks(0)) == SMALL["max_cached_blocks"]  # the LRU is full, bounded
        breakdown = cache.memory_breakdown()
        assert breakdown == {
            where: sum(size for place, size in parts.values() if place == where) for where in ("resident", "offloaded")
        }
        assert cache.memory_bytes() == official.memory_bytes()  # the same bytes, elsewhere
        resident.append(breakdown["resident"])
        offloaded.append(breakdown["offloaded"])
        resident_official.append(official.memory_breakdown()["resident"])
    assert resident[0] == resident[1]
    assert offloaded[1] > offloaded[0]
    assert resident_official[1] > resident_official[0]  # official: the representatives grow on the device


def test_offload_representatives_without_offload_keeps_them_with_the_blocks():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 60)
    cache = infllm(model, **SMALL, offload=False, offload_representatives=True)
    greedy(model, ids, cache, max_new_tokens=3)
    parts = cache.memory_parts()
    assert parts["blocks"][0] == parts["representatives"][0] == "resident" and parts["lru"][1] == 0
    assert cache.memory_breakdown()["offloaded"] == 0


def test_make_cache_registration_and_needs_attention():
    assert "infllm" in available_caches()
    model = tiny_model("llama_gqa")
    cache = make_cache("infllm", model, **SMALL)
    assert isinstance(cache, InfLLMCache) and cache.n_local == 16
    plain = tiny_model("llama_gqa")  # still on sdpa: the layer never sees its queries
    manual = InfLLMCache(config=plain.config, **SMALL)
    plain(random_ids(1, 5), cache=manual)
    with pytest.raises(RuntimeError, match="hf_longmem attention"):
        plain(random_ids(1, 1), cache=manual)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[1, n_i]`` left-padded with token 0 into ``ids [b, T]`` and ``attention_mask [b, T]``."""
    total = max(row.shape[1] for row in rows)
    ids = torch.cat([torch.nn.functional.pad(row, (total - row.shape[1], 0)) for row in rows])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(row), (total - row.shape[1], 0)) for row in rows])
    return ids, mask


PADDED_ROWS = (70, 45, 23)  # 7, 4 and 1 memory blocks at SMALL: retrieval among blocks in the first two rows


@pytest.mark.parametrize(
    "extra",
    [{}, {"perhead": True}, {"offload": True, "offload_representatives": True}],
    ids=["shared", "perhead", "offload"],
)
def test_left_padded_batch_equals_rows_alone(extra):
    """Each row of a left-padded batch forms its own initial tokens, blocks and retrievals: the tokens each row
    gives alone, and its logits up to float rounding (the batched matmuls and softmax sums run over padded widths,
    masked slots add exact zeros but the summation order of BLAS changes with the shapes: ~1e-6 here)."""
    model = tiny_model("llama_gqa")
    rows = [random_ids(1, length, seed=i + 1) for i, length in enumerate(PADDED_ROWS)]
    ids, mask = left_padded(rows)
    cache = infllm(model, **SMALL, **extra)
    seq, logits = greedy(model, ids, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=8)
    layer = cache.layers[0]
    for row, row_ids in enumerate(rows):
        alone = infllm(model, **SMALL, **extra)
        row_seq, row_logits = greedy(model, row_ids, alone, max_new_tokens=8)
        assert torch.equal(seq[row, ids.shape[1] :], row_seq[0, row_ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)
        alone_layer = alone.layers[0]
        assert layer.store.block_sizes(row) == alone_layer.store.block_sizes(0)  # no pad in any block
        real = layer.positions[row] >= 0
        assert torch.equal(layer.positions[row][real], alone_layer.positions[0])
    assert layer.store.num_blocks(0) > SMALL["topk"] and layer.store.num_blocks(2) < layer.store.num_blocks(1)


def test_left_padded_prompt_in_several_forwards_equals_the_rows_fed_the_same_tokens():
    """Forwards that split rows unevenly (generate's prefill chunking of a padded prompt): each row gives what it
    gives alone when fed the same real tokens per forward (execution blocks count each row's real tokens).

    The short row is padded by more than two chunks: its first forwards are only pads, whose position ids (0) read
    as one real token; ``from_model``'s decoder pre-hook tells them apart from the mask. A cache built without it
    refuses such a forward (``ValueError``), never stores a pad."""
    model = tiny_model("llama_gqa")
    rows = [random_ids(1, 61, seed=1), random_ids(1, 38, seed=2)]
    ids, mask = left_padded(rows)
    cache = infllm(model, **SMALL)
    seq, logits = greedy(model, ids, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=6, prefill_chunk_size=8)
    for row, row_ids in enumerate(rows):
        alone = infllm(model, **SMALL)
        first = (8 - (ids.shape[1] - row_ids.shape[1]) % 8) % 8  # real tokens of the row in its first padded chunk
        if first:
            model(row_ids[:, :first], cache=alone)
        row_seq, row_logits = greedy(model, row_ids, alone, max_new_tokens=6, prefill_chunk_size=8)
        assert torch.equal(seq[row, ids.shape[1] :], row_seq[0, row_ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)
    enable_longmem_attention(model)
    unhooked = InfLLMCache(config=model.config, **SMALL)  # no decoder hook: position ids only
    with pytest.raises(ValueError, match="left padding"):
        greedy(model, ids, unhooked, attention_mask=mask, pad_token_id=0, max_new_tokens=2, prefill_chunk_size=8)


def test_beam_search_on_a_left_padded_batch():
    """Beams keep every per-row structure aligned (window, initial tokens, block store): at a large window they
    are DynamicCache's beams; with memory blocks each row's beams are the beams of the row alone."""
    model = tiny_model("llama_gqa")
    rows = [random_ids(1, 40, seed=1), random_ids(1, 27, seed=2)]
    ids, mask = left_padded(rows)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, attention_mask=mask, pad_token_id=0)
    ref = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    large = infllm(model, n_init=4, n_local=64, block_size=8, topk=2, exc_block_size=16)
    assert torch.equal(model.generate(ids, cache=large, **kwargs), ref)
    cache = infllm(model, **SMALL)
    out = model.generate(ids, cache=cache, **kwargs)
    layer = cache.layers[0]
    assert layer.keys.shape[0] == layer.store.batch_size == layer.init_keys.shape[0] == 6
    assert layer.store.num_blocks(0) > layer.store.num_blocks(3) > 0
    for row, row_ids in enumerate(rows):
        alone = model.generate(row_ids, cache=infllm(model, **SMALL), max_new_tokens=6, num_beams=3, do_sample=False)
        assert torch.equal(out[row, ids.shape[1] :], alone[0, row_ids.shape[1] :])


@pytest.mark.parametrize(
    "options,match",
    [
        ({"n_local": 0}, "n_local"),
        ({"block_size": 1.5}, "block_size"),
        ({"topk": 0}, "topk"),
        ({"n_init": -1}, "n_init"),
        ({"repr_topk": 9, "block_size": 8}, "repr_topk"),
        ({"max_cached_blocks": 4, "topk": 8}, "max_cached_blocks"),
        ({"exc_block_size": 32, "n_local": 16}, "exc_block_size"),
    ],
)
def test_bad_arguments(options, match):
    with pytest.raises(ValueError, match=match):
        InfLLMCache(config=tiny_model("llama_gqa").config, **options)


def test_needs_rope():
    with pytest.raises(ValueError, match="RoPE"):
        InfLLMCache()
    with pytest.raises(ValueError, match="unknown option"):
        make_cache("infllm", tiny_model("llama_gqa"), window=3)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        infllm(tiny_model("llama_gqa"), **SMALL).crop(1)


def test_options_for_budget():
    from hf_longmem import get_cache_spec

    official = get_cache_spec("infllm").options_for_budget(6272)
    assert {k: official[k] for k in ("n_init", "n_local", "block_size", "topk")} == {
        "n_init": 128,
        "n_local": 4096,
        "block_size": 128,
        "topk": 16,
    }
    model = tiny_model("llama_gqa")
    for budget in (3, 24, 64, 1000):
        options = InfLLMCache.options_for_budget(budget)
        cache = make_cache("infllm", model, **options)
        assert options["n_init"] + options["topk"] * options["block_size"] + options["n_local"] <= budget + 2
        assert cache.n_local == options["n_local"]


@needs_triton
def test_triton_kernels_give_the_torch_result(monkeypatch):
    """decode_attention (memory part) and block_topk on the Triton path, under the interpreter on CPU."""
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 44)
    options = dict(SMALL, topk=1, max_cached_blocks=2)
    seq, logits = greedy(model, ids, infllm(model, **options), max_new_tokens=2)
    monkeypatch.setattr(InfLLMLayer, "kernel_backend", "triton")
    cache = infllm(model, **options)
    seq_triton, logits_triton = greedy(model, ids, cache, max_new_tokens=2)
    assert cache.layers[0].store.num_blocks(0) > 1  # top-1 of several blocks
    assert torch.equal(seq, seq_triton)
    torch.testing.assert_close(logits_triton, logits, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("perhead", [False, True])
def test_triton_path_on_a_left_padded_batch_equals_rows_alone(monkeypatch, perhead):
    """The Triton memory attention (per-row valid slots, causal tail) and top-k, on a padded batch, under the
    interpreter: each row gives the torch path's tokens alone (logits to kernel rounding)."""
    model = tiny_model("llama_gqa")
    options = dict(SMALL, topk=1, max_cached_blocks=2, perhead=perhead)
    rows = [random_ids(1, 44, seed=1), random_ids(1, 29, seed=2)]
    expected = [greedy(model, row, infllm(model, **options), max_new_tokens=2) for row in rows]
    monkeypatch.setattr(InfLLMLayer, "kernel_backend", "triton")
    ids, mask = left_padded(rows)
    seq, logits = greedy(model, ids, infllm(model, **options), attention_mask=mask, pad_token_id=0, max_new_tokens=2)
    for row, (row_seq, row_logits) in enumerate(expected):
        assert torch.equal(seq[row, ids.shape[1] :], row_seq[0, rows[row].shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)


def test_perhead_gather_from_tensor_selection_equals_list_selection():
    """The vectorised per-head gather (tensor ids from ``select_blocks``) equals the same ids given as lists."""
    from hf_longmem.cache_classes.infllm import _PerHeadSelection
    from hf_longmem.memory.block_store import BlockStore

    torch.manual_seed(0)
    layer = InfLLMLayer(RotaryShift(torch.ones(2)), 0, 4, 3, 2, 1, 8, 4, offload=False, perhead=True)
    keys = torch.randn(1, 2, 12, 4)
    layer.store = BlockStore("cpu", 8, offload=False)
    layer.device = torch.device("cpu")
    layer.store.add_blocks(keys, keys + 1, [3, 3, 3, 3], torch.randn(1, 4, 4, 4))
    lists = [[[0, 2], [1], [0, 3], [2, 3]]]
    index = torch.tensor([[[0, 2], [-1, 1], [0, 3], [2, 3]]])
    by_list = layer._gather_per_head(lists)
    by_tensor = layer._gather_per_head(_PerHeadSelection(lists, index))
    for unit in range(4):  # the valid slots of every head hold the same tokens in the same order
        for part in (0, 1):
            torch.testing.assert_close(
                by_list[part][unit, 0][by_list[2][unit]], by_tensor[part][unit, 0][by_tensor[2][unit]]
            )
    head2 = by_tensor[0][2, 0][by_tensor[2][2]]  # head 2 reads KV head 1: blocks 0 and 3
    torch.testing.assert_close(head2, torch.cat((keys[0, 1, 0:3], keys[0, 1, 9:12])))


@pytest.mark.parametrize(
    "name, options",
    [
        ("infllm", SMALL),
        ("emllm", dict(n_init=4, n_local=16, n_mem=24, min_block_size=2, max_block_size=8, exc_block_size=8)),
    ],
)
def test_decoding_fast_paths_give_the_same_bits_as_the_general_computation(name, options, monkeypatch):
    """Decoding reads cached RoPE tables (``max_delta``) and the remainder's keys unrotated ahead of need (blocks
    form from them too): with both off (tables per call, the remainder unrotated at every step) the tokens and logits
    are the same bits, over steps that form and retrieve blocks."""
    from hf_longmem.memory import rope

    model = tiny_model("llama_gqa")
    ids = random_ids(1, 40)
    fast_cache = make_cache(name, model, **options)
    fast = greedy(model, ids, fast_cache, max_new_tokens=24)
    assert fast_cache.layers[0].store.num_blocks()[0] > 2  # more blocks than topk: retrieval chooses
    assert isinstance(fast_cache.layers[0].rotary, rope.ModuleRotation) and fast_cache.layers[0].rotary._signed
    monkeypatch.setattr(rope.ModuleRotation, "_signed_tables", lambda self, max_delta, device: None)
    monkeypatch.setattr(
        InfLLMLayer,
        "_unrotated_prefix",
        lambda self, count: self.unrotate(self.keys[:, :, :count], self.positions[:, :count]),
    )
    slow = greedy(model, ids, make_cache(name, model, **options), max_new_tokens=24)
    assert torch.equal(fast[0], slow[0])
    assert torch.equal(fast[1], slow[1])


@pytest.mark.parametrize(
    "name, options",
    [
        ("infllm", SMALL),
        ("infllm", dict(SMALL, offload=True)),
        ("emllm", dict(n_init=4, n_local=16, n_mem=24, min_block_size=2, max_block_size=8, exc_block_size=8)),
    ],
)
def test_joint_decode_step_equals_the_merged_general_computation(name, options, monkeypatch):
    """A decoding step of alike rows attends the window and the memory in one softmax (the joint probabilities are
    the representative scores), with the retrieved blocks and initial tokens kept between steps while the selection
    is the same: equal to float32 rounding to the general path (window and memory apart, merged by log-sum-exp,
    blocks gathered at every step), over steps that form, score and retrieve blocks (the same blocks, the same
    tokens); a reordered cache drops what it kept."""
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 40)
    fast_cache = make_cache(name, model, **options)
    fast = greedy(model, ids, fast_cache, max_new_tokens=24)
    layer = fast_cache.layers[0]
    assert layer.store.num_blocks()[0] > 3 and layer._retrieved is not None  # retrieval chose; blocks are kept
    assert fast_cache.memory_parts()["retrieved"][1] > 0
    monkeypatch.setattr(InfLLMLayer, "joint_decode", False)
    slow_cache = make_cache(name, model, **options)
    slow = greedy(model, ids, slow_cache, max_new_tokens=24)
    assert torch.equal(fast[0], slow[0])
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-5)
    for mine, general in zip(fast_cache.layers, slow_cache.layers):
        assert mine.store.block_sizes(0) == general.store.block_sizes(0)
        torch.testing.assert_close(mine.local_scores, general.local_scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.store.representatives(), general.store.representatives())
    assert slow_cache.layers[0]._retrieved is None
    fast_cache.reorder_cache(torch.tensor([0]))
    assert fast_cache.layers[0]._retrieved is None


def test_equal_block_representatives_give_the_same_bits_as_the_ragged_path():
    """Blocks of one size (InfLLM's, formed while decoding) take their representatives through views of the token
    axis: the same keys chosen (ties included) and averaged to the same bits as the general ragged path, GQA and
    ``repr_topk`` at or above the block size included, on strided (sliced) inputs as the layer passes them."""
    from hf_longmem.cache_classes.infllm import _equal_block_representatives, _ragged_block_representatives

    generator = torch.Generator().manual_seed(0)
    for blocks, size, repr_topk, kv_heads in ((3, 4, 2, 2), (2, 5, 5, 1), (4, 2, 4, 4)):
        total = blocks * size
        keys = torch.randn(2, kv_heads, total + 3, 8, generator=generator)[:, :, :total]
        scores = torch.randint(0, 3, (2, 4, total + 3), generator=generator).float()[:, :, :total]  # ties
        expected = _ragged_block_representatives(keys, scores, [size] * blocks, repr_topk)
        assert torch.equal(_equal_block_representatives(keys, scores, blocks, size, repr_topk), expected)
        assert torch.equal(block_representatives(keys, scores, [size] * blocks, repr_topk), expected)
        half = keys.to(torch.bfloat16)
        assert torch.equal(
            _equal_block_representatives(half, scores, blocks, size, repr_topk),
            _ragged_block_representatives(half, scores, [size] * blocks, repr_topk),
        )
