"""Fresh-process ``save_pretrained`` -> ``from_pretrained(trust_remote_code=True)`` round trip for architectures.

:func:`assert_fresh_process_roundtrip` saves a model, then loads it in a NEW Python process through
``AutoModelForCausalLM`` (no prior ``import hf_longmem`` there: only the shims in the folder lead to the package),
runs the same input and compares the logits with the in-process model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

_LOADER = r"""
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
path, ids_file, out_file = sys.argv[1:4]
assert "hf_longmem" not in sys.modules
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, out_file)
json.dump({"model_module": type(model).__module__, "config_module": type(config).__module__}, open(out_file + ".json", "w"))
"""


def assert_fresh_process_roundtrip(model, folder: Path, input_ids: torch.Tensor, *, atol: float = 1e-5) -> dict:
    """Save ``model`` to ``folder``, reload it in a fresh process with ``trust_remote_code=True``, compare logits.

    Returns:
        ``{"model_module", "config_module"}`` of the classes the fresh process loaded.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "AutoConfig" in config.get("auto_map", {}), "save_pretrained wrote no auto_map for the config"
    ids_file, out_file = folder / "_ids.pt", folder / "_logits.pt"
    torch.save(input_ids, ids_file)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_MODULES_CACHE": str(folder / "_modules")}
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, str(folder), str(ids_file), str(out_file)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    torch.testing.assert_close(torch.load(out_file), expected, atol=atol, rtol=1e-4)
    return json.loads(Path(str(out_file) + ".json").read_text())
