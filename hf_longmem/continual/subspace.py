"""Subspace-constrained full fine-tuning with adaptive SVD (after Nayak et al., "Sculpting Subspaces: Constrained
Full Fine-Tuning in LLMs for Continual Learning", arXiv 2504.07097; peft's ``OSFConfig``).

At the start of every task, each target weight ``W`` (``(out, in)``) is decomposed, ``W = U S V^T``, and its top
``r`` singular directions ``U_h = U[:, :r]``, ``V_h = V[:, :r]`` are protected: updates must lie in the orthogonal
complement of both. After the backward pass every target gradient is projected::

    G <- (I - U_h U_h^T) G (I - V_h V_h^T)

(the two one-sided projections of OSF's gradient hooks on ``U_low`` and ``V_low``, applied to the full matrix), and
with ``project_update=True`` (default) the optimizer's actual change ``dW`` is projected the same way after the step,
so the update stays exactly orthogonal to the protected directions even with AdamW, whose per-coordinate scaling and
weight decay otherwise break the orthogonality (the caveat peft's OSF documents).

Adaptive rank: ``r`` is the smallest rank whose singular values hold ``energy`` of ``W``'s squared Frobenius norm,
capped at ``max_rank_fraction * min(out, in)`` — so the pretrained model's dominant directions (task 0) and then the
directions the earlier tasks grew are frozen, and the rank adapts per matrix to its spectrum. Deviation: the paper
allocates ranks from layer importance scores; here the spectrum decides. The SVD is recomputed from the current
weights at each task start (the merged result of all earlier tasks, as OSF's ``merge_and_unload`` + re-wrap).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .base import Strategy, check_number, register_strategy

__all__ = ["SubspaceFT", "adaptive_rank", "project"]


def adaptive_rank(singular_values: torch.Tensor, energy: float, max_rank: int) -> int:
    """Smallest ``r`` with ``sum_{i<r} s_i^2 >= energy * sum s_i^2``, at most ``max_rank``."""
    power = singular_values.double() ** 2
    cumulative = power.cumsum(0) / power.sum().clamp_min(1e-30)
    r = int((cumulative < energy).sum().item()) + 1
    return max(0, min(r, max_rank))


def project(matrix: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(I - u u^T) matrix (I - v v^T)`` for ``matrix`` ``(out, in)``, ``u`` ``(out, r)``, ``v`` ``(in, r)``."""
    left = matrix - u @ (u.T @ matrix)
    return left - (left @ v) @ v.T


@register_strategy
class SubspaceFT(Strategy):
    """Full fine-tuning restricted to the complement of each weight's top singular subspace.

    Args:
        energy: fraction of the squared spectrum whose directions are protected.
        max_rank_fraction: cap of the protected rank as a fraction of ``min(out, in)`` (peft's OSF default keeps 50%).
        target_regex: which 2-D weights (default: the attention and MLP projections of the decoder blocks).
        project_update: also project the optimizer's update after the step (exact orthogonality under AdamW).
    """

    name = "subspace"
    reads_parameters = True

    def __init__(
        self,
        energy: float = 0.5,
        max_rank_fraction: float = 0.5,
        target_regex: str = r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$",
        project_update: bool = True,
    ):
        self.energy = check_number("energy", energy, low=0.0, high=1.0)
        self.max_rank_fraction = check_number("max_rank_fraction", max_rank_fraction, low=0.0, high=1.0)
        self.target = re.compile(target_regex)
        self.project_update = bool(project_update)
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._before: dict[str, torch.Tensor] = {}

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.params = {n: p for n, p in self.trainable() if p.ndim == 2 and self.target.search(n)}
        if not self.params:
            raise ValueError("subspace: target_regex matches no trainable 2-D weight")

    @torch.no_grad()
    def on_task_start(self, task: int) -> None:
        self.bases = {}
        for n, p in self.params.items():
            u, s, vh = torch.linalg.svd(p.detach().float().cpu(), full_matrices=False)
            r = adaptive_rank(s, self.energy, int(self.max_rank_fraction * min(p.shape)))
            self.bases[n] = (u[:, :r].contiguous(), vh[:r].T.contiguous())

    def protected_rank(self) -> dict[str, int]:
        return {n: u.shape[1] for n, (u, _) in self.bases.items()}

    @torch.no_grad()
    def after_backward(self) -> None:
        for n, p in self.params.items():
            if n in self.bases and p.grad is not None:
                u, v = (t.to(p.device, p.grad.dtype) for t in self.bases[n])
                p.grad.copy_(project(p.grad, u, v))
                if self.project_update:
                    self._before[n] = p.detach().clone()

    @torch.no_grad()
    def after_step(self, rows) -> None:
        for n, before in self._before.items():
            p = self.params[n]
            u, v = (t.to(p.device, p.dtype) for t in self.bases[n])
            p.copy_(before + project(p - before, u, v))
        self._before = {}

    def state_dict(self) -> dict[str, Any]:
        return {"bases": self.bases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bases = dict(state["bases"])
