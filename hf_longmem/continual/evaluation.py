"""Continual evaluation: periodic accuracy on every task seen so far, the accuracy matrix, and its metrics.

Definitions (``R[i][j]``: accuracy on task ``j`` after training task ``i``; ``b[j]``: accuracy of the initial model;
``T`` tasks):

- ``ACC = mean_j R[T-1][j]`` (average accuracy at the end);
- ``BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])`` (backward transfer, Lopez-Paz & Ranzato 2017);
- ``forgetting = mean_{j<T-1} (max_{l<T-1} R[l][j] - R[T-1][j])`` (Chaudhry et al. 2018);
- ``FWT = mean_{j>0} (R[j-1][j] - b[j])`` (forward transfer);
- stability gap (De Lange et al., "Continual evaluation for lifelong learning: identifying the stability gap",
  ICLR 2023): ``min-ACC_j`` is the minimum accuracy on task ``j`` over all evaluations after task ``j`` was learned;
  ``avg_min_acc`` averages it over the tasks before the last, and
  ``WC-ACC = (1/T) R[T-1][T-1] + (1 - 1/T) avg_min_acc`` (worst-case accuracy, their Eq. 3 at the end of the
  stream; ``wc_acc_per_task`` gives it after each task ``k`` with ``T`` replaced by ``k + 1``);
- ``WF^w`` (windowed forgetting): the largest drop ``a(t1) - a(t2)`` with ``0 < t2 - t1 <= w`` evaluations on any
  task, from its evaluation at the end of its training on, for ``w`` in ``windows`` (the paper uses 10 and 100).

Accuracy is teacher-forced exact match of each example's answer tokens (all argmax-correct), evaluated by sharding
the examples over processes and gathering the results (``accelerate.utils.gather_object``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from hf_longmem.files import atomic_write_text

from .data import ContinualTask, collate

__all__ = [
    "ContinualEvaluator",
    "evaluate_task",
    "matrix_metrics",
    "plot_results",
    "stability_metrics",
    "write_json_atomic",
]


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (:func:`hf_longmem.files.atomic_write`)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@torch.no_grad()
def evaluate_task(
    model: torch.nn.Module,
    task: ContinualTask,
    pad_token_id: int,
    *,
    batch_size: int = 64,
    max_examples: int | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Exact-match accuracy and mean answer-token loss of ``model`` on ``task``'s evaluation examples.

    Args:
        model: a causal LM (unwrapped; put in eval mode by the caller).
        task: a tokenized task.
        pad_token_id: padding id.
        batch_size: rows per forward.
        max_examples: evaluate only the first ``max_examples`` examples (fixed subset, as the paper's
            ``eval_task_subset_size``).
        process_index / num_processes: this process evaluates examples ``process_index::num_processes``; results are
            gathered from all processes (every process must call this).
        device: device of the inputs (default: the model's).

    Returns:
        ``{"accuracy": float in [0, 1], "loss": mean cross entropy over answer tokens, "num_examples": int}``.
    """
    if not task.eval_prompt_ids:
        raise ValueError(f"task {task.name!r} is not tokenized; call tokenize_task first")
    n = len(task.eval_prompt_ids) if max_examples is None else min(max_examples, len(task.eval_prompt_ids))
    device = device or next(model.parameters()).device
    mine = list(range(process_index, n, num_processes))
    results: list[tuple[int, bool, float, int]] = []
    # every process runs the same number of forwards (a sharded model's forward is collective): the processes with
    # fewer examples score example 0 once more in their last rounds and drop the result
    rounds = math.ceil(math.ceil(n / num_processes) / batch_size)
    for start in range(0, rounds * batch_size, batch_size):
        idx = mine[start : start + batch_size]
        padding = not idx
        if padding:
            idx = [0]
        batch = collate([(task.eval_prompt_ids[i], task.eval_answer_ids[i]) for i in idx], pad_token_id, "answer")
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        logits = logits[:, :-1].float().cpu()
        targets = batch["input_ids"][:, 1:]
        mask = batch["answer_mask"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        correct = ((logits.argmax(-1) == targets) | ~mask).all(-1)
        if padding:
            continue
        for row, i in enumerate(idx):
            results.append((i, bool(correct[row]), float(ce[row][mask[row]].sum()), int(mask[row].sum())))
    if num_processes > 1:
        results = gather_object(results)
    results = sorted(set(results))
    tokens = sum(r[3] for r in results)
    return {
        "accuracy": sum(r[1] for r in results) / max(1, len(results)),
        "loss": sum(r[2] for r in results) / max(1, tokens),
        "num_examples": len(results),
    }


def matrix_metrics(matrix: Sequence[Sequence[float]], initial: Sequence[float] | None = None) -> dict[str, float]:
    """ACC, BWT, forgetting and (with ``initial``) FWT of a ``T x T`` accuracy matrix (rows: after task i).

    A partial matrix (``k < T`` rows) gives the metrics over the first ``k`` tasks.
    """
    k = len(matrix)
    if k == 0:
        return {}
    if any(len(row) < k for row in matrix):
        raise ValueError("matrix rows must have at least as many entries as there are rows")
    last = matrix[k - 1]
    out = {"acc": sum(last[:k]) / k}
    if k > 1:
        out["bwt"] = sum(last[j] - matrix[j][j] for j in range(k - 1)) / (k - 1)
        out["forgetting"] = sum(max(matrix[i][j] for i in range(j, k - 1)) - last[j] for j in range(k - 1)) / (k - 1)
        if initial is not None:
            out["fwt"] = sum(matrix[j - 1][j] - initial[j] for j in range(1, k)) / (k - 1)
    return out


def stability_metrics(
    history: Sequence[dict[str, Any]],
    matrix: Sequence[Sequence[float]],
    task_end_steps: Sequence[int],
    windows: Sequence[int] = (10, 100),
) -> dict[str, Any]:
    """min-ACC, WC-ACC and windowed forgetting from the periodic evaluations.

    Args:
        history: evaluation records ``{"step": int, "accuracy": {task_index(str or int): acc}}`` in step order
            (periodic evaluations and the task-boundary evaluations).
        matrix: accuracy matrix rows so far.
        task_end_steps: global step at which each finished task ended (``len == len(matrix)``).
        windows: window sizes ``w`` of ``WF^w`` (in evaluations).

    Returns:
        ``min_acc`` (per earlier task), ``avg_min_acc``, ``wc_acc``, ``wc_acc_per_task`` and ``wf_<w>``.
    """
    k = len(matrix)
    out: dict[str, Any] = {"min_acc": {}}
    if k == 0:
        return out
    series: dict[int, list[float]] = {}
    for j in range(k):
        after = [h["accuracy"][str(j)] for h in history if h["step"] > task_end_steps[j] and str(j) in h["accuracy"]]
        # windowed forgetting starts from the evaluation at the end of the task (the learned accuracy)
        series[j] = [
            h["accuracy"][str(j)] for h in history if h["step"] >= task_end_steps[j] and str(j) in h["accuracy"]
        ]
        if after:
            out["min_acc"][str(j)] = min(after)
    wc_per_task = []
    for t in range(k):
        mins = [min(v for h, v in _after(history, j, task_end_steps[j], task_end_steps[t])) for j in range(t)]
        mins = [m for m in mins if not math.isnan(m)]
        avg_min = sum(mins) / len(mins) if mins else 0.0
        wc_per_task.append(matrix[t][t] / (t + 1) + (1 - 1 / (t + 1)) * avg_min)
    finished = [j for j in range(k - 1) if str(j) in out["min_acc"]]
    out["avg_min_acc"] = sum(out["min_acc"][str(j)] for j in finished) / len(finished) if finished else None
    out["wc_acc"] = wc_per_task[-1]
    out["wc_acc_per_task"] = wc_per_task
    for w in windows:
        worst = 0.0
        for values in series.values():
            for a in range(len(values)):
                for b in range(a + 1, min(len(values), a + w + 1)):
                    worst = max(worst, values[a] - values[b])
        out[f"wf_{w}"] = worst
    return out


def _after(history, j: int, start: int, end: int) -> list[tuple[dict, float]]:
    """Evaluations of task ``j`` with ``start < step <= end`` (NaN when none)."""
    found = [(h, h["accuracy"][str(j)]) for h in history if start < h["step"] <= end and str(j) in h["accuracy"]]
    return found or [({}, float("nan"))]


class ContinualEvaluator:
    """Collects the periodic evaluations and the accuracy matrix of a run; checkpointable.

    Args:
        tasks: the tokenized task sequence.
        eval_every: evaluate all seen tasks every ``eval_every`` optimizer steps (0: only at task boundaries).
        max_examples: evaluation subset per task.
        batch_size: evaluation batch size.
    """

    def __init__(self, tasks: Sequence[ContinualTask], eval_every: int = 10, max_examples=None, batch_size: int = 64):
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 0:
            raise ValueError(f"eval_every must be a non-negative integer, got {eval_every!r}")
        self.tasks = list(tasks)
        self.eval_every = eval_every
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.history: list[dict[str, Any]] = []
        self.matrix: list[list[float]] = []
        self.loss_matrix: list[list[float]] = []
        self.initial: list[float] | None = None
        self.task_end_steps: list[int] = []

    def evaluate(self, model, task_indices: Sequence[int], accelerator, pad_token_id: int) -> dict[str, dict]:
        """``{str(j): {"accuracy", "loss", "num_examples"}}`` for the given tasks (all processes must call)."""
        was_training = model.training
        model.eval()
        try:
            return {
                str(j): evaluate_task(
                    model,
                    self.tasks[j],
                    pad_token_id,
                    batch_size=self.batch_size,
                    max_examples=self.max_examples,
                    process_index=accelerator.process_index,
                    num_processes=accelerator.num_processes,
                    device=accelerator.device,
                )
                for j in task_indices
            }
        finally:
            model.train(was_training)

    def record(
        self, step: int, task: int, results: dict[str, dict], boundary: bool = False, probes: dict | None = None
    ) -> dict[str, Any]:
        """Append an evaluation row (``probes``: the memory probes' results at this step, see :mod:`.probes`)."""
        row = {
            "step": step,
            "task": task,
            "boundary": boundary,
            "accuracy": {j: r["accuracy"] for j, r in results.items()},
            "loss": {j: r["loss"] for j, r in results.items()},
        }
        if probes is not None:
            row["probes"] = probes
        self.history.append(row)
        return row

    def record_initial(self, results: dict[str, dict], probes: dict | None = None) -> None:
        self.initial = [results[str(j)]["accuracy"] for j in range(len(self.tasks))]
        self.record(0, -1, results, boundary=True, probes=probes)

    def record_task_end(self, step: int, task: int, results: dict[str, dict], probes: dict | None = None) -> None:
        self.matrix.append([results[str(j)]["accuracy"] for j in range(len(self.tasks))])
        self.loss_matrix.append([results[str(j)]["loss"] for j in range(len(self.tasks))])
        self.task_end_steps.append(step)
        # the boundary row counts as an evaluation of the seen tasks at this step
        self.record(step, task, {j: r for j, r in results.items() if int(j) <= task}, boundary=True, probes=probes)

    def metrics(self) -> dict[str, Any]:
        out = matrix_metrics(self.matrix, self.initial)
        out.update(stability_metrics(self.history, self.matrix, self.task_end_steps))
        return out

    def results(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "meta": dict(meta or {}),
            "tasks": [t.name for t in self.tasks],
            "accuracy_matrix": self.matrix,
            "loss_matrix": self.loss_matrix,
            "initial_accuracy": self.initial,
            "task_end_steps": self.task_end_steps,
            "metrics": self.metrics(),
            "history": self.history,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "matrix": self.matrix,
            "loss_matrix": self.loss_matrix,
            "initial": self.initial,
            "task_end_steps": self.task_end_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.matrix = [list(r) for r in state["matrix"]]
        self.loss_matrix = [list(r) for r in state["loss_matrix"]]
        self.initial = state["initial"]
        self.task_end_steps = list(state["task_end_steps"])


def plot_results(results: dict[str, Any] | Sequence[tuple[str, dict[str, Any]]], path: str | os.PathLike) -> Path:
    """Accuracy of every task vs training step (stability-gap plot) with task boundaries; one panel per run.

    Args:
        results: the dict of :meth:`ContinualEvaluator.results`, or ``[(label, results), ...]`` for several runs.
        path: output image (PNG); written atomically.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("", results)] if isinstance(results, dict) else list(results)
    ncols = min(3, len(runs))
    nrows = -(-len(runs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(runs) :]:
        ax.axis("off")
    for ax, (label, res) in zip(axes.flat, runs):
        names = res["tasks"]
        for j, name in enumerate(names):
            # from the start of task j on: its accuracy-matrix entry before training it, then every evaluation
            pts = [
                (h["step"], h["accuracy"][str(j)])
                for h in res["history"]
                if str(j) in h["accuracy"] and h.get("task", 0) >= j
            ]
            if j == 0 or j - 1 < len(res["accuracy_matrix"]):
                before = res["initial_accuracy"] if j == 0 else res["accuracy_matrix"][j - 1]
                start = 0 if j == 0 else res["task_end_steps"][j - 1]
                if before is not None:
                    pts.append((start, before[j]))
            pts = sorted(set(pts))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"task {j} ({name})", lw=1.3)
        for step in res["task_end_steps"][:-1]:
            ax.axvline(step, color="gray", ls="--", lw=0.8)
        m = res["metrics"]
        title = f"{label}\nACC {m.get('acc', 0):.2f}  F {m.get('forgetting', 0):.2f}  WC-ACC {m.get('wc_acc', 0):.2f}"
        ax.set_title(title.strip(), fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(-0.02, 1.02)
    for row in axes:
        row[0].set_ylabel("exact-match accuracy")
    axes.flat[len(runs) - 1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
