"""benchmarks/memory_seed_sweep.py: configs x seeds trained in parallel, summarised across seeds."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from benchmarks.memory_seed_sweep import column_label, compare, main, run_name, summarise


def _result(accuracies: list[float]) -> dict:
    return {
        "rows": [
            {"task": "mqar", "context_length": 35 + 32 * i, "accuracy": a, "options": {"num_pairs": 16 * (i + 1)}}
            for i, a in enumerate(accuracies)
        ]
    }


def test_summary_mean_and_standard_error_per_column():
    summary = summarise({"m4": {0: _result([0.7, 0.5]), 1: _result([0.1, 0.3]), 2: _result([0.4, 0.4])}})
    first = summary["m4"]["mqar@35 num_pairs=16"]
    assert first["n"] == 3 and first["mean"] == pytest.approx(0.4)
    assert first["sem"] == pytest.approx(round(math.sqrt(0.09 / 3), 4))  # sample variance (0.09+0.09+0)/2
    assert first["per_seed"] == {"0": 0.7, "1": 0.1, "2": 0.4}
    assert summary["m4"]["mqar@67 num_pairs=32"]["mean"] == pytest.approx(0.4)
    assert summarise({"m1": {5: _result([0.2])}})["m1"]["mqar@35 num_pairs=16"]["sem"] == 0.0


def test_compare_separated_and_overlapping_seeds():
    high = {s: _result([0.8 + 0.01 * s]) for s in range(6)}
    low = {s: _result([0.2 + 0.01 * s]) for s in range(6)}
    summary = summarise({"a": high, "b": low, "c": {s: _result([0.2 + 0.01 * (5 - s)]) for s in range(6)}})
    (separated,) = compare(summary, "a", "b", permutations=20_000).values()
    assert separated["difference"] == pytest.approx(0.6) and separated["superiority"] == 1.0
    assert separated["permutation_p"] == pytest.approx(2 / 924, abs=0.003)  # 2 of C(12, 6) labellings this extreme
    assert separated["n"] == [6, 6] and separated["welch_t"] > 10
    (same,) = compare(summary, "b", "c", permutations=20_000).values()  # the same values, other seeds
    assert same["difference"] == pytest.approx(0.0) and same["permutation_p"] == 1.0
    assert same["superiority"] == 0.5


def test_names_follow_the_recipe():
    from pathlib import Path

    assert run_name(Path("recipes/configs/memory_mom_m4_grouped.yaml")) == "mom_m4_grouped"
    assert run_name(Path("x/other.yaml")) == "other"
    assert column_label({"task": "mqar", "context_length": 9, "options": {"b": None, "a": 2}}) == "mqar@9 a=2"


def test_sweep_trains_every_seed_and_resumes(tmp_path):
    config = {
        "max_steps": 2,
        "batch_size": 2,
        "seq_length": 24,
        "warmup_steps": 1,
        "log_every": 1,
        "num_threads": 1,
        "model": {
            "model_type": "mistral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 8,
        },
        "tasks": {"mqar": {"num_pairs": 2}},
        "eval": {"num_samples": 4, "batch_size": 2, "tasks": [{"task": "mqar", "length": 24, "num_pairs": 2}]},
    }
    path = tmp_path / "memory_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "sweep.json"
    args = [
        "--configs",
        str(path),
        "--seeds",
        "0",
        "1",
        "--jobs",
        "2",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    main(args)
    report = json.loads(out.read_text())
    assert report["failed"] == [] and set(report["runs"]["tiny"]) == {"0", "1"}
    assert report["runs"]["tiny"]["1"]["meta"]["seed"] == 1
    assert report["summary"]["tiny"]["mqar@24 num_pairs=2"]["n"] == 2
    stamp = (tmp_path / "runs" / "tiny_seed0" / "results.json").stat().st_mtime_ns
    main(args)  # resumes: nothing retrained
    assert (tmp_path / "runs" / "tiny_seed0" / "results.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):  # --compare names runs of the sweep
        main([*args, "--compare", "tiny", "other"])
    main([*args[:2], "--seeds", "0", *args[5:], "--max-steps", "1"])  # another length: its own folder
    shorter = json.loads((tmp_path / "runs" / "tiny_seed0_1steps" / "results.json").read_text())
    assert shorter["meta"]["training_steps"] == 1
    assert (tmp_path / "runs" / "tiny_seed0" / "results.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("config_name", "extra", "message"),
    [
        ("missing.yaml", [], "--configs: no such file"),
        ("ok.yaml", ["--seeds", "0", "0"], "--seeds has duplicates"),
        ("ok.yaml", ["--jobs", "0"], "--jobs must be >= 1"),
        ("ok.yaml", ["--configs", "ok.yaml", "sub/ok.yaml"], "--configs must have distinct file names"),
    ],
)
def test_bad_arguments_are_named(tmp_path, capsys, config_name, extra, message):
    (tmp_path / "ok.yaml").write_text("max_steps: 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ok.yaml").write_text("max_steps: 1\n")
    extra = [str(tmp_path / word) if word.endswith(".yaml") else word for word in extra]
    args = ["--configs", str(tmp_path / config_name), "--seeds", "0", "--out", str(tmp_path / "o.json"), *extra]
    with pytest.raises(SystemExit):
        main(args)
    assert message in capsys.readouterr().err
