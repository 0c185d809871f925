"""The hooks through which continual-learning strategies stack on :class:`~hf_longmem.continual.trainer.ContinualTrainer`.

Every strategy subclasses :class:`Strategy` and overrides only the hooks it needs. The trainer calls them in the
order of its ``strategies`` list, at fixed points of each step::

    on_stream_start                      once (after the optimizer exists; also after a resume)
    on_task_start(task)                  each task
      rows = select_rows(rows)           which examples form the batch (replay, view-batch)
      before_forward(batch)              e.g. refresh learning's unlearn step
      outputs = model(**batch)
      loss += extra_loss(batch, outputs) regularizers (EWC, L2, I-LoRA, EcoTTA, O-LoRA)
      backward
      after_backward()                   gradient masks (MIGU, subspace projection), before clipping
      optimizer step
      after_step(rows)                   EMA, buffer insertion, periodic k-FPF
    on_task_end(task)                    Fisher, anchors, SVD bases
    eval_context()                       a context manager evaluation runs in (e.g. I-LoRA's EMA weights)

Rows are ``(task_index, example_index, group)`` tuples: ``group`` 0 rows are the training batch, ``group`` 1 rows
are appended replay rows that a strategy consumes in ``extra_loss`` (the trainer averages the cross entropy per
group, as I-LoRA's ``(CE_new + CE_buffer) / 2``). A strategy's whole state is in ``state_dict`` (plain Python and
tensors), saved with every checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .trainer import ContinualTrainer

__all__ = ["STRATEGIES", "Row", "Strategy", "build_strategy", "register_strategy"]

Row = tuple[int, int, int]

#: name -> Strategy subclass (filled by :func:`register_strategy`).
STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` buildable by its ``name`` from configs."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name`")
    STRATEGIES[cls.name] = cls
    return cls


def build_strategy(spec: dict[str, Any]) -> Strategy:
    """``{"name": "ewc", "lam": 100.0, ...}`` -> ``EWC(lam=100.0, ...)``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a strategy spec must be a mapping with a 'name', got {spec!r}")
    options = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy name {name!r}; known: {sorted(STRATEGIES)}")
    try:
        return STRATEGIES[name](**options)
    except TypeError as error:
        raise ValueError(f"bad options for strategy {name!r}: {error}") from error


class Strategy:
    """Base class: every hook is a no-op.

    Attributes:
        trainer: set by :meth:`setup`; gives access to ``accelerator``, ``model`` (prepared), ``unwrapped``,
            ``tasks``, ``task_index``, ``global_step`` and ``config``.
        needs_hidden_states: the trainer then runs the forward with ``output_hidden_states=True``.
        reads_parameters: the strategy reads or rewrites whole parameters or gradients per parameter shape (masks,
            projections, Fisher, anchors, EMA copies), which FSDP / ZeRO shard; the trainer then refuses sharded
            engines up front, naming it.
    """

    name: str = ""
    needs_hidden_states: bool = False
    reads_parameters: bool = False

    def setup(self, trainer: ContinualTrainer) -> None:
        """Called once before the optimizer is built (the model is already wrapped by peft if configured)."""
        self.trainer = trainer

    def on_stream_start(self) -> None:
        """After the optimizer exists, before the first step (also after resuming)."""

    def on_task_start(self, task: int) -> None:
        """Before the first step of ``task`` (not called again when resuming in the middle of it)."""

    def select_rows(self, rows: list[Row]) -> list[Row]:
        """Return the rows of this step's batch (default: unchanged)."""
        return rows

    def before_forward(self, batch: dict[str, torch.Tensor]) -> None:
        """Before the training forward of ``batch``."""

    def task_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """A scalar replacing the task's cross entropy (e.g. an unlabeled objective), or ``None`` (keep it)."""
        return None

    def extra_loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """A term added to the loss (scalar tensor) or ``None``."""
        return None

    def after_backward(self) -> None:
        """After ``accelerator.backward`` (gradients synchronised), before clipping and the optimizer step."""

    def after_step(self, rows: list[Row]) -> None:
        """After the optimizer step; ``rows`` are the global batch's rows."""

    def on_task_end(self, task: int) -> None:
        """After the last step of ``task``, before the accuracy-matrix row is evaluated."""

    @contextlib.contextmanager
    def eval_context(self) -> Iterator[None]:
        """Context in which evaluation runs (default: nothing changes)."""
        yield

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (plain Python objects and CPU tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    # helpers -----------------------------------------------------------------------------------------------------
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of the unwrapped model's trainable parameters."""
        return [(n, p) for n, p in self.trainer.unwrapped.named_parameters() if p.requires_grad]


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None, strict_low=False):
    """Validate a numeric option (``ValueError`` naming it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if low is not None and (value < low or (strict_low and value == low)):
        raise ValueError(f"{name} must be {'>' if strict_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return value
