"""O-LoRA: orthogonal subspace learning (Wang et al., "Orthogonal Subspace Learning for Language Model Continual
Learning", EMNLP Findings 2023, arXiv 2310.14152).

Each task ``t`` learns its own LoRA ``(A_t, B_t)``; the LoRAs of earlier tasks stay in the forward pass, frozen; and
the loss adds ``lambda_1 * sum_{i<t} sum_modules ||A_i A_t^T||^2`` (squared entries of the overlap of the row spaces
of the ``A`` matrices; ``lambda_1 = 0.5`` in the paper) plus ``lambda_2 * ||A_t, B_t||^2`` (``lambda_2 = 0`` in the
paper's runs).

Implementation on one peft LoRA of rank ``num_tasks * r`` (``peft.r`` in the config): task ``t`` owns rows
``[t r, (t + 1) r)`` of every ``lora_A`` and the same columns of ``lora_B``. The sum of per-task LoRAs equals this one
adapter (``B A = sum_t B_t A_t``), with a common scaling ``alpha / (num_tasks r)`` instead of ``alpha / r`` (a
constant learning-rate factor). Gradients outside the current block are zeroed and, at each task start, the AdamW
moments of the frozen blocks are reset so that they receive exactly no update; future blocks have ``B = 0`` and so
contribute nothing. The parameter set never changes, so DDP and the optimizer are prepared once.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Strategy, check_number, register_strategy

__all__ = ["OLoRA"]


@register_strategy
class OLoRA(Strategy):
    """Per-task LoRA blocks with an orthogonality loss between the current and earlier ``A`` blocks.

    Args:
        lambda_orth: ``lambda_1`` (paper 0.5).
        lambda_l2: ``lambda_2`` (paper 0).
    """

    name = "olora"

    def __init__(self, lambda_orth: float = 0.5, lambda_l2: float = 0.0):
        self.lambda_orth = check_number("lambda_orth", lambda_orth, low=0.0)
        self.lambda_l2 = check_number("lambda_l2", lambda_l2, low=0.0)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        named = dict(self.trainable())
        self.pairs = []
        for n, p in named.items():
            if ".lora_A." in n:
                b = n.replace(".lora_A.", ".lora_B.")
                if b not in named:
                    raise ValueError(f"O-LoRA: no lora_B for {n}")
                self.pairs.append((n, p, b, named[b]))
        if not self.pairs or len(named) != 2 * len(self.pairs):
            raise ValueError("O-LoRA needs a peft LoRA model whose only trainable parameters are lora_A / lora_B")
        rank = self.pairs[0][1].shape[0]
        num_tasks = len(trainer.tasks)
        if rank % num_tasks:
            raise ValueError(f"O-LoRA: the LoRA rank {rank} must be a multiple of the number of tasks {num_tasks}")
        self.block = rank // num_tasks

    def rows(self, task: int) -> slice:
        return slice(task * self.block, (task + 1) * self.block)

    def orthogonality(self, task: int) -> torch.Tensor | None:
        """``sum_modules ||A_old A_t^T||^2`` with ``A_old`` the rows of all earlier tasks."""
        if task == 0:
            return None
        cur, old = self.rows(task), slice(0, task * self.block)
        terms = [((a[old].detach() @ a[cur].T) ** 2).sum() for _, a, _, _ in self.pairs]
        return torch.stack(terms).sum()

    def extra_loss(self, batch, outputs):
        task = self.trainer.task_index
        loss = None
        orth = self.orthogonality(task)
        if orth is not None and self.lambda_orth:
            loss = self.lambda_orth * orth
        if self.lambda_l2:
            cur = self.rows(task)
            l2 = torch.stack([(a[cur] ** 2).sum() + (b[:, cur] ** 2).sum() for _, a, _, b in self.pairs]).sum()
            loss = self.lambda_l2 * l2 if loss is None else loss + self.lambda_l2 * l2
        return loss

    def _block_masks(self, task: int):
        cur = self.rows(task)
        for _, a, _, b in self.pairs:
            mask_a = torch.zeros_like(a)
            mask_a[cur] = 1
            mask_b = torch.zeros_like(b)
            mask_b[:, cur] = 1
            yield a, mask_a
            yield b, mask_b

    @torch.no_grad()
    def on_task_start(self, task: int) -> None:
        state = self.trainer.optimizer.state
        for p, mask in self._block_masks(task):
            for key in ("exp_avg", "exp_avg_sq"):
                if p in state and key in state[p]:
                    state[p][key].mul_(mask)

    @torch.no_grad()
    def after_backward(self) -> None:
        for p, mask in self._block_masks(self.trainer.task_index):
            if p.grad is not None:
                p.grad.mul_(mask)

    def state_dict(self) -> dict[str, Any]:
        return {}
