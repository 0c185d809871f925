"""Weight- and output-space regularizers: L2 to the previous weights, EWC, and EcoTTA's self-distillation.

- :class:`L2Anchor`: ``lam * sum_i (theta_i - theta*_i)^2`` with ``theta*`` the weights at the end of the previous
  task (Smith et al., "A Closer Look at Rehearsal-Free Continual Learning", CVPR-W 2023, who find plain L2 beats EWC
  with pretrained models; ``param_regex`` restricts it, e.g. to attention).
- :class:`EWC`: ``(lam / 2) * sum_i F_i (theta_i - theta*_i)^2`` (Kirkpatrick et al., PNAS 2017) with the diagonal
  empirical Fisher ``F_i = E_x[(d log p(y|x) / d theta_i)^2]`` estimated per example (batch size 1, so it is the
  mean of squared per-example gradients, not the square of a batch gradient) on ``fisher_samples`` examples of the
  task just finished. ``mode="separate"`` keeps one (Fisher, anchor) pair per task; ``mode="online"`` keeps one
  pair with ``F <- gamma F + F_new`` and the latest anchor (Schwarz et al. 2018, as Avalanche's ``EWCPlugin``).
  ``log p(y|x)`` is the model's summed token log-likelihood of the example's loss tokens.
- :class:`EcoTTA`: the self-distilled regularization of EcoTTA (Song et al., CVPR 2023, arXiv 2303.01904):
  ``lam * sum_k L1(h_k(x), h_k^frozen(x))`` between the adapted model's and the frozen original model's outputs of
  ``K`` partitions (here: the hidden states at ``partitions`` block boundaries; padding excluded), added to the task
  loss. With a peft model the frozen original is the base model under ``disable_adapter()``; for full fine-tuning a
  frozen copy of the initial model is kept. ``main_loss="entropy"`` is the paper's unlabeled mode: the task's cross
  entropy is replaced by entropy minimisation with EATA's reliable-sample filter (which EcoTTA adopts),
  ``mean over kept positions of H(p)`` with ``H(p) = -sum_v p_v log p_v`` the entropy of the next-token distribution
  and only positions with ``H < entropy_margin * ln V`` kept (EATA's ``E0 = 0.4 ln C``); it is computed on the
  *prompt* positions only (those before the answer, whose predictions never see it), and the distillation too, so
  no label or answer token enters the objective. ``main_loss="ce"`` (default) keeps the task's cross entropy (continual
  training with labels) and adds the distillation. Deviations: a sample of the paper is an image with one class
  distribution; here every prompt position is a sample with a next-token distribution over the vocabulary; EATA's
  additional re-weighting ``1 / exp(H - E0)`` and redundancy filter are not applied (EcoTTA's description keeps the
  entropy threshold only).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from typing import Any

import torch

from .base import Strategy, check_number, register_strategy

__all__ = ["EWC", "EcoTTA", "L2Anchor"]


def _select(named, regex: str | None) -> list[tuple[str, torch.nn.Parameter]]:
    pattern = re.compile(regex) if regex else None
    return [(n, p) for n, p in named if pattern is None or pattern.search(n)]


@register_strategy
class L2Anchor(Strategy):
    """L2 penalty to the weights at the end of the previous task.

    Args:
        lam: penalty weight ``lambda`` (Smith et al. sweep 1e-3 .. 5e-1).
        param_regex: only parameters whose name matches (``re.search``); default all trainable.
    """

    name = "l2"
    reads_parameters = True

    def __init__(self, lam: float = 0.1, param_regex: str | None = None):
        self.lam = check_number("lam", lam, low=0.0)
        self.param_regex = param_regex
        self.anchor: dict[str, torch.Tensor] = {}

    def on_task_end(self, task: int) -> None:
        self.anchor = {n: p.detach().cpu().clone() for n, p in _select(self.trainable(), self.param_regex)}

    def penalty(self) -> torch.Tensor | None:
        """``sum_i (theta_i - theta*_i)^2`` over the anchored parameters (``None`` before the first anchor)."""
        if not self.anchor:
            return None
        terms = [((p - self.anchor[n].to(p.device)) ** 2).sum() for n, p in self.trainable() if n in self.anchor]
        return torch.stack(terms).sum()

    def extra_loss(self, batch, outputs):
        penalty = self.penalty()
        return None if penalty is None else self.lam * penalty

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = dict(state["anchor"])


@register_strategy
class EWC(Strategy):
    """Elastic weight consolidation with a diagonal empirical Fisher.

    Args:
        lam: ``lambda`` of ``(lambda / 2) sum F (theta - theta*)^2``.
        mode: ``"separate"`` (one penalty per earlier task) or ``"online"``.
        gamma: decay of the online Fisher.
        fisher_samples: examples of the finished task used for the Fisher (``None``: all).
        param_regex: restrict to matching parameter names.
    """

    name = "ewc"
    reads_parameters = True

    def __init__(
        self,
        lam: float = 100.0,
        mode: str = "separate",
        gamma: float = 1.0,
        fisher_samples: int | None = 64,
        param_regex: str | None = None,
    ):
        self.lam = check_number("lam", lam, low=0.0)
        if mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online', got {mode!r}")
        self.mode = mode
        self.gamma = check_number("gamma", gamma, low=0.0, high=1.0)
        if fisher_samples is not None and (
            isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1
        ):
            raise ValueError(f"fisher_samples must be a positive integer or None, got {fisher_samples!r}")
        self.fisher_samples = fisher_samples
        self.param_regex = param_regex
        self.terms: list[dict[str, dict[str, torch.Tensor]]] = []  # [{"fisher": {...}, "anchor": {...}}]

    def compute_fisher(self, task: int) -> dict[str, torch.Tensor]:
        """Mean squared per-example gradient of the example's log-likelihood, on the unwrapped model.

        Every process computes it on the same examples (identical result, no communication needed).
        """
        trainer = self.trainer
        model = trainer.unwrapped
        params = _select(self.trainable(), self.param_regex)
        fisher = {n: torch.zeros_like(p, device="cpu") for n, p in params}
        n_examples = len(trainer.tasks[task].examples)
        count = n_examples if self.fisher_samples is None else min(self.fisher_samples, n_examples)
        was_training = model.training
        model.eval()
        for i in range(count):
            batch = trainer.make_batch([(task, i, 0)])
            model.zero_grad(set_to_none=True)
            ce, _ = trainer.token_losses(trainer.forward(batch, model=model).logits, batch["labels"])
            ce.sum().backward()  # -log p(y|x) of the example's loss tokens
            for n, p in params:
                if p.grad is not None:
                    fisher[n] += p.grad.detach().cpu() ** 2 / count
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return fisher

    def on_task_end(self, task: int) -> None:
        fisher = self.compute_fisher(task)
        anchor = {n: p.detach().cpu().clone() for n, p in _select(self.trainable(), self.param_regex)}
        if self.mode == "online" and self.terms:
            old = self.terms[0]["fisher"]
            fisher = {n: self.gamma * old[n] + f for n, f in fisher.items()}
            self.terms = []
        self.terms.append({"fisher": fisher, "anchor": anchor})

    def penalty(self) -> torch.Tensor | None:
        """``sum_terms sum_i F_i (theta_i - theta*_i)^2`` (without ``lambda / 2``; ``None`` before the first task end)."""
        if not self.terms:
            return None
        params = dict(self.trainable())
        total = []
        for term in self.terms:
            for n, f in term["fisher"].items():
                p = params[n]
                total.append((f.to(p.device) * (p - term["anchor"][n].to(p.device)) ** 2).sum())
        return torch.stack(total).sum()

    def extra_loss(self, batch, outputs):
        penalty = self.penalty()
        return None if penalty is None else 0.5 * self.lam * penalty

    def state_dict(self) -> dict[str, Any]:
        return {"terms": self.terms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.terms = list(state["terms"])


@register_strategy
class EcoTTA(Strategy):
    """Self-distilled regularization: L1 between adapted and frozen hidden states at block boundaries.

    Args:
        lam: weight of the regularizer (EcoTTA's sample code: 2.0).
        partitions: number ``K`` of partitions (hidden states at ``K`` evenly spaced block boundaries, the last one
            being the final block's output), or an explicit list of hidden-state indices (0 = embeddings).
        main_loss: ``"ce"`` (the task's cross entropy) or ``"entropy"`` (unlabeled: filtered entropy minimisation on
            the prompt positions).
        entropy_margin: the filter keeps positions with entropy below ``entropy_margin * ln(vocab size)`` (EATA/EcoTTA
            0.4); in ``(0, 1]``, 1 keeps every position.
    """

    name = "ecotta"
    needs_hidden_states = True

    def __init__(
        self, lam: float = 2.0, partitions: int | list[int] = 4, main_loss: str = "ce", entropy_margin: float = 0.4
    ):
        self.lam = check_number("lam", lam, low=0.0)
        if main_loss not in ("ce", "entropy"):
            raise ValueError(f"main_loss must be 'ce' or 'entropy', got {main_loss!r}")
        self.main_loss = main_loss
        self.entropy_margin = check_number("entropy_margin", entropy_margin, low=0.0, high=1.0, strict_low=True)
        self.last_kept = 0.0
        if isinstance(partitions, bool) or not (
            (isinstance(partitions, int) and partitions >= 1)
            or (isinstance(partitions, list) and partitions and all(isinstance(i, int) and i >= 0 for i in partitions))
        ):
            raise ValueError(f"partitions must be a positive int or a list of hidden-state indices, got {partitions!r}")
        self.partitions = partitions
        self.frozen: torch.nn.Module | None = None

    def setup(self, trainer) -> None:
        super().setup(trainer)
        model = trainer.unwrapped
        self.is_peft = callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")
        if not self.is_peft:  # full fine-tuning: keep the original network, frozen
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        layers = model.config.num_hidden_layers if hasattr(model, "config") else None
        if isinstance(self.partitions, int):
            if layers is None or self.partitions > layers:
                raise ValueError(f"partitions={self.partitions} exceeds the model's {layers} layers")
            self.indices = [round(layers * (k + 1) / self.partitions) for k in range(self.partitions)]
        else:
            self.indices = list(self.partitions)

    def frozen_hidden_states(self, batch) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            if self.frozen is not None:
                return self.trainer.forward(batch, model=self.frozen, output_hidden_states=True).hidden_states
            model = self.trainer.unwrapped
            with model.disable_adapter():
                return self.trainer.forward(batch, model=model, output_hidden_states=True).hidden_states

    def distillation(self, hidden: tuple[torch.Tensor, ...], frozen: tuple[torch.Tensor, ...], mask) -> torch.Tensor:
        """``sum_k mean_{tokens, dims} |h_k - h_k^frozen|`` over the partition boundaries (padding excluded)."""
        m = mask[..., None].to(hidden[0].dtype)
        terms = []
        for k in self.indices:
            diff = (hidden[k] - frozen[k].detach()).abs() * m
            terms.append(diff.sum() / (m.sum() * hidden[k].shape[-1]).clamp_min(1))
        return torch.stack(terms).sum()

    @staticmethod
    def prompt_mask(batch) -> torch.Tensor:
        """``(B, T)`` bool: the real tokens before each row's answer (their predictions never see the answer)."""
        before_answer = batch["answer_mask"].long().cumsum(-1) == 0
        return before_answer & batch["attention_mask"].bool()

    def entropy_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean entropy of the next-token distributions at the ``mask`` positions whose entropy is below the margin
        (zero, still attached to the graph, when none is)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)  # [B, T]
        keep = mask & (entropy.detach() < self.entropy_margin * math.log(logits.shape[-1]))
        self.last_kept = float(keep.sum()) / max(1, int(mask.sum()))
        return (entropy * keep).sum() / keep.sum().clamp_min(1)

    def task_loss(self, batch, outputs):
        if self.main_loss != "entropy":
            return None
        return self.entropy_loss(outputs.logits, self.prompt_mask(batch))

    def extra_loss(self, batch, outputs):
        frozen = self.frozen_hidden_states(batch)
        mask = self.prompt_mask(batch) if self.main_loss == "entropy" else batch["attention_mask"]
        return self.lam * self.distillation(outputs.hidden_states, frozen, mask)

    @contextlib.contextmanager
    def eval_context(self):
        yield
