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

__all__ = ["OLoRA", "RegLoRA"]


@register_strategy
class OLoRA(Strategy):
    """Per-task LoRA blocks with an orthogonality loss between the current and earlier ``A`` blocks.

    Args:
        lambda_orth: ``lambda_1`` (paper 0.5).
        lambda_l2: ``lambda_2`` (paper 0).
    """

    name = "olora"
    reads_parameters = True

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


@register_strategy
class RegLoRA(OLoRA):
    """RegLoRA of SEFE (Chen et al., "SEFE: Superficial and Essential Forgetting Eliminator for Multimodal Continual
    Instruction Tuning", ICML 2025, arXiv 2505.02486; reference jinpeng0528/SEFE).

    After each task, the key elements of that task's LoRA update ``dW_t = B_t A_t`` — the top ``top_p`` (2%) entries of
    ``|dW_t|`` per module — join a per-module set kept across tasks; while training a later task the loss adds
    ``lam * mean_modules mean |dW_current[key elements]|`` (``lam = 2.5e3`` in the reference), so the new update leaves
    the earlier tasks' most important weight entries alone. SEFE merges each task's LoRA into the base before the next
    task; the per-task blocks of :class:`OLoRA` (frozen after their task, summed in the forward) are that merge without
    changing the parameter set. ``dW`` is taken without peft's ``alpha / r`` scaling (a constant absorbed by ``lam``).
    ASD, SEFE's data-side answer-style rewriting, is not part of this strategy.

    Args:
        top_p: fraction of each module's entries kept as key elements per task.
        lam: weight of the regularizer.
        lambda_orth: O-LoRA's orthogonality weight, 0 by default (not part of RegLoRA).
    """

    name = "reglora"
    reads_parameters = True

    def __init__(self, top_p: float = 0.02, lam: float = 2.5e3, lambda_orth: float = 0.0):
        super().__init__(lambda_orth=lambda_orth, lambda_l2=0.0)
        self.top_p = check_number("top_p", top_p, low=0.0, high=1.0, strict_low=True)
        self.lam = check_number("lam", lam, low=0.0)
        self.key_masks: dict[str, torch.Tensor] = {}

    def delta(self, a: torch.Tensor, b: torch.Tensor, task: int) -> torch.Tensor:
        """``dW_task = B[:, block] A[block]`` of one module, ``(out, in)``."""
        rows = self.rows(task)
        return b[:, rows] @ a[rows]

    @torch.no_grad()
    def on_task_end(self, task: int) -> None:
        for name, a, _, b in self.pairs:
            d = self.delta(a, b, task).abs().flatten()
            k = max(1, int(round(self.top_p * d.numel())))
            mask = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
            mask[d.topk(k).indices] = True
            mask = mask.view(b.shape[0], a.shape[1]).cpu()
            self.key_masks[name] = self.key_masks[name] | mask if name in self.key_masks else mask

    def regularizer(self, task: int) -> torch.Tensor | None:
        """``mean_modules mean |dW_task[key elements]|`` (``None`` before the first task end)."""
        if not self.key_masks:
            return None
        terms = []
        for name, a, _, b in self.pairs:
            mask = self.key_masks[name].to(a.device)
            terms.append(self.delta(a, b, task)[mask].abs().mean())
        return torch.stack(terms).mean()

    def extra_loss(self, batch, outputs):
        loss = super().extra_loss(batch, outputs)
        reg = self.regularizer(self.trainer.task_index)
        if reg is not None and self.lam:
            loss = self.lam * reg if loss is None else loss + self.lam * reg
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"key_masks": self.key_masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.key_masks = dict(state["key_masks"])
