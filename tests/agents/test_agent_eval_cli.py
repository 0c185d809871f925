"""`hf-longmem agent-eval`: runs a policy over a dataset, prints the table, writes JSON results atomically."""

from __future__ import annotations

import json

from hf_longmem.cli import main


def test_agent_eval_synthetic_writes_results_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "run.json"
    args = ["agent-eval", "--synthetic", "--num-sessions", "3", "--num-questions", "4", "--abstain-below", "8.3"]
    assert main([*args, "--update-fraction", "0.0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| run | single-session-user |" in printed and "| run |" in printed.splitlines()[0]
    result = json.loads(out.read_text())
    assert result["summary"]["num_questions"] == 4 and len(result["questions"]) == 4
    assert result["config"]["policy"] == "retrieval" and result["config"]["synthetic"] is True
    assert {"prediction", "correct", "prompt_tokens"} <= set(result["questions"][0])


def test_agent_eval_refuses_bad_input_before_loading_a_model(tmp_path, capsys):
    assert main(["agent-eval", "--data", str(tmp_path / "missing.json")]) == 2
    assert "--data" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert main(["agent-eval", "--data", str(bad)]) == 2
    assert "JSON list" in capsys.readouterr().err
    assert main(["agent-eval", "--synthetic", "--update-fraction", "1.5"]) == 2
    assert "--update-fraction" in capsys.readouterr().err
    assert main(["agent-eval", "--synthetic", "--kv", "--mode", "full_history"]) == 2
