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
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        **kwargs,
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


def test_checkpoint_records_the_version_and_the_shim_says_what_to_install(tmp_path):
    import subprocess
    import sys

    from hf_longmem.version import __version__

    _toy().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hf_longmem_version"] == __version__
    assert AutoConfig.from_pretrained(tmp_path).hf_longmem_version == __version__
    # A machine without the package: importing the shim names the version and the install instructions.
    blocker = (
        "import sys, runpy\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tests' or name.startswith(('tests.', 'hf_longmem')):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"runpy.run_path({str(tmp_path / 'toy_architecture.py')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"written with hf_longmem {__version__}" in proc.stderr and "pip install" in proc.stderr
    assert "#install" in proc.stderr


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
