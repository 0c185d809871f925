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

from tests.helpers.fresh_process import assert_float32_close, same_threads_env

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


def assert_fresh_process_roundtrip(
    model, folder: Path, input_ids: torch.Tensor, *, sequential_ops: int | None = None
) -> dict:
    """Save ``model`` to ``folder``, reload it in a fresh process with ``trust_remote_code=True``, compare logits.

    The child runs with this process's thread count; the logits may still differ by a float32 summation order
    (:func:`~tests.helpers.fresh_process.assert_float32_close`): ``sequential_ops`` dependent dot products (default:
    twice the model's linear layers, for the attention products between them) as wide as its widest linear layer.
    Recurrent models pass more (one chain per segment).

    Returns:
        ``{"model_module", "config_module"}`` of the classes the fresh process loaded.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "AutoConfig" in config.get("auto_map", {}), "save_pretrained wrote no auto_map for the config"
    ids_file, out_file = folder / "_ids.pt", folder / "_logits.pt"
    torch.save(input_ids, ids_file)
    env = {
        **same_threads_env(dict(os.environ)),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(folder / "_modules"),
    }
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, str(folder), str(ids_file), str(out_file)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    width = max(m.in_features for m in linears)
    assert_float32_close(torch.load(out_file), expected, sequential_ops=sequential_ops or 2 * len(linears), width=width)
    return json.loads(Path(str(out_file) + ".json").read_text())
