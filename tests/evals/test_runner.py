"""The runner on a tiny random model with a character tokenizer and a fake task generator."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from hf_longmem import make_cache
from hf_longmem.evals.metrics import score
from hf_longmem.evals.profiling import greedy_generate, prefill
from hf_longmem.evals.runner import ROW_KEYS, answer_turns, evaluate, run_benchmark
from hf_longmem.evals.schema import ROW_FIELDS, Sample, Turn
from tests.helpers.tiny_models import random_ids, tiny_model
from tests.helpers.tiny_tokenizer import tiny_tokenizer

CHARS = "abcdefgh ."


def fake_task(task, tokenizer, length, num_samples, seed=0, num_turns=1):
    """Samples of about ``length`` characters (= tokens) with ``num_turns`` questions each."""
    samples = []
    for index in range(num_samples):
        rng = random.Random(f"{task}:{seed}:{index}")
        context = "".join(rng.choice(CHARS) for _ in range(length - 12))
        turns = [
            Turn(query=f"\nkey {t}?", answers=[str(rng.randrange(10))], max_new_tokens=5) for t in range(num_turns)
        ]
        samples.append(Sample(f"{task}-{seed}-{index}", task, context, turns, {"length": length}))
    return samples


def fake_generator(name, tokenizer, length, num_samples, seed=0, **options):
    return fake_task(name, tokenizer, length, num_samples, seed, num_turns=3 if name == "multi" else 1)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread (idle OpenMP threads spin and slow a shared machine down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL_INFLLM = {"n_init": 2, "n_local": 8, "block_size": 4, "topk": 2, "repr_topk": 2, "exc_block_size": 8}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama_gqa", "sdpa")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _answers(records):
    return [(r["sample_id"], r["turn"], r["prediction"], r["num_new_tokens"], r["score"]) for r in records]


@pytest.mark.parametrize(("name", "options"), [("full", {}), ("streaming", {"budget": 12, "sink_size": 2})])
def test_decode_loop_matches_generate(model, name, options):
    ids = random_ids(1, 40, seed=5)
    expected = model.generate(
        ids,
        cache=make_cache(name, model, **options),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=0,
    )[0, 40:].tolist()
    out = greedy_generate(model, ids, make_cache(name, model, **options), max_new_tokens=12, eos_token_id=2)
    assert out.tokens(0) == expected
    assert out.prefill_s > 0 and out.decode_s >= 0
    assert out.stopped_at_eos == [bool(expected) and expected[-1] == 2]


@pytest.mark.parametrize(("name", "options"), [("streaming", {"budget": 12, "sink_size": 2}), ("infllm", SMALL_INFLLM)])
def test_chunked_prefill_matches_generate(model, name, options):
    """``prefill_chunk_size`` feeds the prompt as ``generate(..., prefill_chunk_size=...)`` does (a chunk boundary
    changes what a bounded cache keeps, so the tokens tell whether the chunks were the same)."""
    ids = random_ids(1, 45, seed=6)
    expected = model.generate(
        ids,
        cache=make_cache(name, model, **options),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=0,
        prefill_chunk_size=8,
    )[0, 45:].tolist()
    out = greedy_generate(
        model, ids, make_cache(name, model, **options), max_new_tokens=8, eos_token_id=2, prefill_chunk_size=8
    )
    assert out.tokens(0) == expected


def test_chunked_prefill_with_left_padding_equals_one_forward(model):
    ids = random_ids(2, 30, seed=7)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    whole = greedy_generate(model, ids, make_cache("full", model), max_new_tokens=6, attention_mask=mask)
    chunked = greedy_generate(
        model, ids, make_cache("full", model), max_new_tokens=6, attention_mask=mask, prefill_chunk_size=4
    )
    assert chunked.sequences.tolist() == whole.sequences.tolist()
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        greedy_generate(model, ids, make_cache("full", model), max_new_tokens=1, prefill_chunk_size=0)


def test_batched_left_padding_matches_batch_of_one(model, tokenizer):
    samples = fake_task("one", tokenizer, 60, 2) + fake_task("one", tokenizer, 45, 2, seed=1)
    for name, options in [("full", {}), ("streaming", {"budget": 20, "sink_size": 2})]:
        alone = evaluate(model, tokenizer, samples, name, options, progress=False)
        batched = evaluate(model, tokenizer, samples, name, options, batch_size=3, progress=False)
        assert _answers(batched) == _answers(alone)
        assert [r["batch_size"] for r in batched] == [3, 3, 3, 1]


def test_single_mode_records(model, tokenizer):
    samples = fake_task("one", tokenizer, 50, 2)
    records = evaluate(model, tokenizer, samples, "streaming", {"budget": 16}, cache_label="s16", progress=False)
    assert len(records) == 2
    record = records[0]
    assert record["cache"] == "s16" and record["cache_name"] == "streaming" and record["cache_kwargs"] == {"budget": 16}
    assert record["mode"] == "single" and record["num_cached_tokens"] == 0
    assert record["num_prompt_tokens"] == len(tokenizer(samples[0].context + samples[0].turns[0].query)["input_ids"])
    assert 1 <= record["num_new_tokens"] <= 5
    assert record["kv_bytes"] > 0 and record["prefill_s"] > 0
    assert record["top1_agreement"] is None and record["kl"] is None
    assert record["metric"] == "exact_match" and record["score"] in (0.0, 1.0)


@pytest.mark.parametrize("mode", ["single", "rollback", "append"])
def test_full_equals_streaming_with_budget_covering_everything(model, tokenizer, mode):
    samples = fake_task("multi", tokenizer, 40, 2, num_turns=3)
    full = evaluate(model, tokenizer, samples, "full", mode=mode, progress=False)
    streaming = evaluate(model, tokenizer, samples, "streaming", {"budget": 200}, mode=mode, progress=False)
    assert _answers(streaming) == _answers(full)
    assert len(full) == 6


def test_first_turn_agrees_across_modes_with_full_cache(model, tokenizer):
    samples = fake_task("multi", tokenizer, 40, 2, num_turns=2)
    by_mode = {
        m: evaluate(model, tokenizer, samples, "full", mode=m, progress=False) for m in ("single", "rollback", "append")
    }
    first = {m: [r["prediction"] for r in recs if r["turn"] == 0] for m, recs in by_mode.items()}
    assert first["single"] == first["rollback"] == first["append"]
    # Rollback answers every turn from the context alone, like single mode with a full cache.
    assert [r["prediction"] for r in by_mode["rollback"]] == [r["prediction"] for r in by_mode["single"]]


def test_rollback_leaves_base_cache_unchanged(model, tokenizer):
    context = random_ids(1, 30, seed=6)[0].tolist()
    queries = [random_ids(1, 4, seed=s)[0].tolist() for s in (7, 8, 9)]
    for name, options in [("full", {}), ("streaming", {"budget": 16, "sink_size": 2})]:
        base = make_cache(name, model, **options)
        turns, info = answer_turns(model, base, context, queries, [4, 4, 4], mode="rollback", eos_token_id=[])
        reference = make_cache(name, model, **options)
        prefill(model, torch.tensor([context]), reference)
        assert base.get_seq_length() == reference.get_seq_length() == len(context)
        for layer, ref_layer in zip(base.layers, reference.layers):
            assert torch.equal(layer.keys, ref_layer.keys) and torch.equal(layer.values, ref_layer.values)
        assert [t["num_cached_tokens"] for t in turns] == [30, 30, 30]
        assert info["num_tokens"] == 30 and info["kv_bytes"] > 0


def test_append_mode_grows_the_conversation(model, tokenizer):
    context = random_ids(1, 30, seed=10)[0].tolist()
    queries = [random_ids(1, 4, seed=s)[0].tolist() for s in (11, 12, 13)]
    cache = make_cache("full", model)
    turns, _ = answer_turns(model, cache, context, queries, [3, 3, 3], mode="append", eos_token_id=[])
    cached = [t["num_cached_tokens"] for t in turns]
    assert cached[0] == 30
    for before, after in zip(turns, turns[1:]):  # query + answer appended, the last answer token fed next turn
        assert after["num_cached_tokens"] == before["num_cached_tokens"] + before["num_prompt_tokens"] + 3 - 1
        assert after["num_prompt_tokens"] == 1 + 4
    assert cache.get_seq_length() == cached[-1] + turns[-1]["num_prompt_tokens"] + 3 - 1
    # Golden history: the cache keeps the queries and golden answers, not the generated ones.
    golden = [[5, 6, 2], [7, 2], [8, 2]]
    cache = make_cache("full", model)
    turns, _ = answer_turns(
        model, cache, context, queries, [3, 3, 3], mode="append", history="golden", golden_ids=golden, eos_token_id=[]
    )
    assert [t["num_cached_tokens"] for t in turns] == [30, 30 + 4 + 3, 30 + 4 + 3 + 4 + 2]
    assert cache.get_seq_length() == 30 + 4 + 3 + 4 + 2


def test_append_golden_via_evaluate(model, tokenizer):
    samples = fake_task("multi", tokenizer, 40, 1, num_turns=2)
    records = evaluate(model, tokenizer, samples, "full", mode="append", history="golden", progress=False)
    golden_len = len(tokenizer(" " + samples[0].turns[0].answers[0], add_special_tokens=False)["input_ids"]) + 1
    query_len = len(tokenizer(samples[0].turns[0].query, add_special_tokens=False)["input_ids"])
    assert records[1]["num_cached_tokens"] == records[0]["num_cached_tokens"] + query_len + golden_len


def test_rollback_does_not_copy_state_between_turns(model, tokenizer):
    samples = fake_task("multi", tokenizer, 40, 1, num_turns=2)
    base = copy.deepcopy(samples)
    base[0].turns = base[0].turns[1:]  # ask only the second question
    alone = evaluate(model, tokenizer, base, "streaming", {"budget": 16}, mode="rollback", progress=False)
    both = evaluate(model, tokenizer, samples, "streaming", {"budget": 16}, mode="rollback", progress=False)
    assert both[1]["prediction"] == alone[0]["prediction"]


def test_bad_arguments(model, tokenizer):
    samples = fake_task("one", tokenizer, 30, 1)
    with pytest.raises(ValueError, match="`mode`"):
        evaluate(model, tokenizer, samples, "full", mode="multi_turn", progress=False)
    with pytest.raises(ValueError, match="`history`"):
        evaluate(model, tokenizer, samples, "full", mode="append", history="gold", progress=False)
    with pytest.raises(ValueError, match="`batch_size`"):
        evaluate(model, tokenizer, samples, "full", mode="rollback", batch_size=2, progress=False)
    with pytest.raises(ValueError, match="unknown cache"):
        evaluate(model, tokenizer, samples, "nope", progress=False)
    with pytest.raises(ValueError, match="budget"):
        evaluate(model, tokenizer, samples, "full", {"budget": 8}, progress=False)
    with pytest.raises(ValueError, match="`lengths`"):
        run_benchmark(model, tokenizer, ["one"], [], {"full": ("full", {})}, task_generator=fake_generator)
    with pytest.raises(ValueError, match="caches"):
        run_benchmark(model, tokenizer, ["one"], [30], {"full": "full"}, task_generator=fake_generator)


def test_run_benchmark_rows(model, tokenizer):
    records = []
    caches = {"full": ("full", {}), "stream": ("streaming", lambda length: {"budget": length // 4})}
    rows = run_benchmark(
        model,
        tokenizer,
        ["one", "multi"],
        [40, 64],
        caches,
        num_samples=2,
        fidelity=True,
        task_generator=fake_generator,
        model_name="tiny",
        records=records,
        progress=False,
    )
    assert len(rows) == 2 * 2 * 2
    assert [(r["task"], r["context_length"], r["cache"]) for r in rows[:4]] == [
        ("one", 40, "full"),
        ("one", 40, "stream"),
        ("one", 64, "full"),
        ("one", 64, "stream"),
    ]
    kinds = {"text": str, "int": int, "number": (int, float), "object": dict}
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        # every key the runner writes is declared in the one row schema, with a value of its kind (or null)
        assert set(row) <= {f.name for f in ROW_FIELDS}
        assert all(row.get(f.name) is None or isinstance(row[f.name], kinds[f.kind]) for f in ROW_FIELDS)
        assert row["model"] == "tiny" and row["num_samples"] == 2
        assert 0.0 <= row["accuracy"] <= 1.0
        assert isinstance(row["kv_bytes"], int) and row["kv_bytes"] > 0
        assert row["prefill_s"] > 0
    full = [r for r in rows if r["cache"] == "full"]
    stream = [r for r in rows if r["cache"] == "stream"]
    assert all(r["top1_agreement"] == 1.0 and r["kl"] == pytest.approx(0.0, abs=1e-5) for r in full)
    assert [r["cache_kwargs"] for r in stream] == [{"budget": 10}, {"budget": 16}] * 2
    assert all(s["kv_bytes"] < f["kv_bytes"] for s, f in zip(stream, full))
    assert [r["mode"] for r in rows] == ["single"] * 4 + ["rollback"] * 4
    assert [r["num_turns"] for r in rows] == [2] * 4 + [6] * 4
    assert len(records) == sum(r["num_turns"] for r in rows)
    assert all(r["model"] == "tiny" for r in records)


def test_rows_split_offloaded_memory_bytes(model, tokenizer):
    """InfLLM reports resident vs offloaded bytes (summing to kv_bytes); caches without a split do not."""
    options = dict(n_init=4, n_local=16, block_size=8, topk=2, repr_topk=2, max_cached_blocks=2, exc_block_size=8)
    caches = {"full": ("full", {}), "infllm": ("infllm", {**options, "offload": True})}
    rows = run_benchmark(
        model,
        tokenizer,
        ["one", "multi"],
        [64],
        caches,
        num_samples=1,
        task_generator=fake_generator,
        progress=False,
    )
    for row in rows:
        if row["cache"] == "full":
            assert "kv_resident_bytes" not in row
            continue
        assert row["kv_offloaded_bytes"] > 0 and row["kv_resident_bytes"] > 0
        assert abs(row["kv_resident_bytes"] + row["kv_offloaded_bytes"] - row["kv_bytes"]) <= 1


def test_peak_memory_and_profile_generation(model):
    import mmap

    from hf_longmem.evals.profiling import PeakMemory, profile_generation

    size = 64 * 1024 * 1024
    with PeakMemory("cpu") as peak:
        # fresh anonymous pages, every one written: torch's or malloc's free lists (refilled by earlier tests) would
        # serve a tensor from memory the process already holds, which no resident-set measure can see
        region = mmap.mmap(-1, size)
        region.write(b"\x01" * size)
        region.close()
    assert peak.kind in ("cpu_rss_peak_delta", "cpu_maxrss_growth", "unavailable")
    if peak.kind == "cpu_rss_peak_delta":
        assert peak.peak_bytes >= 48 * 1024 * 1024
    cache = make_cache("streaming", model, budget=8, sink_size=2)
    stats = profile_generation(model, random_ids(1, 30, seed=3)[0], cache, max_new_tokens=4, eos_token_id=[])
    assert stats["num_new_tokens"] == 4 and len(stats["tokens"]) == 4
    assert stats["kv_bytes"] == cache.memory_bytes() > 0
    assert stats["prefill_s"] > 0 and stats["decode_tokens_per_s"] > 0


def test_metric_options_reach_the_scorer(model, tokenizer):
    """A LongBench classification sample: the runner scores with meta["metric_options"] (all_classes, first line)."""
    (sample,) = fake_task("trec", tokenizer, 40, 1)
    options = {"first_line": True, "all_classes": list("abcdefgh")}
    sample.meta.update(metric="longbench_classification", metric_options=options)
    sample.turns[0].answers = ["a"]
    (record,) = evaluate(model, tokenizer, [sample], "full", progress=False)
    assert record["metric"] == "longbench_classification"
    assert record["score"] == score(record["prediction"], ["a"], "longbench_classification", **options)
    with pytest.raises(ValueError, match="all_classes"):
        score(record["prediction"], ["a"], "longbench_classification")
