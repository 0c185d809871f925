import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_longmem.continual import TrainerConfig, build_strategy, latest_checkpoint
from hf_longmem.continual.recipe import load_config, run

from .util import TINY_MODEL, make_trainer, tiny_lora

ROOT = Path(__file__).resolve().parents[2]

STACK = [
    {"name": "replay", "ratio": 0.25, "source": "reservoir", "buffer_size": 6},
    {"name": "ewc", "lam": 10.0, "fisher_samples": 2},
    {"name": "migu", "threshold": 0.5},
]


def _comparable(results):
    return {k: results[k] for k in ("accuracy_matrix", "loss_matrix", "history", "metrics", "train_log")}


@pytest.mark.parametrize("lora", [False, True], ids=["full+replay+ewc+migu", "lora+ilora"])
def test_killed_and_resumed_run_ends_with_the_same_metrics(tmp_path, lora):
    def trainer(out, plot=False):
        strategies = [{"name": "ilora", "buffer_size": 6}] if lora else STACK
        return make_trainer(
            [build_strategy(s) for s in strategies],
            model=tiny_lora() if lora else None,
            tmp_path=out,
            checkpoint_every=2,
            keep_checkpoints=1,
            schedule={"kind": "rewarm_cosine", "warmup": 1},
            plot=plot,
        )

    full = trainer(tmp_path / "a", plot=not lora).train()
    assert trainer(tmp_path / "b").train(stop_after_steps=5) is None  # "killed" after step 5; last checkpoint: 4
    partial = tmp_path / "b" / "checkpoints" / "checkpoint-6.tmp"  # a save interrupted by the kill
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-4"
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6.tmp"]
    resumed = trainer(tmp_path / "b").train(resume_from="latest")
    assert _comparable(resumed) == _comparable(full)
    # the rows logged after checkpoint-4 by the killed run are not repeated
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == (tmp_path / "a" / "metrics.jsonl").read_text()
    assert len(full["accuracy_matrix"]) == 3
    assert lora or (tmp_path / "a" / "stability_gap.png").stat().st_size > 0


def _killed_run(out, **config):
    options = dict(checkpoint_every=2, keep_checkpoints=2, plot=False)
    options.update(config)
    assert make_trainer([build_strategy(s) for s in STACK], tmp_path=out, **options).train(stop_after_steps=5) is None
    return latest_checkpoint(out)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    checkpoint = _killed_run(tmp_path, learning_rate=1e-2)
    other = make_trainer([build_strategy(s) for s in STACK], tmp_path=tmp_path, learning_rate=5e-2, plot=False)
    with pytest.raises(ValueError, match=r"another run.*train\.learning_rate: checkpoint 0\.01, now 0\.05"):
        other.train(resume_from="latest")
    fewer = make_trainer([build_strategy(s) for s in STACK[:2]], tmp_path=tmp_path, plot=False)
    with pytest.raises(ValueError, match=r"strategies\.count"):
        fewer.train(resume_from=checkpoint)
    assert latest_checkpoint(tmp_path) == checkpoint  # nothing was pruned or replaced


def test_fresh_run_into_a_used_folder_needs_overwrite(tmp_path):
    _killed_run(tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    fresh = make_trainer([build_strategy(s) for s in STACK], tmp_path=tmp_path, learning_rate=5e-2, plot=False)
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        fresh.train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    results = fresh.train(overwrite=True)
    assert results["meta"]["config"]["learning_rate"] == 5e-2
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one run's rows only


class _RunsCode:
    """Unpickling this creates a marker file: the proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_never_unpickles(tmp_path):
    import pickle

    import torch

    checkpoint = _killed_run(tmp_path / "run")
    marker = tmp_path / "code_ran"
    # accelerate's custom-state file: refused before anything is read
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    trainer = make_trainer([build_strategy(s) for s in STACK], tmp_path=tmp_path / "run", plot=False)
    with pytest.raises(ValueError, match="pickle"):
        trainer.train(resume_from="latest")
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    # optimizer state is read with weights_only=True: a crafted file fails to load instead of running
    torch.save({"state": _RunsCode(marker)}, checkpoint / "optimizer.bin")
    with pytest.raises(pickle.UnpicklingError):
        trainer.train(resume_from="latest")
    assert not marker.exists()


def test_trainer_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        TrainerConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="steps_per_task"):
        make_trainer(steps_per_task=[1, 2])
    with pytest.raises(ValueError, match="strategies"):
        make_trainer(["ewc"])
    with pytest.raises(ValueError, match="resume_from"):
        make_trainer(tmp_path=tmp_path).train(resume_from=tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(None, ["bogus=1"])


def test_recipe_lora_publish_writes_card_with_matrix(tmp_path):
    config = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model={{config: {json.dumps(TINY_MODEL)}}}",
            "peft={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}",
            "tasks={num_tasks: 3, facts_per_task: 3, num_digits: 2}",
            "train={steps_per_task: 2, batch_size: 2, learning_rate: 1e-2, eval_every: 1}",
            "strategies=[{name: ilora, infer_with: ema}]",
            f"publish={{repo_id: me/tiny-ilora, local_dir: {tmp_path / 'hub'}}}",
        ],
    )
    results = run(config, loss_on="answer")
    repo = Path(results["published_to"])
    assert (repo / "adapter_model.safetensors").is_file() and (repo / "adapter_config.json").is_file()
    card = (repo / "README.md").read_text()
    assert "## Accuracy matrix" in card and "| magic | var | passkey |" in card.replace("after \\ on | ", "")
    assert "continual-learning" in card and "ilora" in card
    assert (repo / "continual" / "results.json").is_file()
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["accuracy_matrix"] == results["accuracy_matrix"] and on_disk["meta"]["task_sizes"] == [3, 3, 3]


@pytest.mark.skipif(
    shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
    reason="no accelerate CLI",
)
def test_accelerate_launch_two_processes_on_cpu(tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "num_threads": 1,
        "model": {"config": TINY_MODEL},
        "tasks": {"num_tasks": 3, "facts_per_task": 4, "num_digits": 2},
        "train": {"steps_per_task": 2, "batch_size": 2, "learning_rate": 1e-2, "eval_every": 1, "checkpoint_every": 3},
        "strategies": STACK,
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    exe = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        exe,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29613",
        str(ROOT / "recipes" / "continual_finetune.py"),
        "--config",
        str(tmp_path / "tiny.yaml"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["meta"]["num_processes"] == 2 and results["meta"]["replicas_in_sync"]
    assert len(results["accuracy_matrix"]) == 3 and results["history"][-1]["step"] == 6
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()


def test_shipped_tiny_config_shows_learning_and_forgetting(tmp_path):
    """The example config learns each task; training on later tasks costs the earlier ones (plain fine-tuning)."""
    config = load_config(ROOT / "recipes/configs/continual_tiny.yaml", [f"output_dir={tmp_path}", "strategies=[]"])
    matrix = run(config, loss_on="answer")["accuracy_matrix"]
    learned = [matrix[t][t] for t in range(len(matrix))]
    assert min(learned) >= 0.75, matrix  # each task is learned when trained (0 before: facts are random)
    assert matrix[-1][0] <= learned[0] - 0.5, matrix  # and the first one is largely forgotten by the end
