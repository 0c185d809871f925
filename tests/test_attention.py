"""The registered hf_longmem attention: a transparent fallback, and the hook methods use to see queries."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from hf_longmem import enable_longmem_attention
from hf_longmem.attention import ATTENTION_NAME, EAGER_ATTENTION_NAME, LAYER_KWARG, fallback_attention
from hf_longmem.cache_classes.streaming import StreamingLayer
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model


@pytest.mark.parametrize("impl, expected", [("sdpa", ATTENTION_NAME), ("eager", EAGER_ATTENTION_NAME)])
def test_enabling_keeps_outputs_identical_with_padding(impl, expected):
    model = tiny_model("llama_gqa", impl)
    batch = torch.cat((random_ids(1, 12), torch.cat((torch.zeros(1, 5, dtype=torch.long), random_ids(1, 7)), 1)))
    mask = (batch != 0).long()
    ref_seq, ref_logits = greedy(model, batch, DynamicCache(), attention_mask=mask, pad_token_id=0)
    assert enable_longmem_attention(model) == expected
    assert model.config._attn_implementation == expected
    seq, logits = greedy(model, batch, DynamicCache(), attention_mask=mask, pad_token_id=0)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert enable_longmem_attention(model) == expected  # idempotent


class RecordingLayer(StreamingLayer):
    """A layer that asks for the attention call and records the query shapes it receives."""

    def __init__(self):
        super().__init__(budget=1000)
        self.query_shapes = []

    def update(self, key_states, value_states, *args, **kwargs):
        kwargs["kwargs"][LAYER_KWARG] = self
        return super().update(key_states, value_states, *args, **kwargs)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        self.query_shapes.append(tuple(query.shape))
        return fallback_attention(module, module.config._attn_implementation)(
            module, query, key, value, attention_mask, **kwargs
        )


def test_a_layer_in_the_kwargs_gets_the_attention_call():
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 10)
    ref_seq, ref_logits = greedy(model, ids, DynamicCache(), max_new_tokens=3)
    enable_longmem_attention(model)
    layers = [RecordingLayer() for _ in range(model.config.num_hidden_layers)]
    seq, logits = greedy(model, ids, Cache(layers=list(layers)), max_new_tokens=3)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert layers[0].query_shapes == [(1, 4, 10, 16), (1, 4, 1, 16), (1, 4, 1, 16)]
