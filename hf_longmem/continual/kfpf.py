"""k-FPF (Zhao et al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023, arXiv 2304.04158).

Forgetting concentrates in a few forgetting-prone modules. k-FPF trains the stream with the plain loss (no replay at
every step) and, ``k`` times periodically and regardless of task boundaries (every ``fpf_every`` optimizer steps),
**fine-tunes only those modules** for ``fpf_steps`` SGD steps of rate ``fpf_lr`` on batches of a small reservoir
buffer of the examples seen so far (k-FPF-CE; the loss is the trainer's cross entropy on the buffer rows).

Which modules: the paper finds them from training dynamics (for CNNs the normalisation layers and the last layer).
For decoder LLMs the default ``fpf_params="auto"`` takes every normalisation weight plus the last decoder block —
the analogue the paper's analysis suggests (deviation: not re-derived per model); any regex can replace it.
Every process runs the same FPF steps on the same buffer rows (identical updates, no communication).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from .base import Row, Strategy, check_number, register_strategy
from .replay import ReservoirBuffer

__all__ = ["KFPF"]


@register_strategy
class KFPF(Strategy):
    """Periodic fine-tuning of forgetting-prone parameters on a small buffer.

    Args:
        fpf_every: run FPF every N optimizer steps (``k = total_steps // fpf_every``).
        fpf_steps: SGD steps per FPF phase.
        fpf_lr: SGD learning rate of the FPF phases.
        fpf_batch_size: buffer rows per FPF step.
        buffer_size: reservoir capacity.
        fpf_params: ``"auto"`` (norms + last block) or a regex over parameter names.
        seed: seed of the buffer and the FPF draws.
    """

    name = "kfpf"
    reads_parameters = True

    def __init__(
        self,
        fpf_every: int = 50,
        fpf_steps: int = 10,
        fpf_lr: float = 0.01,
        fpf_batch_size: int = 16,
        buffer_size: int = 200,
        fpf_params: str = "auto",
        seed: int = 0,
    ):
        for name, value in (("fpf_every", fpf_every), ("fpf_steps", fpf_steps), ("fpf_batch_size", fpf_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.fpf_every, self.fpf_steps, self.fpf_batch_size = fpf_every, fpf_steps, fpf_batch_size
        self.fpf_lr = check_number("fpf_lr", fpf_lr, low=0.0, strict_low=True)
        self.buffer = ReservoirBuffer(buffer_size, seed=seed)
        self.fpf_params = fpf_params
        self.seed = seed
        self.num_phases = 0

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if self.fpf_params == "auto":
            layers = getattr(getattr(trainer.unwrapped, "config", None), "num_hidden_layers", None)
            last = rf"|layers\.{layers - 1}\." if layers else ""
            pattern = re.compile(rf"norm{last}")
        else:
            pattern = re.compile(self.fpf_params)
        self.selected = [(n, p) for n, p in self.trainable() if pattern.search(n)]
        if not self.selected:
            raise ValueError(f"fpf_params={self.fpf_params!r} matches no trainable parameter")

    def fpf_phase(self) -> None:
        """``fpf_steps`` SGD steps on buffer batches, updating only the selected parameters."""
        trainer = self.trainer
        model = trainer.unwrapped
        params = [p for _, p in self.selected]
        for k in range(self.fpf_steps):
            rng = np.random.default_rng([self.seed, 13, trainer.global_step, k])
            rows = [(t, i, 0) for t, i in self.buffer.sample(self.fpf_batch_size, rng)]
            batch = trainer.make_batch(rows)
            model.zero_grad(set_to_none=True)
            loss = trainer.grouped_loss(trainer.forward(batch, model=model).logits, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p.add_(g, alpha=-self.fpf_lr)
        model.zero_grad(set_to_none=True)
        self.num_phases += 1

    def after_step(self, rows: list[Row]) -> None:
        for t, i, group in rows:
            if group == 0:
                self.buffer.add((t, i))
        if self.trainer.global_step % self.fpf_every == 0 and len(self.buffer):
            self.fpf_phase()

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "num_phases": self.num_phases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.num_phases = int(state["num_phases"])
