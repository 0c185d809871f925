"""recipes/train_cmt.py: a few steps on the embedded model, its results JSON, and the offline publish path."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_longmem.evals.vocab import build_tokenizer
from hf_longmem.hub import load_harness_results

ROOT = Path(__file__).resolve().parents[2]


def _recipe():
    if str(ROOT / "recipes") not in sys.path:  # recipes import their shared _config module
        sys.path.insert(0, str(ROOT / "recipes"))
    spec = importlib.util.spec_from_file_location("train_cmt", ROOT / "recipes" / "train_cmt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_cmt"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_make_batch_marks_the_answer_document():
    recipe = _recipe()
    tokenizer = build_tokenizer()
    from hf_longmem.evals.tasks import passkey

    samples = passkey(tokenizer, 400, 2, seed=3)
    batch = recipe.make_batch(samples, tokenizer, max_document_tokens=64)
    assert batch["document_ids"].shape[1] <= 64 and batch["document_owner"].tolist() == sorted(batch["document_owner"])
    for row, sample in enumerate(samples):
        gold = batch["gold_document"][row].item()
        assert batch["document_owner"][gold] == row
        assert sample.turns[0].answers[0] in tokenizer.decode(batch["document_ids"][gold], skip_special_tokens=True)
        labels = batch["qa_labels"][row]
        answer = tokenizer.decode(labels[labels >= 0], skip_special_tokens=True).strip()
        assert answer == sample.turns[0].answers[0]


def test_recipe_trains_evaluates_and_publishes_offline(tmp_path):
    recipe = _recipe()
    output = tmp_path / "run"
    argv = [
        "--config",
        str(ROOT / "recipes/configs/cmt.yaml"),
        "--max_steps",
        "2",
        "--batch_size",
        "2",
        "--eval_num_samples",
        "1",
        "--eval_lengths",
        "384",
        "--train_max_length",
        "384",
        "--output_dir",
        str(output),
        "--publish",
        "me/tiny-cmt",
        "--publish_folder",
        str(tmp_path / "hub"),
    ]
    result = recipe.main(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    assert {row["cache"] for row in result["rows"]} == {"cmt", "full"}
    assert result["meta"]["training"]["steps"] == 2 and result["meta"]["training"]["train_wall_time_s"] > 0
    saved = json.loads((output / "results.json").read_text())
    assert load_harness_results(saved).rows[0]["context_length"] == 384
    repo = tmp_path / "hub" / "me" / "tiny-cmt"
    config = json.loads((repo / "config.json").read_text())
    assert config["model_type"] == "cmt" and "AutoModelForCausalLM" in config["auto_map"]
    card = (repo / "README.md").read_text()
    assert "CMT" in card and "passkey" in card and "hf-longmem" in card
    assert "class " not in (repo / "modeling_cmt.py").read_text()  # a thin shim
    assert not (repo / "cmt_memory_bank.safetensors").exists()  # the evaluation's memories are not published
    loaded = AutoModelForCausalLM.from_pretrained(repo)
    trained = AutoModelForCausalLM.from_pretrained(output)
    for name, tensor in trained.compressor.state_dict().items():
        torch.testing.assert_close(loaded.compressor.state_dict()[name], tensor)


def test_recipe_rejects_bad_config(tmp_path):
    recipe = _recipe()
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 1\nnot_a_key: 3\n")
    with pytest.raises(ValueError, match="not_a_key"):
        recipe.parse_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="train_min_length"):
        recipe.parse_args(["--train_min_length", "900", "--train_max_length", "100"])
