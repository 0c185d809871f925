"""WISE's losses: cross entropy on the target tokens and the activation-margin losses that route edits to the side
memory."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .config import WISEConfig


def target_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the mean cross-entropy of each row's target tokens.

    Args:
        logits: ``(R, L, V)``.
        input_ids: ``(R, L)``.
        target_mask: ``(R, L)`` bool, True at target tokens (rows without any are skipped).

    Returns:
        scalar.
    """
    labels = input_ids[:, 1:].masked_fill(~target_mask[:, 1:], -100)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
    counts = target_mask[:, 1:].sum(-1)
    keep = counts > 0
    return (ce.sum(-1)[keep] / counts[keep]).mean()


def mean_positive(values: torch.Tensor) -> torch.Tensor:
    positive = values[values > 0]
    return positive.mean() if positive.numel() else values.new_zeros(())


def margin_losses(in_scores: torch.Tensor, out_scores: torch.Tensor, config: WISEConfig) -> torch.Tensor:
    """Paper Eq. 5 / EasyEdit ``__cal_activation_loss``: routing margins on sequence scores.

    Args:
        in_scores: ``(R_in,)`` scores of the edit rows.
        out_scores: ``(R_out,)`` scores of the irrelevant rows.
        config: gives ``alpha``, ``beta``, ``gamma``.

    Returns:
        scalar ``mean+(out - alpha) + mean+(beta - in) + mean+(out - in + gamma)``.
    """
    margin = out_scores.view(-1, 1) - in_scores.view(1, -1) + config.gamma
    return mean_positive(out_scores - config.alpha) + mean_positive(config.beta - in_scores) + mean_positive(margin)
