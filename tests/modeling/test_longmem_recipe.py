"""recipes/train_longmem.py end to end at toy sizes, and the publish path (offline, LocalFolderApi)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from hf_longmem.hub import LocalFolderApi, publish
from hf_longmem.modeling.longmem import LongMemForCausalLM
from tests.helpers.tiny_models import random_ids, tiny_model

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "longmem_tiny.yaml"


def _recipe():
    if str(ROOT / "recipes") not in sys.path:  # recipes import their shared _config module
        sys.path.insert(0, str(ROOT / "recipes"))
    spec = importlib.util.spec_from_file_location("train_longmem", ROOT / "recipes" / "train_longmem.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_longmem"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_shipped_config_parses():
    config, _ = _recipe().parse_args(["--config", str(CONFIG), "--max_steps", "5"])
    assert config.max_steps == 5 and config.longmem["memory_layer_index"] == 1
    assert config.eval["lengths"] == [4096, 8192] and config.eval["backbone"]


def test_weighted_loss_chunked_equals_logits():
    """``chunked_ce``: the loss from hidden states + head equals the loss from logits (float32 matmul order only)."""
    recipe = _recipe()
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 9, 8), torch.nn.Linear(8, 11, bias=False)
    batch = {
        "input_ids": torch.randint(0, 11, (2, 9)),
        "loss_weights": torch.rand(2, 8),
        "answer_mask": torch.rand(2, 8) > 0.5,
    }
    loss, exact = recipe.weighted_loss(head(hidden), batch)
    chunked, chunked_exact = recipe.weighted_loss(hidden, batch, head, 4)
    torch.testing.assert_close(chunked, loss, atol=1e-6, rtol=0)
    assert torch.equal(chunked_exact, exact)
    with pytest.raises(ValueError, match="chunked_ce"):
        recipe.parse_args(["--config", str(CONFIG), "--chunked_ce", "-2"])


def test_recipe_trains_evaluates_and_publishes(tmp_path):
    recipe = _recipe()
    args = [
        "--config",
        str(CONFIG),
        "--max_steps",
        "2",
        "--min_length",
        "192",
        "--max_length",
        "256",
        "--tokens_per_batch",
        "512",
        "--eval_num_samples",
        "2",
        "--output_dir",
        str(tmp_path / "run"),
        "--publish",
        "me/longmem-tiny",
        "--publish_root",
        str(tmp_path / "hub"),
    ]
    config_file = tmp_path / "config.yaml"
    overrides = {"lengths": [320], "tokens_per_batch": 2048, "untrained": True}
    raw = yaml.safe_load(CONFIG.read_text())
    raw["eval"].update(overrides)
    raw["longmem"].update(segment_length=128, memory_size=1024)
    config_file.write_text(yaml.safe_dump(raw))
    args[1] = str(config_file)
    results = recipe.main(args)
    models = {row["model"] for row in results["rows"]}
    assert len(models) == 3 and all(0.0 <= row["exact"] <= 1.0 for row in results["rows"])
    assert results["meta"]["train_steps"] == 2
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rows"] == results["rows"]
    repo = tmp_path / "hub" / "me" / "longmem-tiny"
    card = (repo / "README.md").read_text()
    assert "longmem" in card and "trust_remote_code=True" in card
    loaded = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    assert isinstance(loaded, LongMemForCausalLM) and loaded.config.segment_length == 128


def test_publish_round_trip_with_local_folder_api(tmp_path):
    backbone = tiny_model("llama_gqa", num_hidden_layers=2)
    model = LongMemForCausalLM.from_backbone(
        backbone,
        segment_length=16,
        chunk_size=4,
        memory_size=64,
        topk_chunks=2,
        layer_reduction_factor=1,
        sidenet_init="copy",
    ).eval()
    rows = [{"task": "passkey", "cache": "longmem", "context_length": 4096, "accuracy": 0.5, "num_samples": 2}]
    path = publish(
        model, "me/longmem", eval_results={"rows": rows}, template="architecture", api=LocalFolderApi(tmp_path)
    )
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = random_ids(1, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_longmem.LongMemForCausalLM"
    assert config["model_type"] == "longmem" and "passkey" in (Path(path) / "README.md").read_text()
