"""recipes/eval_tiny.py: the model card names every training run behind the model and derives its summary from the
measured rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eval_tiny", ROOT / "recipes" / "eval_tiny.py")
eval_tiny = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("eval_tiny", eval_tiny)
_spec.loader.exec_module(eval_tiny)


def _run(folder: Path, init_from: str, steps: int, kv_heads: int, max_length: int) -> None:
    folder.mkdir(parents=True)
    config = {
        "init_from": init_from,
        "seed": steps,
        "tasks": {"passkey": 1.0},
        "answer_loss_weight": 5.0,
        "first_answer_loss_weight": 0.0,
        "copy_batch_size": 8,
        "copy_length": 16,
        "learning_rate": 1e-3,
        "min_lr_rate": 0.1,
        "curriculum": [{"until": 1.0, "min_length": 64, "max_length": max_length}],
        "model": {
            "num_attention_heads": 4,
            "num_key_value_heads": kv_heads,
            "hidden_size": 128,
            "num_hidden_layers": 2,
        },
    }
    meta = {
        "config": config,
        "steps": steps,
        "tokens_seen": 10 * steps,
        "wall_time_s": 60.0,
        "num_parameters": 1000,
        "command": f"recipes/train_tiny.py --run {steps}",
        "versions": {"torch": "t", "transformers": "x"},
    }
    (folder / "training_metadata.json").write_text(json.dumps(meta))


def _rows() -> list[dict]:
    cells = {("passkey", 512): 1.0, ("variable_tracking", 512): 0.4, ("passkey", 2048): 0.02}
    return [
        {
            "task": task,
            "length": length,
            "score": score,
            "accuracy": score,
            "num_questions": 50,
            "interval": list(eval_tiny.wilson_interval(score, 50)),
        }
        for (task, length), score in cells.items()
    ]


def test_card_names_every_run_in_order_and_derives_the_summary(tmp_path):
    _run(tmp_path / "base", "", 100, kv_heads=4, max_length=256)
    _run(tmp_path / "stage", str(tmp_path / "base"), 40, kv_heads=4, max_length=512)
    assert [m["steps"] for m in eval_tiny.training_lineage(tmp_path / "stage")] == [100, 40]
    result = {"num_samples": 50, "seed": 1, "rows": _rows()}
    card = tmp_path / "README.md"
    eval_tiny.write_card(card, tmp_path / "stage", result, "python recipes/eval_tiny.py")
    text = card.read_text()
    assert "(MHA," in text and "GQA" not in text and "trained from scratch" in text
    assert text.index("--run 100") < text.index("--run 40") and "1,400 tokens in 2 run(s)" in text
    assert "At 512 tokens it scores at least 90% on passkey." in text
    assert "Below 90% at 512 tokens: variable_tracking (40%)." in text
    assert "Beyond its training length (512 tokens) no task scores above 2%" in text
    assert "| variable_tracking | 40 (28–54) |  |" in text  # each score with its 95% Wilson interval


def test_card_refuses_a_folder_without_training_metadata(tmp_path):
    with pytest.raises(ValueError, match="training_metadata.json"):
        eval_tiny.write_card(tmp_path / "README.md", tmp_path, {"num_samples": 1, "seed": 0, "rows": []}, "cmd")
