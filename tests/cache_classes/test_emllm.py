"""EM-LLM: identity with a large window, surprise boundaries at planted tokens, graph refinement, retrieval."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_longmem import available_caches, enable_longmem_attention, make_cache
from hf_longmem.cache_classes.emllm import (
    EMLLMCache,
    conductance_scores,
    event_sizes,
    modularity_scores,
    refine_boundaries,
    surprise_boundaries,
)
from tests.helpers.cache_cases import CacheCase
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import VOCAB, random_ids, tiny_model
from tests.kernels.common import needs_triton

_KEEPS_EVERYTHING = (
    "keeps every token (older ones in event blocks, offloaded in deployment), so stored == seen and memory_bytes() "
    "exceeds the full cache's; the budget bounds the device-resident bytes (memory_saving = 'resident', the "
    "architecture matrix's check (b))"
)
_WHOLE_CHUNKS = (
    "exact on paddings of whole exc_block_size chunks only (others are refused with a ValueError up front); "
    "test_emllm and the architecture matrix's check (c) pad whole chunks"
)

# The shared cache suites (tests/helpers/cache_cases.py). At full budget the local window holds every token; evicting,
# layer.positions are the local window's (older tokens live in the event blocks).
CASE = CacheCase(
    "emllm",
    full={"n_local": 64, "n_mem": 16, "min_block_size": 2, "max_block_size": 8, "exc_block_size": 16},
    kept=lambda options, prompt, decoded, **_: min(prompt + decoded, options["n_local"]),
    skip={
        "test_seen_vs_stored_and_memory_bytes": _KEEPS_EVERYTHING,
        "test_left_padded_batch_equals_rows_alone": _WHOLE_CHUNKS,
        "test_pads_are_never_kept_when_evicting": _WHOLE_CHUNKS,
        "test_beam_search_reorders_all_per_row_state": "its local window holds n_local or n_local + 1 tokens between "
        "steps (trimmed as events form); test_beam_search checks the reordering of the layers, the block store and "
        "the segmentation state",
    },
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread (idle OpenMP threads spin and slow a shared machine down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(n_init=4, n_local=16, n_mem=24, min_block_size=2, max_block_size=16, exc_block_size=8)


def emllm(model, **options):
    enable_longmem_attention(model)
    return EMLLMCache.from_model(model, **options)


class ExpectTokenHead(torch.nn.Module):
    """A stub LM head that always predicts ``token``: every other token is maximally surprising."""

    def __init__(self, token: int):
        super().__init__()
        self.token = token

    def forward(self, hidden):
        logits = hidden.new_zeros(*hidden.shape[:-1], VOCAB)
        logits[..., self.token] = 10.0
        return logits


# ------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("shape", ["llama_gqa", "llama_mha"])
def test_large_window_equals_dynamic_cache(shape, attn_impl):
    model = tiny_model(shape, attn_impl)
    ids = random_ids(1, 40)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(config=model.config))
    cache = emllm(model, n_init=4, n_local=64, n_mem=16, min_block_size=2, max_block_size=8, exc_block_size=16)
    seq, logits = greedy(model, ids, cache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=2e-5)
    assert cache.get_seq_length() == seq.shape[1] - 1
    cache.close()


def test_surprise_is_the_models_next_token_information():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    expected = -logprobs[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)  # token t: -log p(x_{t+1} | x_<=t)
    cache = emllm(model, n_init=4, n_local=64, n_mem=16, min_block_size=2, max_block_size=8, exc_block_size=8)
    model(ids[:, :13], cache=cache)
    model(ids[:, 13:], cache=cache)  # the first forward's last token is scored by the second one
    assert cache._known == [29]
    torch.testing.assert_close(cache._history[0], expected, rtol=1e-4, atol=1e-4)
    cache.close()


def test_decoded_tokens_surprise_is_the_general_paths():
    """Decoding (one token per forward) scores the previous token from its kept logits without the general path's
    empty slices and concatenations: the surprise recorded is exactly ``logsumexp(l) - l[token]`` of the logits
    ``generate`` returned for that step (the same LM head on the same hidden state), and the boundary flags are
    the threshold test against the history before each token."""
    model = tiny_model("llama_gqa")
    options = dict(n_init=4, n_local=64, n_mem=16, min_block_size=2, max_block_size=8, exc_block_size=8)
    cache = emllm(model, **options, similarity_refinement=False)  # flags as the threshold set them
    seq, logits = greedy(model, random_ids(1, 16), cache, max_new_tokens=8)
    logits = logits[:, 0].float()  # [steps, vocab]: step s predicts token 16 + s, fed by the next step
    expected = torch.logsumexp(logits[:-1], -1) - logits[:-1].gather(-1, seq[0, 16:-1, None]).squeeze(-1)
    assert cache._known == [seq.shape[1] - 2]  # the last token is never fed, the one before waits for its next
    assert torch.equal(cache._history[0][-7:], expected)
    history = cache._history[0]
    assert cache._flags_start == [0] and len(cache._flags[0]) == len(history)  # nothing left the window
    for t in range(len(history) - 7, len(history)):  # each decoded token's flag: its threshold test
        flag = surprise_boundaries(history[t : t + 1], history[:t], cache.surprise_gamma)
        assert bool(flag) == bool(cache._flags[0][t])
    cache.close()


def test_planted_surprising_tokens_start_events():
    model = tiny_model("llama_gqa")
    model.lm_head = ExpectTokenHead(5)
    ids = torch.full((1, 130), 5)
    planted = [40, 67, 95]
    ids[0, planted] = 7
    cache = emllm(model, **{**SMALL, "max_block_size": 64}, similarity_refinement=False)
    greedy(model, ids, cache, max_new_tokens=10)
    layer = cache.layers[0]
    starts = SMALL["n_init"] + torch.tensor([0] + layer.store.block_sizes(0)).cumsum(0)
    # events start at the token that predicts the surprising one (official convention); the last one is open
    assert layer.store.block_sizes(0) == [35, 27, 28]
    assert starts[1:3].tolist() == [p - 1 for p in planted[:2]] and int(starts[3]) == planted[2] - 1
    assert all(cache.layers[1].store.block_sizes(0) == layer.store.block_sizes(0) for _ in range(1))
    refined = emllm(model, **{**SMALL, "max_block_size": 64}, similarity_refinement=True)
    greedy(model, ids, refined, max_new_tokens=10)
    assert len(refined.layers[0].store.block_sizes(0)) == 3  # refinement moves boundaries, keeps their count
    cache.close()
    refined.close()


def test_contiguity_buffer_holds_neighbours_of_retrieved_events():
    model = tiny_model("llama_gqa")
    cache = emllm(model, **SMALL)
    greedy(model, random_ids(1, 150), cache, max_new_tokens=4)
    layer = cache.layers[1]
    count = layer.store.num_blocks(0)
    assert count > 6
    layer.contiguity = [[]]
    query = torch.randn(1, 4, 1, 16)
    selected = layer.select_blocks(query)[0]
    buffer = set(layer.contiguity[0])
    similar = [b for b in selected if b not in buffer]
    assert buffer and len(selected) == len(set(selected)) < count
    assert all(b - 1 in similar or b + 1 in similar for b in buffer)
    sizes = layer.store.block_sizes(0)
    budget = SMALL["n_init"] + SMALL["exc_block_size"] + SMALL["n_mem"] - (layer.keys.shape[-2] + 1 - 16) - 4
    cap = budget - int(0.3 * budget + 1)
    largest = max(sizes)
    assert sum(sizes[b] for b in similar) <= cap + largest // 2 + 1  # the crossing block only if closer to cap
    cache.close()


def test_long_forward_keeps_the_remainder_bounded():
    """A prompt in one forward: the remainder stays bounded (fixed blocks, warned); in execution blocks: no warning."""
    import warnings

    model = tiny_model("llama_gqa")
    ids = random_ids(1, 150)
    cache = emllm(model, **SMALL, offload=True, offload_representatives=True)
    with pytest.warns(UserWarning, match="longer than exc_block_size"):
        model(ids, cache=cache)
    bound = SMALL["n_local"] + SMALL["exc_block_size"] + SMALL["max_block_size"]
    sizes = cache.layers[0].store.block_sizes(0)
    assert sizes and all(layer.keys.shape[-2] <= bound for layer in cache.layers)
    assert all(layer.store.block_sizes(0) == sizes for layer in cache.layers)
    assert cache.get_seq_length() == 150 == cache.layers[0].get_stored_length()
    seq, _ = greedy(model, torch.cat((ids, random_ids(1, 3, seed=2)), 1), cache, max_new_tokens=3)
    assert seq.shape[1] == 156 and cache.layers[0].get_stored_length() == 155
    chunked = emllm(model, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy(model, ids, chunked, max_new_tokens=3, **chunked.generate_kwargs)  # fed in execution blocks
    assert chunked.layers[0].store.num_blocks(0) > 0
    parts = chunked.memory_parts()  # on a CPU model everything is on the compute device
    assert parts["segmentation"][0] == parts["last_logits"][0] == "resident"
    assert parts["segmentation"][1] > 0 and parts["last_logits"][1] == VOCAB * 4
    assert chunked.memory_breakdown()["resident"] == sum(size for _, size in parts.values())
    for layer in chunked.layers:  # as if the model ran on an accelerator: the CPU-side history is offloaded
        layer.device = torch.device("cuda")
    assert chunked.memory_parts()["segmentation"] == ("offloaded", parts["segmentation"][1])
    cache.close()
    chunked.close()


# ----------------------------------------------------------------------------------- segmentation functions
def test_surprise_threshold():
    history = torch.tensor([1.0, 2.0, 3.0])  # mean 2, std 1
    assert surprise_boundaries(torch.tensor([2.5, 3.5, 2.9]), history, 1.0).tolist() == [False, True, False]
    assert surprise_boundaries(torch.tensor([1.0, 1.0, 9.0]), torch.zeros(0), 1.0).tolist() == [False, False, True]


def test_event_sizes_follow_the_official_walk():
    flags = torch.zeros(40, dtype=torch.bool)
    flags[[5, 6, 20]] = True
    assert event_sizes(flags, 3, 10) == [5, 10, 5, 10, 10]  # 1-token event absorbed, long events split
    assert event_sizes(torch.zeros(9, dtype=torch.bool), 3, 10) == []  # one open event: waits
    assert event_sizes(torch.zeros(25, dtype=torch.bool), 3, 10) == [10, 10]  # no boundary, too long: split
    flags = torch.zeros(12, dtype=torch.bool)
    flags[4] = True
    assert event_sizes(flags, 3, 10) == [4]  # the event after the last boundary stays open


def brute_modularity(adjacency, t):
    total = adjacency.sum()
    m = total / 2
    k = adjacency.sum(0)
    q = 0.0
    for community in (range(0, t), range(t, adjacency.shape[0])):
        for i in community:
            for j in community:
                q += adjacency[i, j] - k[i] * k[j] / (2 * m)
    return q / (4 * m)


def brute_conductance(adjacency, t):
    side = range(0, t)
    other = range(t, adjacency.shape[0])
    cut = sum(adjacency[i, j] for i in side for j in other)
    volume = [sum(adjacency[i].sum() for i in part) for part in (side, other)]
    return cut / min(volume) if min(volume) != 0 else float("inf")


def random_graph(size=9, seed=0):
    keys = torch.randn(size, 4, generator=torch.Generator().manual_seed(seed)).double()
    return keys @ keys.T + 5.0  # positive similarities


def test_modularity_and_conductance_match_brute_force():
    adjacency = random_graph()
    modularity, conductance = modularity_scores(adjacency), conductance_scores(adjacency)
    for t in range(adjacency.shape[0] + 1):
        assert float(modularity[t]) == pytest.approx(float(brute_modularity(adjacency, t)), rel=1e-9, abs=1e-12)
        assert float(conductance[t]) == pytest.approx(float(brute_conductance(adjacency, t)), rel=1e-9)


@pytest.mark.parametrize("metric", ["modularity", "conductance"])
def test_refinement_moves_boundaries_to_the_best_split_and_keeps_their_count(metric):
    clusters = torch.zeros(24, 24, dtype=torch.float64)
    for start, stop in ((0, 7), (7, 16), (16, 24)):  # three communities
        clusters[start:stop, start:stop] = 1.0
    adjacency = clusters + 0.05
    refined = refine_boundaries([9, 19], adjacency, min_size=2, metric=metric)
    assert refined == [7, 16]
    graph = random_graph(20, seed=3)
    boundaries = [6, 11, 17]
    refined = refine_boundaries(boundaries, graph, min_size=3, metric=metric)
    assert len(refined) == 3 and refined == sorted(refined)
    previous = 0
    brute = brute_modularity if metric == "modularity" else brute_conductance
    for boundary, got in zip(boundaries, refined):  # each one is the brute-force best split in its window
        half = (boundary - previous) // 2
        start, stop = max(0, previous - half), min(20, boundary + half)
        window = graph[start:stop, start:stop]
        candidates = range(previous + 3, boundary + 1)
        values = [float(brute(window, t - start)) for t in candidates]
        best = max(values) if metric == "modularity" else min(values)
        assert float(brute(window, got - start)) == pytest.approx(best) and got in candidates
        previous = got
    assert refine_boundaries([4], graph, min_size=3, first_movable=3) == [4]  # no room: stays


# ------------------------------------------------------------------------------------------- errors, API
def rows_alone(model, rows, total, options, chunk=None, max_new_tokens=8, chunked=True):
    """Each row generated alone, fed the same real tokens per forward as inside a left-padded batch of width
    ``total`` whose prompt ``generate`` splits in forwards of ``chunk`` (``None``: no partial first forward);
    ``chunked``: the rest of the prompt in execution blocks (the cache's ``generate_kwargs``), else one forward."""
    results = []
    for row_ids in rows:
        cache = emllm(model, **options)
        first = (chunk - (total - row_ids.shape[1]) % chunk) % chunk if chunk else 0
        if first:  # the row's real tokens in the batch's first chunk
            model(row_ids[:, :first], cache=cache)
        chunking = {} if chunked else {"prefill_chunk_size": None}
        results.append(greedy(model, row_ids, cache, max_new_tokens=max_new_tokens, **chunking))
        cache.close()
    return results


@pytest.mark.parametrize(
    "lengths,chunk_prefill",
    [
        ((152, 144, 136), True),  # generate feeds execution blocks (8); paddings of 0, 1 and 2 whole blocks
        ((152, 112, 96), True),  # the shorter rows' first forwards are only pads (told from the mask by the hook)
        ((120, 80, 45), False),  # one prompt forward: fixed blocks beyond the bound, events after it (per row)
    ],
)
def test_left_padded_batch_equals_rows_alone(lengths, chunk_prefill):
    """Per-row surprise, boundaries, refinement, events, budgets and contiguity buffers: each row of a left-padded
    batch gives the tokens it gives alone (fed the same real tokens per forward), its logits up to float rounding
    (batched matmuls over padded widths: masked slots add exact zeros, the BLAS summation order changes: ~1e-5)
    and the same event blocks."""
    import warnings

    from tests.cache_classes.test_infllm import left_padded

    model = tiny_model("llama_gqa")
    rows = [random_ids(1, length, seed=i + 1) for i, length in enumerate(lengths)]
    ids, mask = left_padded(rows)
    options = dict(SMALL)
    cache = emllm(model, **options)
    chunking = cache.generate_kwargs if chunk_prefill else {"prefill_chunk_size": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-forward case warns that it forms fixed blocks
        seq, logits = greedy(model, ids, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=8, **chunking)
        chunk = SMALL["exc_block_size"] if chunk_prefill else None
        alone = rows_alone(model, rows, ids.shape[1], options, chunk, chunked=chunk_prefill)
    blocks = []
    for row, (row_ids, (row_seq, row_logits)) in enumerate(zip(rows, alone)):
        assert torch.equal(seq[row, ids.shape[1] :], row_seq[0, row_ids.shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)
        blocks.append(cache.layers[0].store.block_sizes(row))
        assert all(layer.store.block_sizes(row) == blocks[-1] for layer in cache.layers)
    assert len({tuple(sizes) for sizes in blocks}) == len(rows) and min(map(len, blocks)) > 1  # events per row
    cache.close()


def test_padding_that_splits_an_execution_block_is_refused():
    """generate feeds execution blocks from the batch's first column: a row padded by a part of a block would get
    its real tokens in other groups than alone (other surprise, other events), so it is refused before any token."""
    from tests.cache_classes.test_infllm import left_padded

    model = tiny_model("llama_gqa")
    ids, mask = left_padded([random_ids(1, 150, seed=1), random_ids(1, 143, seed=2)])  # 7 pads: not a multiple of 8
    cache = emllm(model, **SMALL)
    with pytest.raises(ValueError, match="multiple of prefill_chunk_size"):
        greedy(model, ids, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=2, **cache.generate_kwargs)
    cache.close()


def test_equal_length_rows_equal_batch_one():
    model = tiny_model("llama_gqa")
    rows = [random_ids(1, 100, seed=1), random_ids(1, 100, seed=2)]
    cache = emllm(model, **SMALL)
    seq, logits = greedy(model, torch.cat(rows), cache, max_new_tokens=6)
    for row, (row_seq, row_logits) in enumerate(rows_alone(model, rows, 100, SMALL, max_new_tokens=6)):
        assert torch.equal(seq[row], row_seq[0])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)
    assert cache.layers[0].store.block_sizes(0) != cache.layers[0].store.block_sizes(1)
    cache.close()


@needs_triton
def test_triton_path_on_a_left_padded_batch_equals_rows_alone(monkeypatch):
    """The Triton memory attention and top-k on a padded batch (under the interpreter): the torch rows alone."""
    from hf_longmem.cache_classes.infllm import InfLLMLayer
    from tests.cache_classes.test_infllm import left_padded

    model = tiny_model("llama_gqa")
    options = dict(SMALL, n_mem=8)
    rows = [random_ids(1, 72, seed=1), random_ids(1, 64, seed=2)]
    ids, mask = left_padded(rows)
    alone = rows_alone(model, rows, ids.shape[1], options, SMALL["exc_block_size"], max_new_tokens=2)
    monkeypatch.setattr(InfLLMLayer, "kernel_backend", "triton")
    cache = emllm(model, **options)
    seq, logits = greedy(model, ids, cache, attention_mask=mask, pad_token_id=0, max_new_tokens=2)
    for row, (row_seq, row_logits) in enumerate(alone):
        assert torch.equal(seq[row, ids.shape[1] :], row_seq[0, rows[row].shape[1] :])
        torch.testing.assert_close(logits[:, row], row_logits[:, 0], rtol=1e-4, atol=1e-4)
    cache.close()


def test_beam_search():
    """Beams reorder the layers, the block store and the per-row segmentation state: at a large window they are
    DynamicCache's beams; with events each row of a padded batch gets the beams it gets alone (one prompt forward,
    so that the rows alone are fed the same tokens per forward)."""
    import warnings

    from tests.cache_classes.test_infllm import left_padded

    model = tiny_model("llama_gqa")
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    ids = random_ids(1, 20)
    ref = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    large = emllm(model, n_init=4, n_local=64, n_mem=16, min_block_size=2, max_block_size=8, exc_block_size=16)
    assert torch.equal(model.generate(ids, cache=large, **kwargs, **large.generate_kwargs), ref)
    large.close()
    rows = [random_ids(1, 90, seed=1), random_ids(1, 61, seed=2)]
    ids, mask = left_padded(rows)
    options = dict(SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one prompt forward: fixed blocks beyond the bound
        cache = emllm(model, **options)
        out = model.generate(ids, cache=cache, attention_mask=mask, pad_token_id=0, **kwargs)
        assert len(cache._known) == cache.layers[0].store.batch_size == len(cache.layers[0].contiguity) == 6
        for row, row_ids in enumerate(rows):
            alone = emllm(model, **options)
            expected = model.generate(row_ids, cache=alone, **kwargs)
            assert torch.equal(out[row, ids.shape[1] :], expected[0, row_ids.shape[1] :])
            alone.close()
    cache.close()


def test_missing_hook_is_refused():
    model = tiny_model("llama_gqa")
    manual = EMLLMCache(config=model.config, **SMALL)
    with pytest.raises(RuntimeError, match="make_cache"):
        model(random_ids(1, 5), cache=manual)


def test_registration_and_the_model_config_is_left_alone():
    """The cache asks for execution-block prefill through ``generate_kwargs``; it never edits the model's
    ``generation_config`` (no state changed behind the user)."""
    assert "emllm" in available_caches()
    model = tiny_model("llama_gqa")
    before = model.generation_config.to_dict()
    cache = make_cache("emllm", model, **SMALL)
    assert isinstance(cache, EMLLMCache) and cache.generate_kwargs == {"prefill_chunk_size": SMALL["exc_block_size"]}
    greedy(model, random_ids(1, 40), cache, max_new_tokens=2, **cache.generate_kwargs)
    cache.close()
    assert model.generation_config.to_dict() == before and model.generation_config.prefill_chunk_size is None
    assert make_cache("streaming", model, budget=16).generate_kwargs == {}


@pytest.mark.parametrize(
    "options,match",
    [
        ({"n_mem": 0}, "n_mem"),
        ({"min_block_size": 9, "max_block_size": 8}, "min_block_size"),
        ({"exc_block_size": 32, "n_local": 16}, "exc_block_size"),
        ({"similarity_metric": "cosine"}, "similarity_metric"),
        ({"refine_from_layer": 5}, "refine_from_layer"),
        ({"contiguity_buffer_size": 0}, "contiguity_buffer_size"),
        ({"surprise_gamma": "high"}, "surprise_gamma"),
    ],
)
def test_bad_arguments(options, match):
    with pytest.raises(ValueError, match=match):
        EMLLMCache(config=tiny_model("llama_gqa").config, **options)


def test_options_for_budget():
    from hf_longmem import get_cache_spec

    official = get_cache_spec("emllm").options_for_budget(8320)
    assert official == {
        "n_init": 128,
        "n_local": 4096,
        "n_mem": 4096,
        "min_block_size": 8,
        "max_block_size": 128,
        "exc_block_size": 512,
    }
    model = tiny_model("llama_gqa")
    for budget in (3, 24, 64):
        options = EMLLMCache.options_for_budget(budget)
        make_cache("emllm", model, **options).close()
        assert options["n_init"] + options["n_mem"] + options["n_local"] <= budget


def test_padding_hook_sits_on_the_decoder_stack():
    """The padding hook goes on the module that takes the cache; ModernBERT-decoder's ``get_decoder()`` is its LM head
    (a ``Linear``), where it would never fire."""
    from transformers import ModernBertDecoderConfig, ModernBertDecoderForCausalLM

    from hf_longmem.cache_classes.infllm import decoder_stack

    config = ModernBertDecoderConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        sep_token_id=2,
        cls_token_id=1,
    )
    model = ModernBertDecoderForCausalLM(config)
    assert isinstance(model.get_decoder(), torch.nn.Linear) and decoder_stack(model) is model.model
    llama = tiny_model("llama_gqa")
    assert decoder_stack(llama) is llama.get_decoder()
