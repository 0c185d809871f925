"""Lifelong model editing with WISE side memories (Wang et al., NeurIPS 2024, arXiv 2405.14768).

- :class:`WISEConfig`, :class:`WISEEditor`: edit facts into a causal LM, route per sequence, save/load, publish;
- :mod:`.data`: ZsRE-format loader (:func:`load_edits`), fictional facts (:func:`fictional_facts`), unrelated prompts;
- :mod:`.evaluate`: reliability / generalization / locality (teacher-forced token accuracy), sequential evaluation
  over T edits, and the fine-tuning baseline.

The names are imported on first use (PEP 562), so that ``hf_longmem.editing.command`` (the ``hf-longmem edit``
arguments) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MERGE_ALGORITHMS": "config",
    "WISEConfig": "config",
    "EditRecord": "data",
    "fictional_facts": "data",
    "load_edits": "data",
    "unrelated_prompts": "data",
    "EditStats": "editor",
    "WISEEditor": "editor",
    "WISELayer": "side_memory",
    "default_layer": "side_memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
