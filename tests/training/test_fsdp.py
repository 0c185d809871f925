"""accelerate's FSDP plugin on CPU: the recipes under two gloo processes with FSDP2 (parameters, gradients and
optimizer state sharded) reach the losses and weights of one process on the same global batch (the fine-tune of every
weight in ``recipes/train_longgen.py``; a frozen backbone with LongMem's SideNet, HCAM's branches, HMT's memory and
LoRA adapters in ``train_longmem.py``, ``train_hcam.py``, ``train_hmt.py``; Titans trained from scratch in
``train_memory_model.py``; CMT's compressor in ``train_cmt.py``); ``train_tiny.py`` and the continual recipes, whose
processes draw their own data, give DDP's run under FSDP and resume from a sharded run's checkpoints; the continual
trainer refuses sharded engines naming the strategies that read whole parameters.

Tolerance (float32, eps = 1.19e-7): the two runs differ only in summation order (two half-batch gradients
reduce-scattered over gloo vs one whole-batch gradient), a relative error of a few eps per gradient entry. AdamW maps
a gradient with relative error d to an update with relative error <= 2d (for |g| >> eps_adam), so after 3 steps of
lr <= 2e-3 the weights differ by <= 3 * 2e-3 * 2 * few eps (~1e-8) plus one rounding of |w| <= 2 (2.4e-7): weights
are compared at 1e-5 and the logged losses (rounded to 6 decimals, +-5e-7 each) at 1e-5 relative + 1e-6.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from hf_longmem.training.distributed import build_accelerator, is_sharded
from tests.continual.util import TINY_MODEL, make_trainer

ROOT = Path(__file__).resolve().parents[2]
FSDP2_CONFIG = ROOT / "recipes" / "configs" / "accelerate" / "fsdp2.yaml"

LONGGEN = {
    "seed": 0,
    "num_threads": 1,
    "max_steps": 3,
    "min_length": 128,
    "max_length": 128,
    "learning_rate": 1.0e-3,
    "warmup_steps": 1,
    "grad_clip": 1.0,
    "log_every": 1,
    "eval_num_samples": 0,
    "eval_base": 0,
    "longgen": {"full_layers": [1, 2], "sparse": "sink_window", "sink_size": 4, "window": 32},
}
LONGMEM = {
    "seed": 0,
    "num_threads": 1,
    "max_steps": 3,
    "min_length": 256,
    "max_length": 256,
    "learning_rate": 1.0e-3,
    "warmup_steps": 1,
    "log_every": 1,
    "eval_num_samples": 0,
    "longmem": {
        "segment_length": 128,
        "chunk_size": 4,
        "memory_size": 1024,
        "topk_chunks": 4,
        "layer_reduction_factor": 1,
        "memory_layer_index": 1,
        "sidenet_init": "zero_output",
    },
    "tasks": {"passkey": 1.0},
    "eval": {"backbone": False},
}

HCAM = {
    **{k: v for k, v in LONGMEM.items() if k != "longmem"},
    "hcam": {
        "segment_length": 128,
        "chunk_size": 16,
        "topk_chunks": 2,
        "memory_size": 1024,
        "memory_layers": [1, 2],
        "gate_init": 0.5,
        "branch_init": "attention",
    },
}

HMT = {
    "seed": 0,
    "num_threads": 1,
    "max_steps": 3,
    "min_length": 320,
    "max_length": 320,
    "learning_rate": 1.0e-3,
    "warmup_steps": 1,
    "log_every": 1,
    "eval_num_samples": 0,
    "eval_backbone": False,
    "hmt": {"segment_length": 128, "sensory_length": 8, "num_memories": 10, "lora_rank": 4, "lora_alpha": 8},
    "tasks": {"passkey": 1.0},
}

TITANS = {
    "seed": 0,
    "num_threads": 1,
    "max_steps": 3,
    "seq_length": 33,
    "learning_rate": 1.0e-3,
    "warmup_steps": 1,
    "log_every": 1,
    "eval": {"num_samples": 4, "batch_size": 4, "tasks": [{"task": "mqar", "length": 33, "num_pairs": 4}]},
    "model": {
        "model_type": "titans",
        "variant": "mag",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": 16,
        "sliding_window": 8,
        "num_persistent_tokens": 2,
        "memory_heads": 2,
        "memory_head_dim": 16,
        "memory_depth": 2,
        "memory_expansion": 2,
        "memory_chunk_size": 8,
        "tie_word_embeddings": True,
    },
    "tasks": {"mqar": {"weight": 1.0, "num_pairs": 4, "length": 33}},
}

CMT = {
    **yaml.safe_load((ROOT / "recipes" / "configs" / "cmt.yaml").read_text()),
    "max_steps": 3,
    "eval_num_samples": 0,
    "train_max_length": 384,
    "log_every": 1,
}


class Recipe(NamedTuple):
    config: dict  # the tiny config
    options: list[str]  # command-line options of both runs
    batch_option: str  # the per-process batch size option
    one: int  # its value for one process
    two: int  # its value for each of two processes
    results_option: bool = True  # the recipe takes --results (the others write results.json into output_dir)


RECIPES = {
    "train_longgen": Recipe(LONGGEN, ["--min_length", "128", "--max_length", "128"], "tokens_per_batch", 512, 256),
    "train_longmem": Recipe(LONGMEM, [], "tokens_per_batch", 512, 256),
    "train_hcam": Recipe(HCAM, [], "tokens_per_batch", 512, 256),
    "train_hmt": Recipe(HMT, [], "tokens_per_batch", 640, 320),
    # Titans (MAG), its memory updated inside the forward
    "train_memory_model": Recipe(TITANS, [], "batch_size", 4, 2, results_option=False),
    # CMT's step is its memory_training_loss, run as the forward of MemoryTrainingStep. Its QA loss is a token mean
    # per process, so the two runs agree because the two samples' answers have as many tokens (5-digit pass keys)
    "train_cmt": Recipe(CMT, [], "batch_size", 2, 1, results_option=False),
}
#: Parameters whose gradient is zero in exact arithmetic: an attention key bias adds the same ``q . b`` to every
#: logit of a query, which the softmax cancels. Their float gradient is rounding noise, which AdamW's update
#: ``lr * m / sqrt(v)`` turns into steps of at most ``lr / sqrt(1 - b1^2 / b2)`` (2.4 lr for the recipes' betas
#: 0.9, 0.98) whatever its scale, so the two runs' values differ by up to twice that per step: compared at
#: ``5 * sum(lr)`` instead (the logged rates, one step ahead, bound the ones used).
ZERO_GRADIENT = re.compile(r"branches\.\d+\.key\.bias$")


def _fsdp2_on_gloo_available() -> str | None:
    """Why this platform cannot run the two-process FSDP2 test (``None`` if it can)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not built in"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]


def _record(folder: Path) -> tuple[dict, int, list[dict]]:
    """``(distributed, tokens or samples seen, history)`` of a run (``train_memory_model.py`` and ``train_cmt.py``
    keep them in results.json)."""
    if (folder / "training_metadata.json").is_file():
        meta = json.loads((folder / "training_metadata.json").read_text())
        return meta["distributed"], meta["tokens_seen"], meta["history"]
    results = json.loads((folder / "results.json").read_text())
    if "training" in results["meta"]:  # train_cmt.py
        training = results["meta"]["training"]
        return training["distributed"], training["samples_seen"], training["history"]
    return results["meta"]["distributed"], results["meta"]["training_tokens"], results["history"]


@pytest.mark.skipif(_fsdp2_on_gloo_available() is not None, reason=str(_fsdp2_on_gloo_available()))
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_under_fsdp2_with_two_processes_matches_one(tmp_path, recipe):
    spec = RECIPES[recipe]
    script = ROOT / "recipes" / f"{recipe}.py"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(spec.config))
    one, two = tmp_path / "one", tmp_path / "two"

    # the same global batch: one process with all of it, or two with half each
    def options_for(folder: Path, batch: int) -> list[str]:
        found = ["--config", str(config), *spec.options, f"--{spec.batch_option}", str(batch), "--output_dir"]
        found.append(str(folder))
        return [*found, "--results", str(folder / "r.json")] if spec.results_option else found

    _run([sys.executable, str(script), *options_for(one, spec.one)], ROOT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CONFIG)]
    _run([*launch, "--num_processes", "2", "--main_process_port", "0", str(script), *options_for(two, spec.two)], ROOT)

    (engine_one, seen_one, history_one), (engine_two, seen_two, history_two) = _record(one), _record(two)
    assert engine_one == {"type": "NO", "num_processes": 1}
    assert engine_two == {"type": "FSDP", "num_processes": 2}
    assert seen_one == seen_two > 0  # the same samples in both runs
    a, b = [row["loss"] for row in history_one], [row["loss"] for row in history_two]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x) + 1e-6, (a, b)
    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert sorted(first) == sorted(second)
    noise = 5 * sum(row["lr"] for row in history_one)
    for name, tensor in first.items():
        atol = noise if ZERO_GRADIENT.search(name) else 1e-5
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=atol, msg=name)


@pytest.fixture
def fsdp_state():
    """A single-process accelerator whose state says FSDP (what `build_accelerator` sets up under the plugin)."""
    accelerator = Accelerator(cpu=True)
    saved = accelerator.state.distributed_type, PartialState._shared_state.get("distributed_type")
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    try:
        yield accelerator
    finally:
        accelerator.state.distributed_type = saved[0]
        PartialState._shared_state["distributed_type"] = saved[1]


@pytest.mark.parametrize("strategy", ["migu", "subspace", "kfpf", "ewc"])
def test_continual_trainer_refuses_fsdp_naming_strategy(fsdp_state, strategy):
    from hf_longmem.continual import build_strategy

    assert is_sharded(fsdp_state)
    with pytest.raises(ValueError, match=rf"FSDP.*\['{strategy}'\].*ddp\.yaml"):
        make_trainer([build_strategy({"name": strategy})])


CONTINUAL = {
    "num_threads": 1,
    "model": {"config": TINY_MODEL},
    "tasks": {"num_tasks": 3, "facts_per_task": 5, "num_digits": 2},
    "train": {"steps_per_task": 2, "batch_size": 2, "learning_rate": 1.0e-2, "eval_every": 1, "checkpoint_every": 3},
    "strategies": [{"name": "replay", "ratio": 0.25, "source": "reservoir", "buffer_size": 6}],
}


@pytest.mark.skipif(_fsdp2_on_gloo_available() is not None, reason=str(_fsdp2_on_gloo_available()))
def test_continual_recipe_under_fsdp2_equals_ddp_and_resumes(tmp_path):
    """``recipes/continual_finetune.py`` (replay) with two processes: FSDP2 gives DDP's losses, evaluation matrices
    and final weights (both average the two processes' gradients; 5 evaluation examples split 3 / 2 over the
    processes, the second one padding its forwards); killed after 4 steps and resumed from its step-3 checkpoint
    (accelerate's ``save_state`` / ``load_state`` of the shards), it ends where the uninterrupted run ends."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONTINUAL))
    script = str(ROOT / "recipes" / "continual_finetune.py")

    def launch(engine: str, folder: Path, *extra: str) -> None:
        config_file = str(ROOT / "recipes" / "configs" / "accelerate" / f"{engine}.yaml")
        _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--num_processes",
              "2", "--main_process_port", "0", script, "--config", str(config), "--output_dir", str(folder),
              *extra], ROOT)  # fmt: skip

    launch("ddp", tmp_path / "ddp")
    launch("fsdp2", tmp_path / "fsdp", "--stop_after_steps", "4")
    assert not (tmp_path / "fsdp" / "results.json").exists()
    launch("fsdp2", tmp_path / "fsdp", "--resume")
    ddp, fsdp = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ddp", "fsdp"))
    assert ddp["meta"]["replicas_in_sync"] is True and fsdp["meta"]["replicas_in_sync"] is None  # one sharded copy
    a, b = [row["loss"] for row in ddp["train_log"]], [row["loss"] for row in fsdp["train_log"]]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):  # logged to 5 decimals
        assert abs(x - y) <= 1e-5 * abs(x) + 1e-5, (a, b)
    assert fsdp["accuracy_matrix"] == ddp["accuracy_matrix"]
    torch.testing.assert_close(torch.tensor(fsdp["loss_matrix"]), torch.tensor(ddp["loss_matrix"]), rtol=1e-5, atol=0)
    first = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    second = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    assert sorted(first) == sorted(second)
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_build_accelerator_refuses_fsdp1_on_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("FSDP1 runs on GPUs")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1 cannot run on CPU.*fsdp2.yaml"):
        build_accelerator()


def test_continual_lora_run_refuses_fsdp_before_training(fsdp_state, tmp_path):
    from hf_longmem.continual.recipe import run

    config = {**CONTINUAL, "output_dir": str(tmp_path / "run"), "peft": {"r": 4, "target_modules": ["q_proj"]}}
    with pytest.raises(ValueError, match="LoRA.*FSDP.*ddp.yaml"):
        run(config, loss_on="answer", accelerator=fsdp_state)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(_fsdp2_on_gloo_available() is not None, reason=str(_fsdp2_on_gloo_available()))
def test_train_tiny_under_fsdp2_equals_ddp_and_resumes_from_its_checkpoint(tmp_path):
    """``recipes/train_tiny.py`` draws each process's batches from its own seeds, so two FSDP processes train what two
    DDP processes train (both average the gradients): the same final weights. A sharded run's checkpoint holds the
    whole weights and the optimizer's whole state by parameter name; resumed from step 2 of 4, the run ends with
    the weights of the uninterrupted sharded run."""
    config = yaml.safe_load((ROOT / "recipes" / "configs" / "train_tiny.yaml").read_text())
    config["model"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config.update(
        tokens_per_batch=256,
        curriculum=[{"until": 1.0, "min_length": 64, "max_length": 96}],
        max_steps=4,
        num_threads=1,
        save_every=0,
        log_every=1,
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))

    def launch(engine: str, folder: Path, *extra: str) -> None:
        config_file = str(ROOT / "recipes" / "configs" / "accelerate" / f"{engine}.yaml")
        _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--num_processes",
              "2", "--main_process_port", "0", str(ROOT / "recipes" / "train_tiny.py"), "--config", str(path),
              "--output_dir", str(folder), *extra], ROOT)  # fmt: skip

    launch("ddp", tmp_path / "ddp")
    launch("fsdp2", tmp_path / "fsdp", "--checkpoint_every", "2")
    whole = load_file(tmp_path / "fsdp" / "model.safetensors")
    meta = json.loads((tmp_path / "fsdp" / "training_metadata.json").read_text())
    assert meta["distributed"] == {"type": "FSDP", "num_processes": 2} and meta["steps"] == 4
    ddp = load_file(tmp_path / "ddp" / "model.safetensors")
    assert sorted(ddp) == sorted(whole)
    for name, tensor in ddp.items():
        torch.testing.assert_close(whole[name], tensor, rtol=0, atol=1e-5, msg=name)
    checkpoints = tmp_path / "fsdp" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000000002", "step-000000004"]
    shutil.rmtree(checkpoints / "step-000000004")  # as if the run had been stopped after step 2
    (tmp_path / "fsdp" / "model.safetensors").unlink()
    launch("fsdp2", tmp_path / "fsdp", "--checkpoint_every", "2", "--resume", "auto")
    resumed = load_file(tmp_path / "fsdp" / "model.safetensors")
    for name, tensor in whole.items():  # the same arithmetic in the same order
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_global_share_splits_a_global_batch_contiguously_and_refuses_uneven_ones():
    from types import SimpleNamespace

    from hf_longmem.training.distributed import any_process, global_share

    shares = [global_share(list(range(6)), SimpleNamespace(num_processes=3, process_index=i)) for i in range(3)]
    assert shares == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="7 samples does not split over 3 processes"):
        global_share(list(range(7)), SimpleNamespace(num_processes=3, process_index=0))
    alone = SimpleNamespace(num_processes=1)
    assert any_process(True, alone) is True and any_process(False, alone) is False
