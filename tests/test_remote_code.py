"""The shared auto-class registration and thin remote-code shims (modeling/remote_code.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_longmem.modeling.remote_code import register_architecture, shim_source
from tests.helpers.remote_roundtrip import assert_fresh_process_roundtrip
from tests.helpers.toy_architecture import ToyMemoryConfig, ToyMemoryForCausalLM


def _toy(**kwargs):
    config = ToyMemoryConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, **kwargs,
    )
    torch.manual_seed(0)
    return ToyMemoryForCausalLM(config)


def test_registered_with_auto_classes():
    config = AutoConfig.for_model("hf_longmem_toy_memory", hidden_size=16, num_attention_heads=2)
    assert isinstance(config, ToyMemoryConfig)
    assert type(AutoModelForCausalLM.from_config(_toy().config)) is ToyMemoryForCausalLM


def test_save_pretrained_writes_auto_map_and_thin_shims(tmp_path):
    _toy().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "toy_architecture.ToyMemoryConfig",
        "AutoModelForCausalLM": "toy_architecture.ToyMemoryForCausalLM",
    }
    shim = (tmp_path / "toy_architecture.py").read_text()
    assert shim == shim_source("tests.helpers.toy_architecture", ["ToyMemoryConfig", "ToyMemoryForCausalLM"])
    assert "class " not in shim


def test_fresh_process_roundtrip_loads_the_package_classes(tmp_path):
    modules = assert_fresh_process_roundtrip(_toy(logit_shift=3.0), tmp_path, torch.tensor([[1, 2, 3, 4]]))
    assert modules["model_module"] == "tests.helpers.toy_architecture"
    assert modules["config_module"] == "tests.helpers.toy_architecture"


def test_bad_arguments():
    with pytest.raises(ValueError, match="class_names"):
        shim_source("x", [])

    class NoType(ToyMemoryConfig):
        model_type = ""

    with pytest.raises(ValueError, match="model_type"):
        register_architecture(NoType)
