"""recipes/eval_wise.py end to end on a tiny random model: JSON rows and the markdown table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "eval_wise.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("eval_wise", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_wise_writes_table(tmp_path, capsys):
    recipe = _recipe()
    out = tmp_path / "res"
    argv = [
        "--model",
        "random",
        "--num-edits",
        "2",
        "--checkpoints",
        "1,2",
        "--option",
        "n_iter=3",
        "--option",
        'context_templates=["{}"]',
        "--out",
        str(out),
        "--no-progress",
    ]
    assert recipe.main(argv) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert [(r["method"], r["T"]) for r in results["rows"]] == [
        ("WISE-Retrieve", 1),
        ("WISE-Retrieve", 2),
        ("WISE-Merge", 1),
        ("WISE-Merge", 2),
        ("FT", 1),
        ("FT", 2),
    ]
    assert results["meta"]["config"]["n_iter"] == 3 and results["meta"]["config"]["save_freq"] == 25
    table = out.with_suffix(".md").read_text()
    assert "| Method | T | Reliability | Generalization | Locality | s / edit |" in table
    assert table.count("| WISE-Merge |") == 2 and "| Method |" in capsys.readouterr().out
