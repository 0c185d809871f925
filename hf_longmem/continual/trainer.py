"""``ContinualTrainer``: a raw accelerate loop over a task sequence, with stackable strategies and continual evaluation.

The loop follows transformers' ``run_clm_no_trainer.py``: ``Accelerator`` -> AdamW (no weight decay on biases and
norms) -> ``accelerator.prepare(model, optimizer)`` -> ``accelerator.backward`` / ``clip_grad_norm_`` / ``step`` ->
``save_state`` / ``load_state``. Differences, each for continual training:

- the learning rate is a pure function of the position in the stream (:mod:`.schedules`), written into the param
  groups each step; no scheduler goes through ``accelerator.prepare`` (it would step once per process);
- batches are drawn by :func:`.data.epoch_rows` from ``(seed, task, step)``: the global batch (``batch_size`` rows per
  process) is the same on every process, each takes its contiguous slice; this is the data order a resumed run
  reproduces exactly, so no ``skip_first_batches`` is needed;
- the position in the stream, the evaluator and every strategy's state are saved as JSON + safetensors
  (:mod:`.state_io`) next to the model, optimizer and RNG states of ``save_state``, never pickled: loading a checkpoint
  runs no code (accelerate's own files are read with ``weights_only=True``; a checkpoint holding a pickle of custom
  state is refused). Checkpoints are written to ``checkpoint-<step>.tmp`` and renamed when complete;
- every checkpoint records the run's fingerprint (:func:`run_fingerprint`: training options, task data, strategies
  and model layout). A run resumes only a checkpoint of its own fingerprint, and a fresh run refuses an
  ``output_dir`` that holds checkpoints unless told to overwrite, so runs never mix their checkpoints or metrics.

After each task the accuracy on **all** tasks (seen and future) becomes a row of the accuracy matrix; every
``eval_every`` steps the tasks seen so far are evaluated (stability gap). Results go to ``results.json`` and
``stability_gap.png`` in ``output_dir``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from hf_longmem.files import atomic_write_text
from hf_longmem.training.distributed import build_accelerator, is_sharded, refuse_sharded

from .base import Row, Strategy
from .data import ContinualTask, collate, epoch_rows, tokenize_task
from .evaluation import ContinualEvaluator, plot_results, write_json_atomic
from .probes import Probe
from .schedules import Position, build_schedule
from .state_io import load_tree, save_tree

__all__ = ["ContinualTrainer", "TrainerConfig", "latest_checkpoint", "run_fingerprint"]

logger = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
#: Name of the trainer-state files (``.json`` + ``.safetensors``) and of the fingerprint file in a checkpoint.
STATE_STEM, RUN_FILE = "trainer_state", "run.json"
#: Options that change where and how often results are written, not what is trained.
_OUTPUT_ONLY_OPTIONS = ("output_dir", "plot", "keep_checkpoints", "checkpoint_every")


@dataclass
class TrainerConfig:
    """Training-loop options.

    Attributes:
        steps_per_task: optimizer steps per task (one int, or one per task).
        batch_size: training rows per process and step.
        learning_rate: peak learning rate (``eta_max`` of the schedule).
        schedule: schedule spec for :func:`.schedules.build_schedule` (default: constant).
        weight_decay / betas / eps: AdamW options (no decay on biases and norm weights).
        grad_clip: max gradient norm (``None`` or 0: no clipping).
        loss_on: ``"answer"`` (fine-tuning) or ``"all"`` (continual pre-training: loss on every token).
        eval_every: evaluate all seen tasks every N optimizer steps (0: only at task boundaries).
        eval_max_examples: evaluation subset per task (``None``: all).
        eval_batch_size: evaluation batch size.
        checkpoint_every: ``save_state`` every N optimizer steps (0: never).
        keep_checkpoints: newest checkpoints kept (older ones are deleted).
        seed: seed of the data order, replay draws and ``set_seed``.
        output_dir: where checkpoints, ``results.json``, ``metrics.jsonl`` and the plot go.
        plot: write ``stability_gap.png`` at the end.
    """

    steps_per_task: int | list[int] = 100
    batch_size: int = 16
    learning_rate: float = 1e-3
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "constant"})
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    loss_on: str = "answer"
    eval_every: int = 10
    eval_max_examples: int | None = None
    eval_batch_size: int = 64
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    output_dir: str = "runs/continual"
    plot: bool = True

    def task_steps(self, num_tasks: int) -> list[int]:
        steps = self.steps_per_task
        steps = [steps] * num_tasks if isinstance(steps, int) else list(steps)
        if len(steps) != num_tasks or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(
                f"steps_per_task must be a positive int or {num_tasks} positive ints, got {self.steps_per_task!r}"
            )
        return steps

    def validate(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.learning_rate, (int, float)) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.loss_on not in ("answer", "all"):
            raise ValueError(f"loss_on must be 'answer' or 'all', got {self.loss_on!r}")
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if (
            isinstance(self.keep_checkpoints, bool)
            or not isinstance(self.keep_checkpoints, int)
            or self.keep_checkpoints < 1
        ):
            raise ValueError(f"keep_checkpoints must be a positive integer, got {self.keep_checkpoints!r}")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the largest step in ``output_dir/checkpoints`` (``None`` if none)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return max(found)[1] if found else None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def run_fingerprint(
    config: TrainerConfig, tasks: Sequence[ContinualTask], strategies: Sequence[Strategy], model: torch.nn.Module
) -> dict[str, Any]:
    """What makes two runs the same run: ``{key: value}``, compared key by key on resume.

    Training options (all but :data:`_OUTPUT_ONLY_OPTIONS`), each task's name and a digest of its token ids, each
    strategy's name and its scalar options, and the model's class and parameter layout (names, shapes, trainable).
    Call it before the strategies' ``setup`` (which may change the model).
    """
    fingerprint: dict[str, Any] = {f"train.{k}": v for k, v in asdict(config).items() if k not in _OUTPUT_ONLY_OPTIONS}
    fingerprint = json.loads(json.dumps(fingerprint, default=repr))  # tuples -> lists, as they come back from JSON
    for i, task in enumerate(tasks):
        ids = [task.prompt_ids, task.answer_ids, task.eval_prompt_ids, task.eval_answer_ids]
        fingerprint[f"tasks[{i}]"] = f"{task.name} ({_digest(ids)})"
    fingerprint["tasks.count"] = len(tasks)
    for i, strategy in enumerate(strategies):
        options = {
            k: v
            for k, v in sorted(vars(strategy).items())
            if not k.startswith("_") and isinstance(v, (type(None), bool, int, float, str))
        }
        fingerprint[f"strategies[{i}]"] = json.loads(json.dumps({"name": strategy.name, **options}))
    fingerprint["strategies.count"] = len(strategies)
    layout = [(n, list(p.shape), p.requires_grad) for n, p in model.named_parameters()]
    fingerprint["model"] = f"{type(model).__name__} ({_digest(layout)})"
    return fingerprint


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: checkpoint X, now Y"`` for every key whose value differs."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: checkpoint {saved.get(k, '(absent)')!r}, now {current.get(k, '(absent)')!r}"
        for k in keys
        if saved.get(k, "(absent)") != current.get(k, "(absent)")
    ]


class ContinualTrainer:
    """Train ``model`` on ``tasks`` in order, with ``strategies`` stacked at fixed hooks (see :mod:`.base`).

    Args:
        model: a causal LM (optionally a peft model). Its trainable parameters are those with ``requires_grad``.
        tokenizer: the model's tokenizer (tasks are tokenized with it if they are not yet).
        tasks: the task sequence.
        strategies: strategies, applied in list order at every hook.
        config: :class:`TrainerConfig`.
        accelerator: an ``Accelerator`` (default: :func:`~hf_longmem.training.distributed.build_accelerator`).
        probes: memory probes (:mod:`.probes`) measured at every evaluation (initial, periodic, task end) in the
            strategies' ``eval_context``; their results go into each ``history`` row under ``"probes"``. Every process
            measures the whole probe set (probes are small).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        tasks: Sequence[ContinualTask],
        strategies: Sequence[Strategy] = (),
        config: TrainerConfig | None = None,
        accelerator: Accelerator | None = None,
        probes: Sequence[Probe] = (),
    ):
        self.config = config or TrainerConfig()
        self.config.validate()
        if not tasks:
            raise ValueError("tasks must not be empty")
        for s in strategies:
            if not isinstance(s, Strategy):
                raise ValueError(f"strategies must be Strategy instances, got {type(s).__name__}")
        names = [getattr(p, "name", None) for p in probes]
        if not all(isinstance(p, Probe) for p in probes) or len(set(names)) != len(names):
            raise ValueError(f"probes must be Probe instances with distinct names, got {names}")
        self.probes = list(probes)
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.tasks = [t if t.prompt_ids else tokenize_task(t, tokenizer) for t in tasks]
        self.steps = self.config.task_steps(len(self.tasks))
        self.total_steps = sum(self.steps)
        self.schedule = build_schedule(self.config.schedule, self.config.learning_rate)
        self.strategies = list(strategies)
        self.accelerator = accelerator or build_accelerator()
        readers = [s.name for s in self.strategies if s.reads_parameters]
        if readers:
            refuse_sharded(
                self.accelerator,
                "ContinualTrainer",
                f"the strategies {readers} read or rewrite whole parameters / gradients per shape, which are sharded",
            )
        self.evaluator = ContinualEvaluator(
            self.tasks, self.config.eval_every, self.config.eval_max_examples, self.config.eval_batch_size
        )
        self.global_step = self.task_index = self.step_in_task = 0
        self.task_done = False
        self.train_log: list[dict[str, Any]] = []
        self.output_dir = Path(self.config.output_dir)
        set_seed(self.config.seed)
        self.unwrapped = model
        self.model = model
        self.fingerprint = run_fingerprint(self.config, self.tasks, self.strategies, model)
        for s in self.strategies:
            s.setup(self)
        self.optimizer = torch.optim.AdamW(
            self._param_groups(model), lr=self.config.learning_rate, betas=tuple(self.config.betas), eps=self.config.eps
        )
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.needs_hidden_states = any(s.needs_hidden_states for s in self.strategies)

    # ------------------------------------------------------------------------------------------------------------
    def _param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
        if not decay and not no_decay:
            raise ValueError("model has no trainable parameters")
        groups = [{"params": decay, "weight_decay": self.config.weight_decay, "lr_scale": 1.0}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0})
        return groups

    def position(self) -> Position:
        return Position(
            self.global_step,
            self.task_index,
            self.step_in_task,
            self.steps[self.task_index],
            self.total_steps,
            self.steps[0],
        )

    def local_rows(self, rows: list[Row]) -> list[Row]:
        """This process's contiguous share of each row group of the global batch."""
        n, i = self.accelerator.num_processes, self.accelerator.process_index
        out: list[Row] = []
        for group in sorted({r[2] for r in rows}):
            g = [r for r in rows if r[2] == group]
            size = -(-len(g) // n)
            out.extend(g[i * size : (i + 1) * size])
        return out

    def make_batch(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """Collate ``rows`` (training examples) into tensors on the accelerator's device, plus ``groups`` ``(B,)``."""
        pairs = [(self.tasks[t].prompt_ids[i], self.tasks[t].answer_ids[i]) for t, i, _ in rows]
        batch = collate(pairs, self.pad_token_id, self.config.loss_on)
        batch["groups"] = torch.tensor([g for *_, g in rows], dtype=torch.long)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    @staticmethod
    def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cross entropy ``(B, T-1)`` and its mask, from unshifted ``labels`` (``-100`` ignored)."""
        targets = labels[:, 1:]
        mask = targets != -100
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none")
        return ce * mask, mask

    def grouped_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over row groups of each group's token-mean cross entropy."""
        ce, mask = self.token_losses(logits, batch["labels"])
        losses = []
        for g in batch["groups"].unique().tolist():
            rows = batch["groups"] == g
            losses.append(ce[rows].sum() / mask[rows].sum().clamp_min(1))
        return torch.stack(losses).mean()

    def forward(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None, **kwargs) -> Any:
        model = model or self.model
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self, task_indices: Sequence[int]) -> dict[str, dict]:
        with contextlib.ExitStack() as stack:
            for s in self.strategies:
                stack.enter_context(s.eval_context())
            return self.evaluator.evaluate(self.unwrapped, task_indices, self.accelerator, self.pad_token_id)

    def measure_probes(self) -> dict[str, dict[str, Any]] | None:
        """``{probe name: results}`` of every probe now (``None`` without probes), in the strategies' eval context."""
        if not self.probes:
            return None
        model = self.unwrapped
        was_training = model.training
        model.eval()
        try:
            with contextlib.ExitStack() as stack:
                for s in self.strategies:
                    stack.enter_context(s.eval_context())
                return {p.name: p(model, self.tokenizer) for p in self.probes}
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What ``save_state`` does not cover: position in the stream, evaluator, strategies (no pickle needed)."""
        return {
            "global_step": self.global_step,
            "task_index": self.task_index,
            "step_in_task": self.step_in_task,
            "task_done": self.task_done,
            "evaluator": self.evaluator.state_dict(),
            "strategies": [s.state_dict() for s in self.strategies],
            "train_log": self.train_log,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step, self.task_index = int(state["global_step"]), int(state["task_index"])
        self.step_in_task, self.task_done = int(state["step_in_task"]), bool(state["task_done"])
        self.evaluator.load_state_dict(state["evaluator"])
        if len(state["strategies"]) != len(self.strategies):
            raise ValueError("the checkpoint was written with a different list of strategies")
        for s, st in zip(self.strategies, state["strategies"]):
            s.load_state_dict(st)
        self.train_log = list(state["train_log"])

    def save_checkpoint(self) -> Path:
        """``save_state`` into ``checkpoints/checkpoint-<step>`` (atomically: written as ``.tmp`` then renamed),
        with the trainer state (JSON + safetensors) and the run's fingerprint."""
        root = self.output_dir / "checkpoints"
        final = root / f"checkpoint-{self.global_step}"
        tmp = root / f"checkpoint-{self.global_step}.tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.accelerator.is_main_process:
            save_tree(self.state_dict(), tmp, STATE_STEM)
            write_json_atomic(tmp / RUN_FILE, {"fingerprint": self.fingerprint})
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            found = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT.match(p.name)))
            for _, old in found[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def check_checkpoint(self, path: Path) -> None:
        """Refuses a checkpoint that would need pickle or belongs to another run (``ValueError`` naming why)."""
        pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
        if pickled:
            raise ValueError(
                f"{path} holds pickled state ({', '.join(pickled)}), which hf_longmem no longer loads: unpickling "
                "can run arbitrary code. It was written by an older version; start the run again with --overwrite"
            )
        run_file = path / RUN_FILE
        if not run_file.is_file():
            raise ValueError(f"{path} has no {RUN_FILE}: it was not written by this version of the trainer")
        saved = json.loads(run_file.read_text()).get("fingerprint", {})
        differences = fingerprint_differences(saved, self.fingerprint)
        if differences:
            raise ValueError(
                f"{path} belongs to another run; differing: "
                + "; ".join(differences)
                + ". Resume with the checkpoint's settings, or start over with --overwrite (or another output_dir)"
            )

    def existing_run_files(self) -> list[Path]:
        """Files of an earlier run in ``output_dir`` that a fresh run would mix with its own."""
        found = [self.output_dir / name for name in ("metrics.jsonl", "results.json")]
        found = [p for p in found if p.exists()]
        root = self.output_dir / "checkpoints"
        if root.is_dir():
            found.extend(sorted(p for p in root.iterdir() if p.name.startswith("checkpoint-")))
        return found

    def truncate_metrics(self, step: int) -> None:
        """Drops the ``metrics.jsonl`` rows written after the checkpoint at ``step`` (the resumed run writes them
        again): rows of later steps, and the task-end row of ``step`` itself (logged after its checkpoint)."""
        path = self.output_dir / "metrics.jsonl"
        if not self.accelerator.is_main_process or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if isinstance(row, dict) and (
                row.get("step", 0) < step or (row.get("step") == step and "task_end" not in row)
            ):
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _log(self, row: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
        self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self.global_step)

    def train_step(self) -> float:
        """One optimizer step on the current task; returns the loss."""
        task = self.task_index
        cfg = self.config
        global_batch = cfg.batch_size * self.accelerator.num_processes
        rows: list[Row] = [
            (task, i, 0)
            for i in epoch_rows(len(self.tasks[task].examples), global_batch, self.step_in_task, cfg.seed, task)
        ]
        for s in self.strategies:
            rows = s.select_rows(rows)
        batch = self.make_batch(self.local_rows(rows))
        for s in self.strategies:
            s.before_forward(batch)
        outputs = self.forward(batch, output_hidden_states=self.needs_hidden_states)
        loss = next((v for v in (s.task_loss(batch, outputs) for s in self.strategies) if v is not None), None)
        if loss is None:
            loss = self.grouped_loss(outputs.logits, batch)
        for s in self.strategies:
            extra = s.extra_loss(batch, outputs)
            if extra is not None:
                loss = loss + extra
        self.accelerator.backward(loss)
        for s in self.strategies:
            s.after_backward()
        if cfg.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        lr = self.schedule(self.position())
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.step_in_task += 1
        for s in self.strategies:
            s.after_step(rows)
        self.last_lr = lr
        return float(loss.detach())

    def train(
        self,
        resume_from: str | os.PathLike | None = None,
        stop_after_steps: int | None = None,
        overwrite: bool = False,
    ):
        """Run (or resume) the stream.

        Args:
            resume_from: a checkpoint folder, ``"latest"`` (newest in ``output_dir``; a fresh start if none), or
                ``None``. The checkpoint must be of this run (same fingerprint) and free of pickles.
            overwrite: a fresh start deletes an earlier run's checkpoints and metrics in ``output_dir`` (without it,
                a fresh start into such a folder raises ``ValueError``).
            stop_after_steps: stop once ``global_step`` reaches this value (simulates an interrupted run; returns
                ``None``).

        Returns:
            The results dict (also written to ``output_dir/results.json``), or ``None`` when stopped early.
        """
        acc = self.accelerator
        resumed = False
        path = None
        if resume_from is not None:
            path = latest_checkpoint(self.output_dir) if str(resume_from) == "latest" else Path(resume_from)
            if path is not None and not Path(path).is_dir():
                raise ValueError(f"resume_from must be a checkpoint folder or 'latest', got {resume_from!r}")
        if path is None:
            earlier = self.existing_run_files()
            if earlier and not overwrite:
                raise ValueError(
                    f"{self.output_dir} holds another run's files ({', '.join(p.name for p in earlier[:4])}): "
                    "pass --resume to continue it, --overwrite to replace it, or choose another output_dir"
                )
            acc.wait_for_everyone()
            if earlier and acc.is_main_process:
                for p in earlier:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            acc.wait_for_everyone()
        else:
            path = Path(path)
            self.check_checkpoint(path)
            acc.load_state(str(path), load_kwargs={"weights_only": True})
            self.load_state_dict(load_tree(path, STATE_STEM))
            acc.wait_for_everyone()
            self.truncate_metrics(self.global_step)
            acc.wait_for_everyone()
            resumed = True
        start = time.time()
        if not resumed:
            self.evaluator.record_initial(self.evaluate(range(len(self.tasks))), self.measure_probes())
        for s in self.strategies:
            s.on_stream_start()
        progress = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            disable=not acc.is_main_process,
            desc="continual",
            mininterval=10,
        )
        while self.task_index < len(self.tasks):
            task = self.task_index
            if self.step_in_task == 0 and not self.task_done:
                for s in self.strategies:
                    s.on_task_start(task)
            while self.step_in_task < self.steps[task]:
                loss = self.train_step()
                progress.update(1)
                self.train_log.append({"step": self.global_step, "loss": round(loss, 5), "lr": self.last_lr})
                cfg = self.config
                if cfg.eval_every and self.global_step % cfg.eval_every == 0 and self.step_in_task < self.steps[task]:
                    row = self.evaluator.record(
                        self.global_step, task, self.evaluate(range(task + 1)), probes=self.measure_probes()
                    )
                    self._log({**row, "train_loss": loss, "lr": self.last_lr})
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if stop_after_steps is not None and self.global_step >= stop_after_steps:
                    progress.close()
                    return None
            for s in self.strategies:
                s.on_task_end(task)
            self.task_done = True
            results = self.evaluate(range(len(self.tasks)))
            self.evaluator.record_task_end(self.global_step, task, results, self.measure_probes())
            self._log(
                {"step": self.global_step, "task_end": task, "accuracy": {j: r["accuracy"] for j, r in results.items()}}
            )
            self.task_index += 1
            self.step_in_task = 0
            self.task_done = False
        progress.close()
        return self.finish(time.time() - start)

    @torch.no_grad()
    def replicas_in_sync(self) -> bool | None:
        """Whether every process holds the same weights (strategies that update parameters outside the optimizer
        must do it identically on all processes); compares a float64 checksum of all parameters."""
        if self.accelerator.num_processes == 1:
            return True
        if is_sharded(self.accelerator):  # one sharded copy, no replicas (reported as None)
            return None
        total = torch.zeros(1, dtype=torch.float64, device=self.accelerator.device)
        for i, p in enumerate(self.unwrapped.parameters()):
            total += (i + 1) * p.detach().double().sum()
        sums = self.accelerator.gather(total)
        return bool(torch.all(sums == sums[0]))

    def finish(self, seconds: float) -> dict[str, Any]:
        meta = {
            "tasks": [t.name for t in self.tasks],
            "steps_per_task": self.steps,
            "strategies": [s.name for s in self.strategies],
            "config": asdict(self.config),
            "num_processes": self.accelerator.num_processes,
            "train_seconds_this_session": round(seconds, 1),
            "trainable_parameters": sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad),
        }
        meta["replicas_in_sync"] = self.replicas_in_sync()
        results = self.evaluator.results(meta)
        results["train_log"] = self.train_log
        if self.accelerator.is_main_process:
            write_json_atomic(self.output_dir / "results.json", results)
            if self.config.plot:
                try:
                    plot_results(results, self.output_dir / "stability_gap.png")
                except ImportError:  # matplotlib is the optional `plot` extra
                    logger.warning("matplotlib is not installed: no stability_gap.png (pip install hf-longmem[plot])")
        self.accelerator.wait_for_everyone()
        return results
