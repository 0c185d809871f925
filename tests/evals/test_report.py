"""Results files, tables and plots."""

from __future__ import annotations

import json
import math
import sys

import pytest

from hf_longmem.evals.report import collect_meta, format_bytes, format_table, load_results, plot, save_results


def make_rows(fidelity: bool = False):
    rows = []
    for length in (256, 512):
        for cache, kv, accuracy in (("full", 40_000 * length // 256, 1.0), ("streaming", 10_000, 0.5)):
            rows.append(
                {
                    "model": "tiny",
                    "task": "passkey",
                    "cache": cache,
                    "cache_name": cache,
                    "cache_kwargs": {} if cache == "full" else {"budget": 64},
                    "context_length": length,
                    "num_samples": 2,
                    "accuracy": accuracy,
                    "kv_bytes": kv,
                    "prefill_s": 0.0123,
                    "decode_tokens_per_s": 456.7,
                    "peak_memory_bytes": 0,
                    "top1_agreement": (1.0 if cache == "full" else 0.75) if fidelity else None,
                    "kl": (0.0 if cache == "full" else 0.4321) if fidelity else None,
                }
            )
    return rows


def test_json_round_trip_is_atomic_and_strict(tmp_path):
    rows = make_rows(fidelity=True)
    rows[1]["decode_tokens_per_s"] = math.nan  # becomes null (strict JSON)
    meta = collect_meta(model_name="tiny", command=["hf-longmem", "bench"], device="cpu", seed=3)
    path = save_results(tmp_path / "sub" / "results.json", rows, meta, records=[{"sample_id": "a", "score": 1.0}])
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temporary file left
    text = path.read_text()
    assert "NaN" not in text
    loaded = load_results(path)
    assert loaded["meta"]["model"] == "tiny" and loaded["meta"]["command"] == "hf-longmem bench"
    assert loaded["meta"]["seed"] == 3
    assert {"date", "versions", "machine"} <= set(loaded["meta"])
    assert loaded["meta"]["versions"]["torch"]
    assert loaded["rows"][1]["decode_tokens_per_s"] is None
    assert loaded["rows"][0] == rows[0]
    assert loaded["records"] == [{"sample_id": "a", "score": 1.0}]
    # Overwriting replaces the file as a whole.
    save_results(path, rows[:1])
    assert len(json.loads(path.read_text())["rows"]) == 1


def test_save_results_refuses_non_regular_files(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        save_results(tmp_path, make_rows())  # a folder


def test_load_results_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(bad)
    bad.write_text('{"meta": {}}')
    with pytest.raises(ValueError, match="rows"):
        load_results(bad)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(make_rows()))
    assert len(load_results(bare)["rows"]) == 4


def test_format_bytes():
    assert format_bytes(None) == "-"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**2) == "3.0 MiB"
    assert format_bytes(5 * 1024**4) == "5120.0 GiB"


def test_format_table():
    table = format_table(make_rows())
    lines = table.splitlines()
    assert lines[0].split() == [
        "task",
        "length",
        "cache",
        "n",
        "accuracy",
        "95%",
        "CI",
        "KV",
        "vs",
        "full",
        "peak",
        "prefill",
        "ms",
        "decode",
        "tok/s",
    ]
    assert "streaming(budget=64)" in lines[3]
    assert "39.1 KiB" in lines[2] and "12.3" in lines[2] and "456.7" in lines[2]
    assert "KL" not in table and "top-1" not in table
    assert "columns:" in table and "Wilson" in table  # the legend
    assert format_table(make_rows(), legend=False).count("\n") == 2 + 4 - 1
    with_fidelity = format_table(make_rows(fidelity=True))
    assert "top-1" in with_fidelity.splitlines()[0] and "0.4321" in with_fidelity
    rows = make_rows() + [dict(make_rows()[0], model="other")]
    assert format_table(rows).splitlines()[0].startswith("model")
    assert format_table([]) == "(no rows)"
    long = dict(make_rows()[0], cache="infllm", cache_kwargs={f"option_{i}": i for i in range(10)})
    label = format_table([long]).splitlines()[2].split()[2]
    assert label.startswith("infllm(option_0=0,") and label.endswith("...)") and len(label) == 48


def test_table_shows_interval_and_marks_caches_that_hold_the_full_cache():
    rows = make_rows()
    rows[1].update(accuracy_low=0.2, accuracy_high=0.8, num_turns=20)
    # at length 512 the "streaming" row holds as much as the full one
    rows[3].update(
        cache="sirllm", cache_name="sirllm", kv_bytes=rows[2]["kv_bytes"], memory_note="compresses between turns"
    )
    lines = format_table(rows).splitlines()
    assert "[0.20, 0.80]" in lines[3] and lines[3].split()[3] == "20"
    assert "  0.25  " in lines[3] and "  1.00  " in lines[2]  # 10,000 of 40,000 bytes
    assert lines[5].split()[2:4] == ["sirllm(budget=64)", "!"] and "!" not in lines[3]
    assert "  sirllm: compresses between turns" in lines


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = make_rows() + [dict(r, task="variable_tracking") for r in make_rows()]
    path = plot(rows, tmp_path / "plot.png", title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_task = plot(rows, tmp_path / "by_task.png", lines="task")
    assert by_task.stat().st_size > 0
    with pytest.raises(ValueError, match="`lines`"):
        plot(rows, tmp_path / "x.png", lines="cache")
    with pytest.raises(ValueError, match="kv_bytes"):
        plot([dict(r, kv_bytes=None) for r in rows], tmp_path / "x.png")


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match="matplotlib"):
        plot(make_rows(), tmp_path / "plot.png")
