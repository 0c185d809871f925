"""Learning-rate schedules of continual (pre-)training, as pure functions of the training position.

The trainer writes ``schedule(position)`` into every optimizer param group before each optimizer step instead of
passing a ``torch`` scheduler to ``accelerator.prepare``: an ``AcceleratedScheduler`` steps ``num_processes`` times
per optimizer step (unless ``split_batches``), and a multi-phase schedule that depends on task boundaries is easier to
resume exactly when it is a function of ``(global_step, task, step_in_task)`` only.

Schedules (Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language Models", TMLR 2024,
arXiv 2403.08763):

- :class:`ConstantSchedule`: linear warmup once at the start of the stream, then constant (naive sequential
  fine-tuning).
- :class:`RewarmCosineSchedule`: for **every** task, linear re-warming to ``eta_max`` over ``warmup`` steps, then
  cosine re-decay to ``eta_min = min_lr_ratio * eta_max`` at the end of the task (paper: 1% warmup, ``eta_min =
  0.1 eta_max``).
- :class:`InfiniteSchedule`: the paper's infinite schedule (Sec. 7): linear warmup once, a cooldown (cosine or
  inverse-sqrt) from ``eta_max`` to ``eta_const``, a constant phase that spans any number of tasks (no token budget
  needed), and an optional annealing phase to ``eta_min`` at the end of the stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ConstantSchedule",
    "InfiniteSchedule",
    "Position",
    "RewarmCosineSchedule",
    "build_schedule",
]


@dataclass(frozen=True)
class Position:
    """Where the optimizer step about to be taken is.

    Attributes:
        global_step: optimizer steps taken so far over the whole stream (0-based index of this step).
        task: index of the current task.
        step_in_task: steps taken so far in this task.
        task_steps: total steps of this task.
        total_steps: total steps of the whole stream.
        first_task_steps: steps of the first task (fractions of warmup/cooldown refer to it).
    """

    global_step: int
    task: int
    step_in_task: int
    task_steps: int
    total_steps: int
    first_task_steps: int


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_ratio(name: str, value: Any, *, allow_one: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok or (not allow_one and value == 1):
        raise ValueError(f"{name} must be a number in [0, 1{']' if allow_one else ')'}, got {value!r}")
    return float(value)


def _steps(value: int | float, total: int) -> int:
    """An int step count, or a fraction of ``total`` (rounded, at least 1 if the fraction is positive)."""
    if isinstance(value, float) and value < 1:
        return max(1, round(value * total)) if value > 0 else 0
    return int(value)


class ConstantSchedule:
    """``eta_max * min(1, (global_step + 1) / warmup)``: warmup once, then constant.

    Args:
        eta_max: peak learning rate.
        warmup: warmup steps (int) or fraction of the first task's steps (float < 1); 0 for none.
    """

    kind = "constant"

    def __init__(self, eta_max: float, warmup: int | float = 0):
        self.eta_max = _check_positive("eta_max", eta_max)
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int or a fraction, got {warmup!r}")
        self.warmup = warmup

    def __call__(self, pos: Position) -> float:
        warm = _steps(self.warmup, pos.first_task_steps)
        if warm and pos.global_step < warm:
            return self.eta_max * (pos.global_step + 1) / warm
        return self.eta_max


class RewarmCosineSchedule:
    """Re-warming and re-decaying per task (Ibrahim et al. 2024, Sec. 5).

    For step ``s`` of a task of ``S`` steps with ``W`` warmup steps::

        lr = eta_max * (s + 1) / W                                                  if s < W
        lr = eta_min + (eta_max - eta_min) / 2 * (1 + cos(pi * (s - W) / (S - W)))   otherwise

    Args:
        eta_max: peak learning rate of every task.
        min_lr_ratio: ``eta_min / eta_max`` (paper: 0.1).
        warmup: warmup steps per task, or a fraction of each task's steps (paper: 1%).
    """

    kind = "rewarm_cosine"

    def __init__(self, eta_max: float, min_lr_ratio: float = 0.1, warmup: int | float = 0.01):
        self.eta_max = _check_positive("eta_max", eta_max)
        self.eta_min = self.eta_max * _check_ratio("min_lr_ratio", min_lr_ratio)
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int or a fraction, got {warmup!r}")
        self.warmup = warmup

    def __call__(self, pos: Position) -> float:
        warm = min(_steps(self.warmup, pos.task_steps), pos.task_steps - 1)
        s = pos.step_in_task
        if s < warm:
            return self.eta_max * (s + 1) / warm
        span = max(1, pos.task_steps - warm)
        progress = min(1.0, (s - warm) / span)
        return self.eta_min + (self.eta_max - self.eta_min) * 0.5 * (1 + math.cos(math.pi * progress))


class InfiniteSchedule:
    """Infinite learning-rate schedule (Ibrahim et al. 2024, Sec. 7.2), over the global step ``t``::

        t < T_w:               eta_max * (t + 1) / T_w                                          (warmup, once)
        T_w <= t < T_cd:       cooldown from eta_max to eta_const over x = (t - T_w) / (T_cd - T_w):
                               cosine:   eta_const + (eta_max - eta_const) / 2 * (1 + cos(pi x))
                               inv_sqrt: eta_max + (eta_const - eta_max) * h(x) / h(1),  h(x) = 1/sqrt(1 + a x) - 1
        T_cd <= t < T_ann:     eta_const                                                         (constant phase)
        T_ann <= t < T_end:    anneal from eta_const to eta_min over y = (t - T_ann) / (T_end - T_ann):
                               linear:      eta_const + (eta_min - eta_const) * y
                               exponential: eta_const * (eta_min / eta_const) ** y   ("Beyond Cosine Decay", 2503.02844)
                               cosine:      eta_min + (eta_const - eta_min) / 2 * (1 + cos(pi y))

    ``T_end`` is the last step of the stream and ``T_ann = T_end - anneal_steps``; with ``anneal_steps=0`` the schedule
    never anneals (the paper anneals only on a branch when a checkpoint is released; continuing the stream from the
    constant phase needs no re-warming). No phase depends on task boundaries.

    Args:
        eta_max: peak learning rate.
        eta_const: learning rate of the constant phase (``< eta_max``).
        warmup: warmup steps (or fraction of the first task's steps).
        cooldown_steps: steps of the cooldown phase after warmup (or a fraction of the first task's steps).
        cooldown_shape: ``"cosine"`` or ``"inv_sqrt"``.
        inv_sqrt_alpha: steepness ``a`` of the inverse-sqrt cooldown.
        anneal_steps: steps of the final annealing phase (0: none).
        eta_min: end learning rate of the annealing.
        anneal_shape: ``"linear"``, ``"exponential"`` or ``"cosine"``.
    """

    kind = "infinite"

    def __init__(
        self,
        eta_max: float,
        eta_const: float,
        *,
        warmup: int | float = 0.01,
        cooldown_steps: int | float = 0.5,
        cooldown_shape: str = "cosine",
        inv_sqrt_alpha: float = 10.0,
        anneal_steps: int = 0,
        eta_min: float = 0.0,
        anneal_shape: str = "linear",
    ):
        self.eta_max = _check_positive("eta_max", eta_max)
        self.eta_const = _check_positive("eta_const", eta_const)
        if self.eta_const > self.eta_max:
            raise ValueError(f"eta_const must be <= eta_max, got {eta_const} > {eta_max}")
        if cooldown_shape not in ("cosine", "inv_sqrt"):
            raise ValueError(f"cooldown_shape must be 'cosine' or 'inv_sqrt', got {cooldown_shape!r}")
        if anneal_shape not in ("linear", "exponential", "cosine"):
            raise ValueError(f"anneal_shape must be 'linear', 'exponential' or 'cosine', got {anneal_shape!r}")
        if isinstance(eta_min, bool) or not isinstance(eta_min, (int, float)) or not 0 <= eta_min <= eta_const:
            raise ValueError(f"eta_min must be in [0, eta_const], got {eta_min!r}")
        if anneal_shape == "exponential" and eta_min <= 0 and anneal_steps:
            raise ValueError("eta_min must be > 0 for anneal_shape='exponential'")
        for name, value in (("warmup", warmup), ("cooldown_steps", cooldown_steps), ("anneal_steps", anneal_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative int (or fraction), got {value!r}")
        self.warmup, self.cooldown_steps, self.anneal_steps = warmup, cooldown_steps, int(anneal_steps)
        self.cooldown_shape, self.anneal_shape = cooldown_shape, anneal_shape
        self.inv_sqrt_alpha = _check_positive("inv_sqrt_alpha", inv_sqrt_alpha)
        self.eta_min = float(eta_min)

    def _h(self, x: float) -> float:
        return 1.0 / math.sqrt(1.0 + self.inv_sqrt_alpha * x) - 1.0

    def __call__(self, pos: Position) -> float:
        warm = _steps(self.warmup, pos.first_task_steps)
        cool = _steps(self.cooldown_steps, pos.first_task_steps)
        t = pos.global_step
        anneal_start = pos.total_steps - self.anneal_steps
        if self.anneal_steps and t >= anneal_start:
            y = (t - anneal_start + 1) / self.anneal_steps
            if self.anneal_shape == "linear":
                return self.eta_const + (self.eta_min - self.eta_const) * y
            if self.anneal_shape == "exponential":
                return self.eta_const * (self.eta_min / self.eta_const) ** y
            return self.eta_min + (self.eta_const - self.eta_min) * 0.5 * (1 + math.cos(math.pi * y))
        if t < warm:
            return self.eta_max * (t + 1) / warm
        if t < warm + cool:
            x = (t - warm) / cool
            if self.cooldown_shape == "cosine":
                return self.eta_const + (self.eta_max - self.eta_const) * 0.5 * (1 + math.cos(math.pi * x))
            return self.eta_max + (self.eta_const - self.eta_max) * self._h(x) / self._h(1.0)
        return self.eta_const


def build_schedule(spec: dict[str, Any] | None, learning_rate: float):
    """Schedule from a config mapping ``{kind: constant|rewarm_cosine|infinite, ...}`` (``eta_max`` defaults to
    ``learning_rate``)."""
    spec = dict(spec or {"kind": "constant"})
    kind = spec.pop("kind", "constant")
    spec.setdefault("eta_max", learning_rate)
    classes = {c.kind: c for c in (ConstantSchedule, RewarmCosineSchedule, InfiniteSchedule)}
    if kind not in classes:
        raise ValueError(f"schedule kind must be one of {sorted(classes)}, got {kind!r}")
    try:
        return classes[kind](**spec)
    except TypeError as error:
        raise ValueError(f"bad schedule options for kind={kind!r}: {error}") from error
