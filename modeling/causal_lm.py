"""Pieces every ``<Name>ForCausalLM`` of the memory architectures shares (MoM, Titans).

The embedding accessors are transformers' own defaults (``self.model.embed_tokens`` and ``self.lm_head``, as for
``LlamaForCausalLM``); what is left to share is the logits slice and the shifted next-token loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_lm_logits(lm_head: nn.Module, hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """``lm_head`` over the positions ``logits_to_keep`` selects (``0``: all; an int ``k``: the last ``k``; a tensor:
    those indices), as transformers' models do.

    Args:
        hidden: ``[batch, seq, hidden]``.

    Returns:
        ``[batch, kept, vocab]``.
    """
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return lm_head(hidden[:, keep, :])


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: position ``t`` predicts ``labels[t + 1]``; ``-100`` labels are ignored.

    Args:
        logits: ``[batch, seq, vocab]`` (all positions: ``logits_to_keep=0``).
        labels: ``[batch, seq]``.
    """
    if logits.shape[1] != labels.shape[1]:
        raise ValueError(
            f"`labels` ({labels.shape[1]} positions) need logits for every position (got {logits.shape[1]}: "
            "pass logits_to_keep=0 with labels)"
        )
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
    )
