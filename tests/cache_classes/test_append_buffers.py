"""Append buffers (CompressedLayer.append_slots): in-place decoding appends are a storage detail only.

They are on for CUDA tensors by default; the tests switch them on for CPU.
"""

from __future__ import annotations

import pytest
import torch

from hf_longmem import make_cache
from hf_longmem.cache_classes.base import CompressedLayer
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids, tiny_model


@pytest.fixture(autouse=True)
def _in_place_on_cpu(monkeypatch):
    monkeypatch.setattr(CompressedLayer, "append_in_place", True)


def _plain_append(self, name, new):
    return torch.cat((getattr(self, name), new), dim=2)


def test_off_on_cpu_by_default(monkeypatch):
    monkeypatch.setattr(CompressedLayer, "append_in_place", None)
    model = tiny_model("llama_gqa")
    cache = make_cache("snapkv", model, budget=12, window_size=4)
    greedy(model, random_ids(1, 30), cache, max_new_tokens=6)
    assert all(not layer._append_buffers for layer in cache.layers)


def test_decoding_writes_in_place_and_equals_concatenation(monkeypatch):
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    cache = make_cache("snapkv", model, budget=12, window_size=4)
    seq, logits = greedy(model, ids, cache, max_new_tokens=10)
    for layer in cache.layers:
        assert set(layer._append_buffers) == {"keys", "values"}  # decoding positions are kept lazily
        buffer, view = layer._append_buffers["keys"]
        assert layer.keys is view and layer.keys.data_ptr() == buffer.data_ptr()
        assert buffer.shape[2] > layer.keys.shape[2]  # spare slots behind the stored ones
        assert layer.memory_bytes() > sum(
            t.nbytes for t in (layer.keys, layer.values, layer.positions, layer.real_seen)
        )
        assert layer.positions.shape == layer.keys.shape[:3]

    monkeypatch.setattr(CompressedLayer, "append_slots", _plain_append)
    plain = make_cache("snapkv", model, budget=12, window_size=4)
    plain_seq, plain_logits = greedy(model, ids, plain, max_new_tokens=10)
    assert torch.equal(seq, plain_seq)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)
    for layer, plain_layer in zip(cache.layers, plain.layers):
        for name in ("keys", "values", "positions"):
            assert torch.equal(getattr(layer, name), getattr(plain_layer, name))


def test_layers_that_compress_every_step_keep_plain_tensors():
    model = tiny_model("llama_gqa")
    cache = make_cache("h2o", model, budget=12)
    greedy(model, random_ids(1, 30), cache, max_new_tokens=6)
    for layer in cache.layers:
        assert not layer._append_buffers
        assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes


def test_beam_reorder_drops_the_buffer():
    model = tiny_model("llama_gqa")
    cache = make_cache("snapkv", model, budget=12, window_size=4)
    out = model.generate(random_ids(1, 20), cache=cache, max_new_tokens=8, num_beams=2, do_sample=False)
    assert out.shape == (1, 28)
    for layer in cache.layers:
        for name, (_, view) in layer._append_buffers.items():
            assert getattr(layer, name) is view


def test_lazy_decoding_positions_equal_eager_ones(monkeypatch):
    """Scored layers keep decoding positions as a count; reading them gives what appending them would."""
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 30)
    cache = make_cache("snapkv", model, budget=12, window_size=4)
    greedy(model, ids, cache, max_new_tokens=7)
    assert all(layer._tail_count == 6 for layer in cache.layers)  # the last generated token is never fed back
    lazy = [layer.positions.clone() for layer in cache.layers]
    assert all(layer._tail_count == 0 for layer in cache.layers)

    monkeypatch.setattr(type(cache.layers[0]), "appends_only", lambda self: False)
    eager = make_cache("snapkv", model, budget=12, window_size=4)
    greedy(model, ids, eager, max_new_tokens=7)
    for positions, layer in zip(lazy, eager.layers):
        assert torch.equal(positions, layer.positions)
        assert positions[0, 0, -6:].tolist() == list(range(30, 36))
