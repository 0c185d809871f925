"""Parity of one training step between two copies of a model (e.g. Triton kernels vs the torch path)."""

from __future__ import annotations

import torch


def assert_same_training_step(reference, other, input_ids: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Forward with ``labels=input_ids`` and backward on both models (same weights, in train mode); asserts equal
    logits and equal gradients for every parameter (named in the failure). Returns the reference logits, detached."""
    out_ref, out_other = reference(input_ids, labels=input_ids), other(input_ids, labels=input_ids)
    out_ref.loss.backward()
    out_other.loss.backward()
    torch.testing.assert_close(out_other.logits, out_ref.logits, atol=atol, rtol=rtol)
    for (name, p), q in zip(reference.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=rtol, msg=name)
    return out_ref.logits.detach()
