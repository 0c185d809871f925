"""Saving and loading nested training state without pickle: JSON for the structure, safetensors for the tensors.

A checkpoint must never execute code when it is loaded (a crafted pickle can), so the trainer's own state — the
position in the stream, the evaluator and every strategy's ``state_dict`` — is written here instead of through
accelerate's ``register_for_checkpointing`` (which pickles it and loads it with ``weights_only=False``).

The JSON keeps Python's structure exactly: lists, tuples (``{"__tuple__": [...]}``), dicts whose keys are not all
plain strings (``{"__dict__": [[key, value], ...]}``, e.g. the evaluator's ``{task_index: accuracy}``), and tensors
(``{"__tensor__": name}``, stored in the ``.safetensors`` file beside it). Anything else is refused when saving,
naming where it was found, so that an unsupported strategy state fails at the first checkpoint, not at resume.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hf_longmem.files import atomic_write

__all__ = ["load_tree", "save_tree"]

_SCALARS = (type(None), bool, int, float, str)


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}  # JSON has no NaN/inf
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {
            "__dict__": [
                [_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()
            ]
        }
    raise TypeError(
        f"cannot checkpoint {type(value).__name__} at {where}: state must be made of None/bool/int/float/str, "
        "lists, tuples, dicts and tensors"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "__tensor__":
            return tensors[inner]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in inner)
        if tag == "__dict__":
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in inner}
        if tag == "__float__":
            return float(inner)
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def save_tree(state: Any, folder: str | os.PathLike, stem: str) -> None:
    """Writes ``state`` as ``folder/stem.json`` (+ ``folder/stem.safetensors`` if it holds tensors), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, stem)
    if tensors:
        atomic_write(folder / f"{stem}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    text = json.dumps({"format": 1, "state": encoded}, allow_nan=False)
    atomic_write(folder / f"{stem}.json", lambda tmp: tmp.write_text(text))


def load_tree(folder: str | os.PathLike, stem: str) -> Any:
    """Inverse of :func:`save_tree` (reads only JSON and safetensors: nothing in the files can run code)."""
    folder = Path(folder)
    path = folder / f"{stem}.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint is incomplete or was not written by this version")
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or document.get("format") != 1 or "state" not in document:
        raise ValueError(f"{path} is not an hf_longmem training-state file")
    tensor_file = folder / f"{stem}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.is_file() else {}
    return _decode(document["state"], tensors)
