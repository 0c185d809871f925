"""MIGU: magnitude-based gradient updating (Du et al., EMNLP Findings 2024, arXiv 2406.17245; wenyudu/MIGU).

During the forward pass, hooks on every ``nn.Linear`` whose weight is trained accumulate the L1 magnitude of each
output unit over the step's (non-padding) tokens; the magnitudes are L1-normalised over the layer's outputs (the
paper's "L1-normalised magnitude distribution"; normalisation does not change the ranking) and averaged over
processes (the original all-reduces with ``AVG``). After the backward pass, the gradient **rows** (output units) of
each such weight are multiplied by ``mag > quantile(mag, threshold)``: only the ~``1 - threshold`` fraction of
outputs with the largest magnitude is updated (original scripts: ``ini_threshold`` 0.7, strict ``>``). Biases are
not masked. Nothing is masked on the first task (the original's ``is_first_task``). Magnitudes reset every step.

LoRA: the hooks also catch peft's ``lora_A`` / ``lora_B`` ``nn.Linear`` modules (the only trained linears then), so
each adapter matrix is masked by its own output magnitudes — what the public code intended for its LoRA path but
never applied (its ``migu`` branch is missing from ``backward_lora_tuning``).

Caveat: with a tied ``lm_head`` (the embedded model), masking ``lm_head``'s rows also masks those tokens'
embedding updates (one tensor); ``exclude`` can leave ``lm_head`` out.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .base import Strategy, check_number, register_strategy

__all__ = ["MIGU", "row_mask"]


def row_mask(magnitude: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(out,)`` float mask: 1 where ``magnitude > quantile(magnitude, threshold)`` (as the reference code)."""
    normalised = magnitude / magnitude.sum().clamp_min(1e-12)
    return (normalised > torch.quantile(normalised.float(), threshold)).to(magnitude.dtype)


@register_strategy
class MIGU(Strategy):
    """Mask gradient rows of linear layers by their outputs' L1 magnitude.

    Args:
        threshold: quantile of the magnitudes below which rows are frozen (0.7: update the top 30%).
        skip_first_task: do not mask on the first task (as the original).
        exclude: regex of module names left unmasked (e.g. ``"lm_head"``).
    """

    name = "migu"
    reads_parameters = True

    def __init__(self, threshold: float = 0.7, skip_first_task: bool = True, exclude: str | None = None):
        self.threshold = check_number("threshold", threshold, low=0.0, high=1.0)
        self.skip_first_task = bool(skip_first_task)
        self.exclude = re.compile(exclude) if exclude else None
        self.magnitudes: dict[str, torch.Tensor] = {}
        self.modules: dict[str, torch.nn.Linear] = {}
        self.last_masks: dict[str, torch.Tensor] = {}

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.handles = []
        for name, module in trainer.unwrapped.named_modules():
            if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
                if self.exclude is not None and self.exclude.search(name):
                    continue
                self.modules[name] = module
                self.handles.append(module.register_forward_hook(self._hook(name)))
        if not self.modules:
            raise ValueError("MIGU found no trainable nn.Linear module to mask")

    def _active(self) -> bool:
        return self.trainer.model.training and not (self.skip_first_task and self.trainer.task_index == 0)

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not self._active() or not torch.is_grad_enabled():
                return
            out = output.detach().abs()
            mask = getattr(self, "_token_mask", None)
            if mask is not None and out.dim() == 3 and mask.shape == out.shape[:2]:
                out = out * mask[..., None].to(out.dtype)
            mag = out.reshape(-1, out.shape[-1]).sum(0)
            self.magnitudes[name] = self.magnitudes.get(name, 0) + mag

        return hook

    def before_forward(self, batch) -> None:
        self.magnitudes = {}
        self._token_mask = batch["attention_mask"]

    def after_backward(self) -> None:
        if not self._active():
            return
        acc = self.trainer.accelerator
        self.last_masks = {}
        for name, module in self.modules.items():
            if name not in self.magnitudes or module.weight.grad is None:
                continue
            mag = self.magnitudes[name]
            mag = mag / mag.sum().clamp_min(1e-12)
            if acc.num_processes > 1:
                mag = acc.reduce(mag, reduction="mean")
            mask = row_mask(mag, self.threshold)
            module.weight.grad.mul_(mask[:, None].to(module.weight.grad.dtype))
            self.last_masks[name] = mask
        self.magnitudes = {}

    def state_dict(self) -> dict[str, Any]:
        return {}
