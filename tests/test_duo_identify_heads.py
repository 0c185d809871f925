"""recipes/duo_identify_heads.py: the gated attention, the schedule, and a short run on a tiny random model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_longmem import enable_longmem_attention
from hf_longmem.cache_classes.duo_attention import (
    DuoAttentionCache,
    load_head_pattern,
    load_head_pattern_metadata,
    num_streaming_heads,
)
from tests.helpers.tiny_models import random_ids, tiny_model
from tests.helpers.tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "duo_identify_heads.py"
CONFIG = ROOT / "recipes" / "configs" / "duo_identify_heads.yaml"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("duo_identify_heads", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_shipped_config_parses_and_overrides_apply(recipe):
    args = ["--config", str(CONFIG), "--steps", "7", "--sparsity", "0.25", "--model", "m", "--output", "o.json"]
    config = recipe.parse_config(args)
    assert (config.steps, config.sparsity, config.model, config.output) == (7, 0.25, "m", "o.json")
    assert config.learning_rate == 0.02 and config.reg_weight == 0.05 and config.initial_value == 1.0
    with pytest.raises(ValueError, match="sparsity"):
        recipe.parse_config(["--config", str(CONFIG), "--sparsity", "1.0"])
    # the official schedule: warmup and decay over 1/5 of the steps each, floor 0.1, at least one step
    factors = [recipe.lr_factor(step, config) for step in range(config.steps)]
    assert factors[0] == pytest.approx(1 / 1) and max(factors) == 1.0
    config.steps = 10
    assert [round(recipe.lr_factor(s, config), 2) for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 0.5]


def masked_hidden(model, ids, allowed):
    with torch.no_grad():
        return model.base_model(ids, attention_mask=allowed[None, None]).last_hidden_state


def test_gated_attention_mixes_full_and_streaming_and_restores_the_model(recipe):
    model = tiny_model("llama_gqa")
    ids = random_ids(1, 24)
    total, sink, recent = 24, 2, 5
    i, j = torch.arange(total)[:, None], torch.arange(total)[None, :]
    causal = j <= i
    streaming = causal & ((j < sink) | (i - j < recent))
    gates = torch.nn.Parameter(torch.ones(2, 2))
    gated = recipe.GatedAttention(gates, sink, recent)
    gated.set_batch(torch.ones(1, total, dtype=torch.long))
    with recipe.gated_attention(model, gated):
        assert model.config._attn_implementation == recipe.GATED_ATTENTION_NAME
        with torch.no_grad():
            at_one = model.base_model(ids).last_hidden_state
            gates.zero_()
            at_zero = model.base_model(ids).last_hidden_state
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(at_one, masked_hidden(model, ids, causal), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at_zero, masked_hidden(model, ids, streaming), rtol=1e-5, atol=1e-5)


def test_tiny_run_learns_gates_and_writes_a_loadable_pattern(recipe, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama_gqa").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    config = yaml.safe_load(CONFIG.read_text())
    config.update(min_length=256, max_length=320, num_length_intervals=4, sink_size=4, recent_size=16, batch_size=2)
    config.update(num_threads=0, log_every=5)
    config_path = tmp_path / "duo.yaml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "heads" / "duo_attention_heads.json"
    argv = ["--config", str(config_path), "--model", str(model_dir), "--steps", "30", "--output", str(output)]
    summary = recipe.main(argv, progress=False)

    metadata = load_head_pattern_metadata(output)
    losses = [record["loss"] for record in metadata["history"]]
    assert len(losses) == 30 and losses[0] == pytest.approx(0.05, abs=1e-6)  # gates at 1: distillation loss 0
    assert sum(losses[-5:]) / 5 < losses[0]
    gates = load_head_pattern(output)
    assert gates.shape == (2, 2) and bool(((gates >= 0) & (gates <= 1)).all()) and float(gates.mean()) < 1.0
    assert summary["num_streaming_heads"] == metadata["num_streaming_heads"] == num_streaming_heads(4, 0.5)
    assert sum(not kept for row in metadata["retrieval"] for kept in row) == 2

    model = tiny_model("llama_gqa")
    enable_longmem_attention(model)
    cache = DuoAttentionCache(head_pattern=output, sparsity=0.5, sink_size=4, recent_size=8, config=model.config)
    assert cache.retrieval_pattern.tolist() == metadata["retrieval"]
    out = model.generate(random_ids(1, 30), cache=cache, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 34)
    assert max(layer.get_streaming_length() for layer in cache.layers) == 12
