"""accelerate's FSDP plugin on CPU: ``recipes/train_longgen.py`` under two gloo processes with FSDP2 (parameters,
gradients and optimizer state sharded) reaches the losses and weights of one process on the same global batch; the
continual trainer refuses sharded engines naming the strategies that read whole parameters.

Tolerance (float32, eps = 1.19e-7): the two runs differ only in summation order (two half-batch gradients
reduce-scattered over gloo vs one whole-batch gradient), a relative error of a few eps per gradient entry. AdamW maps
a gradient with relative error d to an update with relative error <= 2d (for |g| >> eps_adam), so after 3 steps of
lr <= 1e-3 the weights differ by <= 3 * 1e-3 * 2 * few eps (~1e-9) plus one rounding of |w| <= 2 (2.4e-7): weights
are compared at 1e-5 and the logged losses (rounded to 6 decimals, +-5e-7 each) at 1e-5 relative + 1e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from hf_longmem.training.distributed import build_accelerator, is_sharded
from tests.continual.util import make_trainer

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "train_longgen.py"
FSDP2_CONFIG = ROOT / "recipes" / "configs" / "accelerate" / "fsdp2.yaml"

TINY = {
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


def _losses(folder: Path) -> list[float]:
    return [row["loss"] for row in json.loads((folder / "training_metadata.json").read_text())["history"]]


@pytest.mark.skipif(_fsdp2_on_gloo_available() is not None, reason=str(_fsdp2_on_gloo_available()))
def test_longgen_recipe_fsdp2_two_processes_matches_one(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    one, two = tmp_path / "one", tmp_path / "two"
    # the same global batch: 4 samples of 128 tokens, in one process or 2 per process
    common = ["--config", str(config), "--min_length", "128", "--max_length", "128"]
    _run([sys.executable, str(RECIPE), *common, "--tokens_per_batch", "512", "--output_dir", str(one),
          "--results", str(one / "r.json")], ROOT)  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CONFIG)]
    _run([*launch, "--num_processes", "2", "--main_process_port", "0", str(RECIPE), *common, "--tokens_per_batch",
          "256", "--output_dir", str(two), "--results", str(two / "r.json")], ROOT)  # fmt: skip

    meta = [json.loads((d / "training_metadata.json").read_text()) for d in (one, two)]
    assert meta[0]["distributed"] == {"type": "NO", "num_processes": 1}
    assert meta[1]["distributed"] == {"type": "FSDP", "num_processes": 2}
    seen = [m["tokens_seen"] for m in meta]
    assert seen[0] == seen[1] > 3 * 4 * 128  # the same 4 samples (prompt + answer) per step
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x) + 1e-6, (a, b)
    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert sorted(first) == sorted(second)
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=1e-5, msg=name)


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


def test_continual_trainer_refuses_fsdp_without_strategies(fsdp_state):
    with pytest.raises(ValueError, match="evaluation splits examples unevenly"):
        make_trainer([])


def test_build_accelerator_refuses_fsdp1_on_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("FSDP1 runs on GPUs")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1 cannot run on CPU.*fsdp2.yaml"):
        build_accelerator()
