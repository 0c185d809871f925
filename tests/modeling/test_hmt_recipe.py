"""recipes/train_hmt.py end to end at a tiny scale: train HMT on the embedded model, evaluate it against the backbone,
write harness JSON, publish with the model card through ``LocalFolderApi`` (offline) and reload the published repo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from hf_longmem.hub import load_harness_results
from hf_longmem.modeling.hmt import HMTForCausalLM

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
CONFIG = RECIPE_DIR / "configs" / "hmt_tiny.yaml"


@pytest.fixture(scope="module")
def recipe():
    sys.path.insert(0, str(RECIPE_DIR))
    try:
        import train_hmt
    finally:
        sys.path.remove(str(RECIPE_DIR))
    return train_hmt


def test_shipped_config_parses(recipe):
    config, args = recipe.parse_args(["--config", str(CONFIG), "--max_steps", "7"])
    assert config.max_steps == 7 and args.publish is None
    assert config.hmt["segment_length"] < 1024 and max(config.eval_lengths) >= 4096
    with pytest.raises(ValueError, match="min_length"):
        recipe.parse_args(["--config", str(CONFIG), "--min_length", "2000"])


def test_weighted_loss_counts_answers_and_prompt(recipe):
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 4] = 10.0
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4]]),
        "loss_weights": torch.tensor([[1.0, 1.0, 5.0]]),
        "answer_mask": torch.tensor([[False, False, True]]),
    }
    loss, exact = recipe.weighted_loss(logits, batch, answer_weight=1.0, prompt_weight=0.0)
    assert exact.tolist() == [True] and loss.item() < 1e-3
    batch["input_ids"] = torch.tensor([[1, 2, 3, 0]])  # wrong answer token
    loss, exact = recipe.weighted_loss(logits, batch, answer_weight=1.0, prompt_weight=0.0)
    assert exact.tolist() == [False] and loss.item() > 5


def test_weighted_loss_chunked_equals_logits(recipe):
    """``chunked_ce``: the loss from hidden states + head equals the loss from logits (float32 matmul order only)."""
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 9, 8), torch.nn.Linear(8, 11)
    batch = {
        "input_ids": torch.randint(0, 11, (2, 9)),
        "loss_weights": torch.rand(2, 8),
        "answer_mask": torch.rand(2, 8) > 0.5,
    }
    loss, exact = recipe.weighted_loss(head(hidden), batch, 2.0, 0.5)
    chunked, chunked_exact = recipe.weighted_loss(hidden, batch, 2.0, 0.5, head, 3)
    torch.testing.assert_close(chunked, loss, atol=1e-6, rtol=0)
    assert torch.equal(chunked_exact, exact)
    with pytest.raises(ValueError, match="chunked_ce"):
        recipe.parse_args(["--config", str(CONFIG), "--chunked_ce", "-1"])


def test_tiny_run_evaluates_and_publishes_offline(recipe, tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config.update(
        output_dir=str(tmp_path / "model"),
        results=str(tmp_path / "results.json"),
        max_steps=2,
        max_train_seconds=0,
        tokens_per_batch=400,
        min_length=160,
        max_length=192,
        log_every=1,
        eval_lengths=[200],
        eval_num_samples=1,
    )
    config["hmt"].update(segment_length=64, sensory_length=8, lora_rank=2, num_memory_tokens=2)
    config["eval_tasks"] = [{"label": "passkey_1digit", "task": "passkey", "options": {"num_digits": 1}}, "passkey"]
    path = tmp_path / "hmt.yaml"
    path.write_text(yaml.safe_dump(config))
    results = recipe.main(["--config", str(path), "--publish", "me/hmt-tiny", "--publish_root", str(tmp_path / "hub")])

    rows = load_harness_results(tmp_path / "results.json").rows
    assert {(r["task"], r["cache"], r["context_length"]) for r in rows} == {
        (task, cache, 200) for task in ("passkey_1digit", "passkey") for cache in ("hmt", "none")
    }
    assert all(r["num_samples"] == 1 and 0 <= r["first_token_accuracy"] <= 1 for r in rows)
    assert "| passkey_1digit | HMT (trained memory) |" in recipe.markdown_table(rows)
    assert results["meta"]["train_steps"] == 2 and results["meta"]["trainable_parameters"] > 0
    metadata = json.loads((tmp_path / "model" / "training_metadata.json").read_text())
    assert metadata["trainable_parameters"] < sum(
        p.numel() for p in HMTForCausalLM.from_pretrained(tmp_path / "model").parameters()
    )

    repo = tmp_path / "hub" / "me" / "hmt-tiny"
    card = (repo / "README.md").read_text()
    assert "HMT" in card and "| passkey |" in card and "trust_remote_code=True" in card
    assert json.loads((repo / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].endswith("HMTForCausalLM")
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    assert isinstance(model, HMTForCausalLM) and model.config.lora_rank == 2
    out = model.generate(torch.tensor([[1, 20, 21, 22]]), max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 7)
