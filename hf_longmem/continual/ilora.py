"""I-LoRA: interpolation-based LoRA (Ren et al., "Analyzing and Reducing Catastrophic Forgetting in Parameter
Efficient Tuning", arXiv 2402.18865; reference code which47/LLMCL ``method/ILORA.py``).

Two LoRA memories share one peft model: the *working* (fast) adapter, trained by the optimizer, and the *EMA* (slow)
adapter, an interpolation of the working one after every optimizer step::

    theta_ema <- a * theta_ema + (1 - a) * theta_work,     a = min(1 - 1 / (step + 1), ema_alpha)

(``step`` counts optimizer steps from 1; the reference code's ``ema_alpha`` is 0.25, so the slow memory keeps a
quarter of its old value per step — set 0.99 or so for a slower memory.) From the second task on, every step also
draws a replay batch of the same size from a reservoir buffer (500 examples in the code) of the examples seen
before this step, and the loss is::

    (CE(new batch) + CE(replay batch)) / 2 + reg_weight * mean_layers MSE(h_work, max(h_work, h_ema))

with ``h`` the hidden states of **all** layers (embedding output included, as ``output_hidden_states``) on the replay
rows; the EMA forward runs without gradients. ``max`` is elementwise: the working model is pulled up to the slow one
only where it falls below it (the reference's ``torch.where(plastic > stable, plastic, stable)``).

Implementation notes: the EMA weights are kept by this strategy (a tensor per working-adapter parameter) and the EMA
forward uses ``torch.func.functional_call`` with them in place of the working adapter's tensors, so peft's
``set_adapter`` (which toggles ``requires_grad`` and would break DDP) is never called. The new batch and the replay
batch go through one forward (group 0 and 1 rows): DDP does not allow two forwards before one backward. The
reference code calls ``load_ema_model``, which it never defines (its method is ``update_ema_model``); the EMA here is
maintained in memory across tasks, which is the paper's rule. ``infer_with`` picks the memory used for evaluation
and publishing (the reference saves the working adapter).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from .base import Row, Strategy, check_number, register_strategy
from .replay import ReservoirBuffer

__all__ = ["ILoRA"]


@register_strategy
class ILoRA(Strategy):
    """Fast + slow (EMA) LoRA with hidden-state consistency on replayed examples.

    Args:
        ema_alpha: cap ``a`` of the EMA coefficient (reference: 0.25).
        reg_weight: weight of the consistency loss (reference: 1.0).
        buffer_size: reservoir capacity (reference: 500).
        replay_batch_size: replay rows per process and step (default: the training batch size, as the reference).
        infer_with: ``"working"`` or ``"ema"``: the adapter used for evaluation.
        seed: seed of the buffer and replay draws.
    """

    name = "ilora"
    reads_parameters = True
    needs_hidden_states = True

    def __init__(
        self,
        ema_alpha: float = 0.25,
        reg_weight: float = 1.0,
        buffer_size: int = 500,
        replay_batch_size: int | None = None,
        infer_with: str = "working",
        seed: int = 0,
    ):
        self.ema_alpha = check_number("ema_alpha", ema_alpha, low=0.0, high=1.0)
        self.reg_weight = check_number("reg_weight", reg_weight, low=0.0)
        if infer_with not in ("working", "ema"):
            raise ValueError(f"infer_with must be 'working' or 'ema', got {infer_with!r}")
        if replay_batch_size is not None and (not isinstance(replay_batch_size, int) or replay_batch_size < 1):
            raise ValueError(f"replay_batch_size must be a positive integer or None, got {replay_batch_size!r}")
        self.infer_with = infer_with
        self.replay_batch_size = replay_batch_size
        self.buffer = ReservoirBuffer(buffer_size, seed=seed)
        self.seed = seed
        self.ema: dict[str, torch.Tensor] = {}
        self.ema_steps = 0
        self.last_consistency = 0.0

    def setup(self, trainer) -> None:
        super().setup(trainer)
        names = [n for n, _ in self.trainable()]
        if not names or not all("lora_" in n for n in names):
            raise ValueError("I-LoRA needs a peft LoRA model whose only trainable parameters are LoRA weights")
        self.ema = {n: p.detach().clone() for n, p in self.trainable()}

    def select_rows(self, rows: list[Row]) -> list[Row]:
        if self.trainer.task_index == 0 or len(self.buffer) == 0:  # the reference replays from the second task on
            return rows
        n = (self.replay_batch_size or self.trainer.config.batch_size) * self.trainer.accelerator.num_processes
        rng = np.random.default_rng([self.seed, 11, self.trainer.global_step])
        return rows + [(t, i, 1) for t, i in self.buffer.sample(n, rng)]

    def extra_loss(self, batch, outputs):
        replay = batch["groups"] == 1
        if not bool(replay.any()):
            return None
        sub = {k: v[replay] for k, v in batch.items()}
        with torch.no_grad():
            stable = functional_call(
                self.trainer.unwrapped,
                {n: t.to(sub["input_ids"].device) for n, t in self.ema.items()},
                args=(),
                kwargs={
                    "input_ids": sub["input_ids"],
                    "attention_mask": sub["attention_mask"],
                    "output_hidden_states": True,
                },
                strict=False,
            ).hidden_states
        plastic = [h[replay] for h in outputs.hidden_states]
        consistency = self.consistency(plastic, stable)
        self.last_consistency = float(consistency.detach())
        return self.reg_weight * consistency

    @staticmethod
    def consistency(plastic, stable) -> torch.Tensor:
        """``mean over layers and elements of (h_p - max(h_p, h_s))^2`` (the reference's concatenated MSE)."""
        terms = [(p - torch.where(p > s, p, s.detach())) ** 2 for p, s in zip(plastic, stable)]
        return torch.cat([t.flatten() for t in terms]).mean()

    @torch.no_grad()
    def after_step(self, rows: list[Row]) -> None:
        self.ema_steps += 1
        a = min(1 - 1 / (self.ema_steps + 1), self.ema_alpha)
        for n, p in self.trainable():
            self.ema[n].mul_(a).add_(p.detach().to(self.ema[n].device), alpha=1 - a)
        for t, i, group in rows:  # the reference adds the batch to the buffer before drawing from it
            if group == 0:
                self.buffer.add((t, i))

    @contextlib.contextmanager
    def eval_context(self):
        if self.infer_with == "working":
            yield
            return
        params = dict(self.trainable())
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": {n: t.cpu() for n, t in self.ema.items()},
            "ema_steps": self.ema_steps,
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.ema.values())).device if self.ema else "cpu"
        self.ema = {n: t.to(device) for n, t in state["ema"].items()}
        self.ema_steps = int(state["ema_steps"])
        self.buffer.load_state_dict(state["buffer"])
