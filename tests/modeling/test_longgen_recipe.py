"""recipes/train_longgen.py end to end at a tiny scale: convert the embedded model, fine-tune two steps, evaluate it
against the base model with generate, write the results JSON and reload the saved LongGen model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_longmem.modeling.longgen import LongGenForCausalLM

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
CONFIG = RECIPE_DIR / "configs" / "longgen_tiny.yaml"


@pytest.fixture(scope="module")
def recipe():
    sys.path.insert(0, str(RECIPE_DIR))
    try:
        import train_longgen
    finally:
        sys.path.remove(str(RECIPE_DIR))
    return train_longgen


def test_shipped_config_parses(recipe):
    config, _ = recipe.parse_args(["--config", str(CONFIG), "--max_steps", "7"])
    assert config.max_steps == 7 and config.min_length == config.max_length == 2048
    assert config.longgen["full_layers"] == [1, 2] and config.longgen["window"] == 256
    with pytest.raises(ValueError, match="min_length"):
        recipe.parse_args(["--config", str(CONFIG), "--min_length", "4000"])


def test_tiny_run_trains_evaluates_and_reloads(recipe, tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config.update(
        output_dir=str(tmp_path / "model"),
        results=str(tmp_path / "results.json"),
        max_steps=2,
        tokens_per_batch=192,
        min_length=96,
        max_length=96,
        log_every=1,
        eval_lengths=[128],
        eval_num_samples=1,
    )
    config["longgen"].update(window=32)
    path = tmp_path / "longgen.yaml"
    path.write_text(yaml.safe_dump(config))
    results = recipe.main(["--config", str(path)])

    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["model"], r["context_length"]) for r in rows} == {("longgen", 128), ("base", 128)}
    longgen_row = next(r for r in rows if r["model"] == "longgen")
    # 2 full layers hold every token, 2 sink-window layers 4 + 31: the prompt is ~128 tokens
    assert 0.5 < longgen_row["kv_bytes_vs_full"] < 0.5 + 35 / 128
    assert results["meta"]["train_steps"] == 2 and results["meta"]["longgen"]["window"] == 32
    assert "| passkey | longgen |" in recipe.markdown_table(rows)
    model = LongGenForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.full_layers == [1, 2]
    out = model.generate(torch.tensor([[1, 20, 21, 22]]), max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 7)
