"""modeling/causal_lm.py: logits slicing and the shifted loss shared by the MoM and Titans LM heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_longmem.modeling.causal_lm import causal_lm_logits, shifted_cross_entropy


def test_logits_to_keep_selects_positions():
    torch.manual_seed(0)
    head, hidden = nn.Linear(8, 11, bias=False), torch.randn(2, 5, 8)
    full = causal_lm_logits(head, hidden, 0)
    assert full.shape == (2, 5, 11)
    torch.testing.assert_close(causal_lm_logits(head, hidden, 2), full[:, -2:])
    torch.testing.assert_close(causal_lm_logits(head, hidden, torch.tensor([0, 3])), full[:, [0, 3]])


def test_shifted_loss_ignores_minus_100_and_checks_lengths():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    labels[1, 3] = -100
    kept = labels[:, 1:].flatten() != -100
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1)[kept], labels[:, 1:].flatten()[kept])
    torch.testing.assert_close(shifted_cross_entropy(logits, labels), expected)
    with pytest.raises(ValueError, match="logits_to_keep"):
        shifted_cross_entropy(logits[:, -1:], labels)
