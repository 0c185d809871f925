"""recipes/train_hcam.py end to end at toy sizes: trains only the branches, saves, reloads, evaluates."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from hf_longmem.modeling.hcam import HCAMForCausalLM

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "hcam_tiny.yaml"


def _recipe():
    if str(ROOT / "recipes") not in sys.path:  # recipes import their shared modules (_config, train_longmem)
        sys.path.insert(0, str(ROOT / "recipes"))
    spec = importlib.util.spec_from_file_location("train_hcam", ROOT / "recipes" / "train_hcam.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_hcam"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_shipped_config_parses_and_refuses_longmem_fields():
    recipe = _recipe()
    config, _ = recipe.parse_args(["--config", str(CONFIG), "--max_steps", "5"])
    assert config.max_steps == 5 and config.hcam["memory_layers"] == [1, 2, 3]
    assert config.eval["lengths"] == [4096] and config.eval["backbone"]
    with pytest.raises(ValueError, match="min_length"):
        recipe.parse_args(["--config", str(CONFIG), "--min_length", "0"])


def test_recipe_trains_saves_and_evaluates(tmp_path):
    raw = yaml.safe_load(CONFIG.read_text())
    raw["eval"].update(lengths=[320], tokens_per_batch=2048, untrained=True)
    raw["hcam"].update(segment_length=128, memory_size=1024)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    args = ["--config", str(config_file), "--max_steps", "2", "--min_length", "192", "--max_length", "256"]
    args += ["--tokens_per_batch", "512", "--eval_num_samples", "2", "--output_dir", str(tmp_path / "run")]
    results = _recipe().main(args)
    assert {row["model"] for row in results["rows"]} == {
        "hcam (trained branches)",
        "hcam untrained (= backbone per segment)",
        "backbone alone (full context)",
    }
    assert all(0.0 <= row["exact"] <= 1.0 for row in results["rows"]) and results["meta"]["train_steps"] == 2
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rows"] == results["rows"]
    loaded = HCAMForCausalLM.from_pretrained(tmp_path / "run")
    assert loaded.config.segment_length == 128 and loaded.trainable_parameter_count() == sum(
        p.numel() for p in loaded.model.branches.parameters()
    )
    assert any(float(branch.gate.detach().abs()) > 0 for branch in loaded.model.branches)  # the gates moved
