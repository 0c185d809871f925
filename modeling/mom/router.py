"""MoM router (top-k of softmax, renormalised by default) and the Switch-style load-balancing loss."""

from __future__ import annotations

import torch
from torch import nn


class MomRouter(nn.Module):
    """``softmax(x W_g)`` over ``M`` memories, top-k; the chosen weights renormalised to sum to 1 (as in the
    official code) unless ``norm_topk_prob=False``.

    With ``topk=1`` and renormalisation the weight is always 1, so the language-model loss gives the router no
    gradient (only the load-balancing loss trains it). ``norm_topk_prob=False`` keeps the softmax probabilities as
    weights (Switch Transformer's gate; transformers' ``norm_topk_prob`` of Qwen-MoE), which trains the router
    through the output.

    Args:
        hidden_size: ``D``; num_memories: ``M``; topk: ``k``; norm_topk_prob: renormalise the top-k weights.
    """

    def __init__(self, hidden_size: int, num_memories: int, topk: int, norm_topk_prob: bool = True):
        super().__init__()
        self.num_memories = num_memories
        self.topk = topk
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_memories, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [batch, seq, D]`` -> ``logits [batch, seq, M]``, ``index [batch, seq, k]``, ``weights [batch, seq, k]``
        (float32)."""
        logits = self.gate(x)
        probs = logits.float().softmax(-1)
        weights, index = probs.topk(self.topk, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, index, weights


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], topk: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch / Mixtral auxiliary loss ``M * sum_m f_m P_m`` per layer, averaged over layers (fla's layer-wise balance).

    ``f_m`` is the fraction of routing slots that pick memory ``m`` and ``P_m`` its mean router probability, both
    over real (non-pad) tokens. 1.0 for perfectly uniform routing.

    Args:
        router_logits: one ``[batch, seq, M]`` tensor per layer.
        topk: slots per token.
        valid: ``[batch, seq]`` bool or ``None``.
    """
    losses = []
    for logits in router_logits:
        num_memories = logits.shape[-1]
        probs = logits.float().softmax(-1)
        chosen = torch.zeros_like(probs).scatter(-1, probs.topk(topk, dim=-1).indices, 1.0)
        if valid is not None:
            w = valid[..., None].to(probs.dtype)
            count = w.sum().clamp_min(1.0)
            fraction = (chosen * w).sum((0, 1)) / (count * topk)
            mean_prob = (probs * w).sum((0, 1)) / count
        else:
            fraction = chosen.mean((0, 1)) / topk
            mean_prob = probs.mean((0, 1))
        losses.append(num_memories * (fraction * mean_prob).sum())
    return torch.stack(losses).mean()
