"""recipes/train_memory_model.py: trains any registered causal LM on recall tasks, evaluates, saves, publishes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "recipes") not in sys.path:  # recipes import their shared _config module
    sys.path.insert(0, str(ROOT / "recipes"))
_spec = importlib.util.spec_from_file_location("train_memory_model", ROOT / "recipes" / "train_memory_model.py")
recipe = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("train_memory_model", recipe)
_spec.loader.exec_module(recipe)

TINY_MISTRAL = {
    "model_type": "mistral",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "sliding_window": 8,
}


def _config(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 3,
        "batch_size": 2,
        "seq_length": 48,
        "warmup_steps": 1,
        "log_every": 1,
        "model": TINY_MISTRAL,
        "tasks": {"mqar": {"weight": 1, "num_pairs": [2, 3]}},
        "eval": {"num_samples": 4, "batch_size": 2, "tasks": [{"task": "mqar", "length": 48, "num_pairs": 3}]},
    }
    values.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return recipe.parse_config(["--config", str(path)])


def test_recipe_trains_evaluates_saves_and_publishes(tmp_path):
    from transformers import AutoModelForCausalLM

    config = _config(tmp_path, publish={"repo_id": "me/tiny-swa", "local_root": str(tmp_path / "hub")})
    results = recipe.train(config)
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    assert saved["rows"] == results["rows"] and len(saved["history"]) == 3
    (row,) = saved["rows"]
    assert row["task"] == "mqar" and row["context_length"] == 48 and 0.0 <= row["accuracy"] <= 1.0
    assert saved["meta"]["model_type"] == "mistral" and saved["meta"]["training_steps"] == 3
    assert type(AutoModelForCausalLM.from_pretrained(run)).__name__ == "MistralForCausalLM"
    card = (tmp_path / "hub" / "me" / "tiny-swa" / "README.md").read_text()
    assert "## Measured results" in card and "| mqar |" in card and "training_data" in card


def test_eval_only_reevaluates_the_saved_checkpoint(tmp_path):
    config = _config(tmp_path, tasks={"mqar": {"num_pairs": 2, "length": [16, 24], "query_placement": "spread"}})
    trained = recipe.train(config)
    assert trained["meta"]["training_tokens"] in range(3 * 2 * 16, 3 * 2 * 24 + 1)  # counted over the length mixture
    spec = {"task": "mqar", "length": 40, "num_pairs": 3, "num_queries": 1}
    again = _config(tmp_path, eval={"num_samples": 6, "batch_size": 3, "tasks": [spec]}, eval_only=True)
    results = recipe.train(again)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    (row,) = saved["rows"]
    assert (
        row["context_length"] == 40 and row["num_samples"] == 6 and row["options"] == {"num_pairs": 3, "num_queries": 1}
    )
    assert (
        saved["history"] == trained["history"] and "eval_command" in saved["meta"] and results["rows"] == saved["rows"]
    )


def test_cli_overrides_and_bad_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": TINY_MISTRAL, "max_steps": 5}))
    config = recipe.parse_config(["--config", str(path), "--max_steps", "7", "--learning_rate", "1e-4"])
    assert config.max_steps == 7 and config.learning_rate == 1e-4
    path.write_text(yaml.safe_dump({"model": TINY_MISTRAL, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        recipe.parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="model_type"):
        _config(tmp_path, model={"hidden_size": 8})
    with pytest.raises(ValueError, match="tasks"):
        _config(tmp_path, tasks={"nope": {}})
    with pytest.raises(ValueError, match="not a registered"):
        recipe.build_model({"model_type": "no_such_arch"}, None, 0)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("memory_*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(path):
    config = recipe.parse_config(["--config", str(path)])
    assert config.model["model_type"] and config.eval["tasks"]


def test_long_sequence_options_train_the_same_model(tmp_path):
    """Checkpointing + offload + chunked CE: the same gradients, so the same losses step after step (float32
    summation order of the chunked head only: ~1e-6 per step, compounded over 3 Adam steps)."""
    common = dict(save_checkpoint=False, eval={})
    for name in ("plain", "optimised", "bad", "bad2"):
        (tmp_path / name).mkdir()
    plain = recipe.train(_config(tmp_path / "plain", **common))
    options = dict(activation_checkpointing=True, activation_offload=True, chunked_ce=5)
    optimised = recipe.train(_config(tmp_path / "optimised", **common, **options))
    assert [row["loss"] for row in optimised["history"]] == pytest.approx(
        [row["loss"] for row in plain["history"]], abs=1e-4
    )
    with pytest.raises(ValueError, match="chunked_ce"):
        _config(tmp_path / "bad", chunked_ce=-3)
    with pytest.raises(ValueError, match="activation_offload"):
        _config(tmp_path / "bad2", activation_offload="sometimes")


def test_two_process_ddp_follows_the_one_process_lr_schedule(tmp_path):
    """Every process runs all ``max_steps`` steps, so the cosine schedule must advance once per step, not once per
    process per step (what accelerate does to a scheduler passed through ``prepare``): the logged learning rates of a
    two-process gloo DDP run equal the schedule's own values at every step."""
    import os
    import subprocess

    import torch
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not built in")
    steps = 5
    values = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": steps,
        "batch_size": 2,
        "seq_length": 32,
        "warmup_steps": 1,
        "log_every": 1,
        "save_checkpoint": False,
        "model": TINY_MISTRAL,
        "tasks": {"mqar": {"weight": 1, "num_pairs": [2]}},
        "eval": {},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(ROOT / "recipes/configs/accelerate/ddp.yaml"), "--num_processes", "2"]
    command += [str(ROOT / "recipes/train_memory_model.py"), "--config", str(tmp_path / "config.yaml")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    history = json.loads((tmp_path / "run" / "results.json").read_text())["history"]
    config = recipe.parse_config(["--config", str(tmp_path / "config.yaml")])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_rate
    )
    expected = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        expected.append(schedule.get_last_lr()[0])
    assert [row["step"] for row in history] == list(range(1, steps + 1))
    assert [row["lr"] for row in history] == pytest.approx(expected, rel=1e-12)
