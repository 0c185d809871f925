"""The ``hf-longmem`` command, in-process through ``main([...])`` on a tiny random model saved to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_longmem import available_caches
from hf_longmem.cli import main, parse_option
from tests.helpers.tiny_models import tiny_model
from tests.helpers.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread (idle OpenMP threads spin and slow a shared machine down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama_gqa", "sdpa").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _bench_args(model_dir, *extra):
    return [
        "bench",
        "--model",
        model_dir,
        "--tasks",
        "passkey,variable_tracking",
        "--lengths",
        "300,360",
        "--num-samples",
        "1",
        "--no-progress",
        *extra,
    ]


def test_bench_writes_results_and_plot(model_dir, tmp_path, capsys):
    out, png = tmp_path / "results.json", tmp_path / "plot.png"
    args = _bench_args(
        model_dir,
        "--caches",
        "full,streaming",
        "--budget",
        "64",
        "--fidelity",
        "--records",
        "--out",
        str(out),
        "--plot",
        str(png),
        "--cache-option",
        "streaming.sink_size=2",
    )
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "streaming(budget=64,sink_size=2)" in printed and "KL" in printed
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert len(rows) == 2 * 2 * 2
    assert {r["cache"] for r in rows} == {"full", "streaming"}
    assert all(r["cache_kwargs"] == {} for r in rows if r["cache"] == "full")
    assert all(r["cache_kwargs"] == {"budget": 64, "sink_size": 2} for r in rows if r["cache"] == "streaming")
    assert all(r["model"] == model_dir and r["top1_agreement"] is not None for r in rows)
    assert results["meta"]["model"] == model_dir and results["meta"]["budget"] == 64
    assert len(results["records"]) == len(rows)
    assert png.read_bytes()[:4] == b"\x89PNG"
    # `report` re-prints the same table.
    assert main(["report", str(out)]) == 0
    assert "streaming(budget=64,sink_size=2)" in capsys.readouterr().out


def test_bench_default_budget_ratio_skips_full(model_dir, capsys):
    assert main(_bench_args(model_dir, "--caches", "full,streaming", "--tasks", "passkey")) == 0
    printed = capsys.readouterr().out
    assert "streaming(budget=75)" in printed and "streaming(budget=90)" in printed
    assert "full(" not in printed


def test_bench_errors(model_dir, tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    assert main(["bench", "--model", missing]) == 2
    assert missing in capsys.readouterr().err
    assert main(_bench_args(model_dir, "--caches", "full,nope")) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and all(name in err for name in available_caches())
    assert main(_bench_args(model_dir, "--caches", "streaming", "--budget", "2")) == 2  # budget <= sink_size
    assert "budget" in capsys.readouterr().err
    assert main(_bench_args(model_dir, "--caches", "full", "--budget", "64")) == 2  # no selected cache takes it
    assert "--budget: no selected cache" in capsys.readouterr().err
    assert main(_bench_args(model_dir, "--caches", "full", "--cache-option", "budget=64")) == 2
    assert "'budget' is not accepted" in capsys.readouterr().err
    assert main(_bench_args(model_dir, "--cache-option", "position_mode=sideways", "--caches", "streaming")) == 2
    assert "position_mode" in capsys.readouterr().err
    assert main(_bench_args(model_dir, "--tasks", "unknown_task")) == 2
    assert "unknown_task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects malformed values itself
        main(["bench", "--lengths", "abc"])
    assert exit_info.value.code == 2


def test_generate(model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The grass is green. The pass key is")
    args = [
        "generate",
        "--model",
        model_dir,
        "--cache",
        "streaming",
        "--cache-option",
        "budget=16",
        "--prompt-file",
        str(prompt),
        "--max-new-tokens",
        "5",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() != "" or "new" in captured.err
    assert "[streaming]" in captured.err and "KV" in captured.err
    assert main(["generate", "--model", model_dir, "--cache", "nope", "--prompt", "x"]) == 2
    assert "available" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--prompt-file", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err
    assert (
        main(["generate", "--model", model_dir, "--cache", "full", "--cache-option", "budget=3", "--prompt", "x"]) == 2
    )
    assert "budget" in capsys.readouterr().err


def test_caches_and_report_errors(tmp_path, capsys):
    assert main(["caches"]) == 0
    listing = capsys.readouterr().out
    assert all(f"{name}:" in listing for name in available_caches())
    assert "budget (default: 256)" in listing and "rotary" not in listing
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_caches_lists_every_registered_cache_with_the_registry_budget_mapping(capsys):
    from hf_longmem import get_cache_spec

    assert main(["caches"]) == 0
    blocks: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith(" "):
            blocks[next(reversed(blocks))].append(line.strip())
        else:
            blocks[line.split(":")[0]] = []
    assert list(blocks) == available_caches()
    for name, lines in blocks.items():
        mapped = get_cache_spec(name).options_for_budget(256)
        expected = [f"--budget 256 sets: {', '.join(f'{k}={v}' for k, v in mapped.items())}"] if mapped else []
        assert [line for line in lines if line.startswith("--budget")] == expected, name


def test_parse_option():
    assert parse_option("budget=256") == (None, "budget", 256)
    assert parse_option("streaming.position_mode=shift") == ("streaming", "position_mode", "shift")
    assert parse_option("ratio=0.5") == (None, "ratio", 0.5)
    assert parse_option("flag=true") == (None, "flag", True)


def test_help_subprocess():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "hf_longmem.cli", "bench", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--budget-ratio" in result.stdout


def test_the_command_parses_and_fails_without_importing_torch():
    """`hf-longmem --help` and argument errors answer without torch or transformers (they take seconds to import)."""
    code = (
        "import sys\n"
        "sys.argv = ['hf-longmem', *sys.argv[1:]]\n"
        "from hf_longmem.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "    print('HEAVY', heavy, 'CODE', exit.code)\n"
    )
    for args in (
        ["--help"],
        ["bench", "--help"],
        ["edit", "--help"],
        ["agent-eval", "--help"],
        ["bench", "--lengths", "abc"],
    ):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert "HEAVY [] CODE" in result.stdout, (args, result.stdout[-500:], result.stderr[-2000:])


def test_public_names_are_the_api_module_names():
    import hf_longmem
    from hf_longmem import api

    assert sorted(hf_longmem.__all__) == sorted([*api.__all__, "__version__"])
    assert all(getattr(hf_longmem, name) is getattr(api, name) for name in api.__all__)


def test_bench_skips_caches_that_cannot_run_when_none_are_named(model_dir, capsys):
    args = [
        "bench",
        "--model",
        model_dir,
        "--tasks",
        "passkey",
        "--lengths",
        "300",
        "--num-samples",
        "1",
        "--no-progress",
        "--budget",
        "4",
    ]
    assert main(args) == 0  # streaming's budget must exceed its 4 sink tokens: that cache is skipped, with a warning
    captured = capsys.readouterr()
    assert "skipping cache 'streaming'" in captured.err
    assert "streaming(" not in captured.out and "full" in captured.out


def test_explicit_cache_options_are_never_downgraded_to_warnings(model_dir, capsys):
    base = [
        "bench",
        "--model",
        model_dir,
        "--tasks",
        "passkey",
        "--lengths",
        "300",
        "--num-samples",
        "1",
        "--no-progress",
    ]
    assert main([*base, "--cache-option", "budget=-1"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main([*base, "--budget", "64", "--cache-option", "streaming.sink_size=100"]) == 2
    assert "sink_size" in capsys.readouterr().err


def test_unwritable_outputs_are_refused_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    import hf_longmem.cli as cli

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark ran although an output cannot be written")

    monkeypatch.setattr(cli, "load_model", no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = _bench_args(model_dir, "--caches", "full")
    assert main([*args, "--out", str(blocker / "results.json")]) == 2  # parent is a file
    assert "not a folder" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path)]) == 2  # a folder
    assert "is a folder" in capsys.readouterr().err
    assert main([*args, "--plot", str(tmp_path / "plot.unknownformat")]) == 2
    assert "unknown image format" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main([*args, "--out", str(locked / "results.json")]) == 2
        assert "cannot be written" in capsys.readouterr().err


def test_ctrl_c_keeps_the_finished_rows(model_dir, tmp_path, capsys, monkeypatch):
    import hf_longmem.evals.runner as runner

    real_evaluate, calls = runner.evaluate, []

    def interrupt_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", interrupt_third)
    out = tmp_path / "partial.json"
    assert main(_bench_args(model_dir, "--caches", "full,streaming", "--budget", "64", "--out", str(out))) == 130
    err = capsys.readouterr().err
    assert "interrupted; 2 finished rows saved to" in err and "Traceback" not in err
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 2 and saved["meta"]["interrupted"] is True


def test_a_failing_run_keeps_the_finished_rows(model_dir, tmp_path, capsys, monkeypatch):
    import hf_longmem.evals.runner as runner

    real_evaluate, calls = runner.evaluate, []

    def fail_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a cache failed")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", fail_third)
    out = tmp_path / "partial.json"
    with pytest.raises(RuntimeError, match="a cache failed"):
        main(_bench_args(model_dir, "--caches", "full,streaming", "--budget", "64", "--out", str(out)))
    assert "failed; 2 finished rows saved to" in capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 2 and saved["meta"]["failed"] == "RuntimeError: a cache failed"


def test_result_files_respect_the_umask(tmp_path):
    from hf_longmem.evals.report import save_results

    old = os.umask(0o022)
    try:
        path = save_results(tmp_path / "r.json", [{"task": "t", "accuracy": 1.0}])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_bad_inputs_give_one_line_errors(model_dir, tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["generate", "--model", model_dir, "--prompt-file", str(latin)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--prompt-file", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["generate", "--model", model_dir, "--device", "meta", "--prompt", "x"]) == 2
    assert "meta" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    for content, match in [
        ({"rows": [1, "x", None]}, "row 0 must be an object"),
        ({"rows": [{"task": "t", "accuracy": "high"}]}, "non-numeric 'accuracy'"),
        ({"meta": "notadict", "rows": []}, "'meta' must be an object"),
    ]:
        bad = tmp_path / "odd.json"
        bad.write_text(json.dumps(content))
        assert main(["report", str(bad)]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_task_options(model_dir, tmp_path, capsys):
    base = [
        "bench",
        "--model",
        model_dir,
        "--tasks",
        "passkey",
        "--lengths",
        "300",
        "--num-samples",
        "1",
        "--caches",
        "full",
        "--no-progress",
    ]
    assert main([*base, "--task-option", "passkey.depth=0.5", "--out", str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    assert main([*base, "--task-option", "passkey.depth=2"]) == 2  # bad value
    assert "depth" in capsys.readouterr().err
    assert main([*base, "--task-option", "passkey.colour=1"]) == 2  # unknown option
    assert "colour" in capsys.readouterr().err
    assert main([*base, "--task-option", "depth=0.5"]) == 2  # no task named
    assert "TASK.KEY=VALUE" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path)]) == 2  # a folder, not a file
    assert "--out" in capsys.readouterr().err
    assert main([*base, "--lengths", "20"]) == 2  # too short for the task
    assert "length" in capsys.readouterr().err


def test_budget_maps_onto_each_method_options(model_dir, tmp_path):
    from hf_longmem import get_cache_spec

    mapped = [n for n in available_caches() if set(get_cache_spec(n).options_for_budget(64)) - {"budget"}]
    if not mapped:
        pytest.skip("no registered cache maps a budget onto other options")
    name = mapped[0]
    out = tmp_path / "r.json"
    args = [
        "bench",
        "--model",
        model_dir,
        "--tasks",
        "passkey",
        "--lengths",
        "300",
        "--num-samples",
        "1",
        "--caches",
        f"full,{name}",
        "--budget",
        "64",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = {r["cache"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[name]["cache_kwargs"] == get_cache_spec(name).options_for_budget(64)
    assert rows["full"]["cache_kwargs"] == {}


def test_bench_scores_choice_tasks_through_the_cache(model_dir, tmp_path, capsys):
    out = tmp_path / "sort.json"
    args = ["bench", "--model", model_dir, "--tasks", "sort", "--task-option", "sort.segment_words=3"]
    args += ["--lengths", "700", "--num-samples", "2", "--caches", "full,streaming", "--budget", "64"]
    assert main([*args, "--fidelity", "--no-progress", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["cache"] for r in rows] == ["full", "streaming"] and all(r["mode"] == "rollback" for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-9) and rows[1]["kl"] > 0
    assert "sort" in capsys.readouterr().out
