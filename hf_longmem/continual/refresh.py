"""Refresh learning (Wang et al., "A Unified and General Framework for Continual Learning", ICLR 2024,
arXiv 2403.13249; reference code joey-wang123/CL-refresh-learning ``models/derpp.py``).

Each step is followed by an **unlearn** step on the same batch; the next step's normal update is the relearn step.
The unlearn step, as the reference ``unlearn``:

1. ``Delta = probe_lr * grad CE(batch)``: one SGD step of rate ``probe_lr`` on ``-CE`` (gradient ascent);
2. per tensor, rescale to the parameter's norm: ``Delta_hat = ||theta|| / (||Delta|| + 1e-20) * Delta``;
3. ``theta <- theta + delta * (1 / (1 + fisher_coef * F)) * (Delta_hat + noise_scale * eps)``, ``eps ~ N(0, I)``.

``F`` is a diagonal Fisher computed at each task end from per-example squared gradients weighted by the example's
likelihood ``p(y|x)`` (the reference's ``exp_cond_prob``), accumulated as ``F <- tau * F + F_new`` (``tau = 1e-5``).
Defaults are the reference's (``delta = tau = 1e-5``, probe SGD ``lr = 0.01``, ``0.001`` for both the Fisher
coefficient and the noise). Under several processes the probe gradient is all-reduced by DDP and the noise is drawn
from a generator seeded by the global step, so every replica applies the same unlearn step. Cost: one more forward and
backward per step and a Fisher the size of the trainable parameters (prefer LoRA for large models).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Row, Strategy, check_number, register_strategy

__all__ = ["Refresh"]


@register_strategy
class Refresh(Strategy):
    """Unlearn-then-relearn with a Fisher-damped, norm-rescaled gradient-ascent step.

    Args:
        delta: unlearning rate ``delta`` (reference 1e-5).
        probe_lr: SGD rate of the probe step (only its direction matters after rescaling; reference 0.01).
        fisher_coef: ``0.001`` in ``1 / (1 + 0.001 F)``.
        noise_scale: ``0.001`` in ``Delta_hat + 0.001 eps``.
        tau: Fisher decay between tasks (reference 1e-5).
        fisher_samples: examples per task for the Fisher (``None``: all).
        apply_every: unlearn every N steps (reference: every step).
        seed: seed of the noise.
    """

    name = "refresh"
    reads_parameters = True

    def __init__(
        self,
        delta: float = 1e-5,
        probe_lr: float = 0.01,
        fisher_coef: float = 0.001,
        noise_scale: float = 0.001,
        tau: float = 1e-5,
        fisher_samples: int | None = 64,
        apply_every: int = 1,
        seed: int = 0,
    ):
        self.delta = check_number("delta", delta, low=0.0)
        self.probe_lr = check_number("probe_lr", probe_lr, low=0.0, strict_low=True)
        self.fisher_coef = check_number("fisher_coef", fisher_coef, low=0.0)
        self.noise_scale = check_number("noise_scale", noise_scale, low=0.0)
        self.tau = check_number("tau", tau, low=0.0)
        if isinstance(apply_every, bool) or not isinstance(apply_every, int) or apply_every < 1:
            raise ValueError(f"apply_every must be a positive integer, got {apply_every!r}")
        self.apply_every = apply_every
        self.fisher_samples = fisher_samples
        self.seed = seed
        self.fisher: dict[str, torch.Tensor] = {}
        self._batch = None

    def before_forward(self, batch) -> None:
        self._batch = batch

    def unlearn_update(self, grads: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The additive change of each parameter for probe gradients ``grads`` (step 1-3 of the module doc)."""
        out = {}
        for n, p in self.trainable():
            if n not in grads:
                continue
            step = self.probe_lr * grads[n]
            rescaled = p.detach().norm() / (step.norm() + 1e-20) * step
            noise = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
            fisher = self.fisher.get(n)
            damp = 1.0 if fisher is None else 1.0 / (1.0 + self.fisher_coef * fisher.to(p.device))
            out[n] = self.delta * damp * (rescaled + self.noise_scale * noise)
        return out

    def after_step(self, rows: list[Row]) -> None:
        if self._batch is None or self.trainer.global_step % self.apply_every:
            return
        trainer = self.trainer
        batch = self._batch
        outputs = trainer.forward(batch)
        trainer.accelerator.backward(trainer.grouped_loss(outputs.logits, batch))
        grads = {n: p.grad.detach().clone() for n, p in self.trainable() if p.grad is not None}
        trainer.optimizer.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
        with torch.no_grad():
            updates = self.unlearn_update(grads, gen)
            for n, p in self.trainable():
                if n in updates:
                    p.add_(updates[n])
        self._batch = None

    def on_task_end(self, task: int) -> None:
        trainer = self.trainer
        model = trainer.unwrapped
        params = self.trainable()
        new = {n: torch.zeros_like(p, device="cpu") for n, p in params}
        n_ex = len(trainer.tasks[task].examples)
        count = n_ex if self.fisher_samples is None else min(n_ex, self.fisher_samples)
        for i in range(count):
            batch = trainer.make_batch([(task, i, 0)])
            model.zero_grad(set_to_none=True)
            ce, mask = trainer.token_losses(trainer.forward(batch, model=model).logits, batch["labels"])
            nll = ce.sum() / mask.sum().clamp_min(1)
            nll.backward()
            likelihood = torch.exp(-nll.detach()).cpu()
            for n, p in params:
                if p.grad is not None:
                    new[n] += likelihood * p.grad.detach().cpu() ** 2 / count
        model.zero_grad(set_to_none=True)
        self.fisher = {n: self.tau * self.fisher[n] + f if n in self.fisher else f for n, f in new.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = dict(state["fisher"])
