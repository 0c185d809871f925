"""Long-sequence training options give the plain path's loss and gradients; bad options are refused up front.

Tolerance: the chunked head runs the same per-row dot products as the full ``[batch*seq, hidden] @ [hidden, vocab]``
matmul, but the weight gradient sums chunk contributions in a different order: float32 relative error ~2**-24 times
a few terms of size ~1, well inside 1e-6. Checkpointing and offload run/copy the same numbers: exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from hf_longmem.training import (
    ActivationOffload,
    LongSequenceOptions,
    SavedTensorBytes,
    chunked_causal_lm_loss,
    chunked_token_cross_entropy,
    enable_activation_checkpointing,
    lm_head_bypassed,
)
from tests.helpers.tiny_models import tiny_config
from tests.modeling.test_cmt import CMTTester
from tests.modeling.test_hmt import HMTTester
from tests.modeling.test_longmem import LongMemTester
from tests.modeling.test_mom import MomTester
from tests.modeling.test_titans import TitansTester

TESTERS = {"titans": TitansTester, "mom": MomTester, "longmem": LongMemTester, "hmt": HMTTester, "cmt": CMTTester}


def _plain_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' ForCausalLMLoss: shift, float32, mean over labels != -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a and grads_a.keys() == grads_b.keys()
    torch.testing.assert_close(loss_b, loss_a, atol=atol, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol, rtol=0, msg=name)


def test_chunked_loss_matches_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 13, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True)
    labels = torch.randint(0, 50, (2, 13))
    labels[0, 3:6] = -100
    full = _plain_loss(head(hidden), labels)
    full_grads = torch.autograd.grad(full, (hidden, head.weight, head.bias))
    for chunk in (1, 4, 13, 100):
        loss = chunked_causal_lm_loss(hidden, head.weight, labels, chunk, bias=head.bias)
        grads = torch.autograd.grad(loss, (hidden, head.weight, head.bias))
        torch.testing.assert_close(loss, full, atol=1e-6, rtol=0)
        for got, want in zip(grads, full_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    ce, predictions = chunked_token_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], 5, bias=head.bias)
    logits = head(hidden[:, :-1]).float()
    assert torch.equal(predictions, logits.argmax(-1))
    assert torch.all(ce[0, 2:5] == 0)


def test_chunked_loss_never_saves_full_logits():
    """Saved for backward: the hidden chunks, not ``[batch, seq, vocab]`` logits."""
    hidden = torch.randn(1, 64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    labels = torch.randint(0, 1000, (1, 64))
    with SavedTensorBytes(exclude=[weight]) as full:
        _plain_loss(F.linear(hidden, weight), labels)
    with SavedTensorBytes(exclude=[weight]) as chunked:
        chunked_causal_lm_loss(hidden, weight, labels, 16)
    assert full.bytes >= 63 * 1000 * 4  # the float32 logits (or their log-softmax)
    assert chunked.bytes < 64 * 1000 * 4 // 8


def test_llama_all_options_same_gradients():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama_gqa")).train()
    ids = torch.randint(4, 97, (2, 24))
    labels = ids.clone()
    labels[1, :5] = -100
    plain = _grads(model, lambda: _plain_loss(model(input_ids=ids).logits, labels))
    options = LongSequenceOptions(activation_checkpointing=True, activation_offload=True, chunked_ce=7)
    options.prepare(model)
    assert model.is_activation_checkpointing

    def optimised():
        with options.offload(model), lm_head_bypassed(model) as head:
            hidden = model(input_ids=ids).logits
            return chunked_causal_lm_loss(hidden, head.weight, labels, options.chunked_ce, head.bias)

    _assert_same(plain, _grads(model, optimised), atol=1e-6)
    assert model(input_ids=ids[:, :4]).logits.shape[-1] == 97  # the head is restored


@pytest.mark.parametrize("name", sorted(TESTERS))
@pytest.mark.parametrize("option", ["activation_checkpointing", "activation_offload", "chunked_ce"])
def test_every_architecture_same_gradients(name, option):
    tester = TESTERS[name]()
    model = tester.create_model().train()
    ids = tester.input_ids()
    if option == "chunked_ce":
        model.requires_grad_(True)  # CMT freezes its LM; the LM loss must reach every parameter here
        plain = _grads(model, lambda: _plain_loss(model(input_ids=ids, use_cache=False).logits, ids))

        def run():
            with lm_head_bypassed(model) as head:
                hidden = model(input_ids=ids, use_cache=False).logits
                return chunked_causal_lm_loss(hidden, head.weight, ids, 3, head.bias)

        _assert_same(plain, _grads(model, run), atol=1e-6)
        return
    plain = _grads(model, lambda: tester.training_loss(model, ids))
    options = LongSequenceOptions(**{option: True})
    options.prepare(model)

    def run():
        with options.offload(model):
            return tester.training_loss(model, ids)

    _assert_same(plain, _grads(model, run), atol=0)


def test_offload_moves_non_cpu_tensors_only():
    x = torch.randn(4, 4, requires_grad=True)
    with ActivationOffload(pin_memory=False) as hooks:
        (x.sin() * 2).sum().backward()
    assert hooks.moved_bytes == 0 and hooks.kept_bytes > 0  # a CPU run has nothing to move
    torch.testing.assert_close(x.grad, 2 * x.detach().cos())


def test_refusals():
    with pytest.raises(ValueError, match="chunked_ce"):
        LongSequenceOptions(chunked_ce=-1)
    with pytest.raises(ValueError, match="chunked_ce"):
        LongSequenceOptions(chunked_ce=2.0)
    with pytest.raises(ValueError, match="activation_offload"):
        LongSequenceOptions(activation_offload="yes")
    with pytest.raises(ValueError, match="activation_checkpointing is not supported"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
    model = LlamaForCausalLM(tiny_config("llama_gqa"))
    model.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="supports_gradient_checkpointing"):
        LongSequenceOptions(activation_checkpointing=True).prepare(model)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        LongSequenceOptions(chunked_ce=8).prepare(model)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_causal_lm_loss(torch.randn(1, 4, 2), torch.randn(3, 2), torch.zeros(1, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="weight"):
        chunked_causal_lm_loss(torch.randn(1, 4, 2), torch.randn(3, 5), torch.zeros(1, 4, dtype=torch.long), 2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory"):
            ActivationOffload(pin_memory=True)
