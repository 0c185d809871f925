"""Lifelong model editing with WISE side memories (Wang et al., NeurIPS 2024, arXiv 2405.14768).

- :class:`WISEConfig`, :class:`WISEEditor`: edit facts into a causal LM, route per sequence, save/load, publish;
- :mod:`.data`: ZsRE-format loader (:func:`load_edits`), fictional facts (:func:`fictional_facts`), unrelated prompts;
- :mod:`.evaluate`: reliability / generalization / locality (teacher-forced token accuracy), sequential evaluation
  over T edits, and the fine-tuning baseline.
"""

from .config import MERGE_ALGORITHMS, WISEConfig
from .data import EditRecord, fictional_facts, load_edits, unrelated_prompts
from .editor import EditStats, WISEEditor
from .side_memory import WISELayer, default_layer

__all__ = [
    "MERGE_ALGORITHMS",
    "EditRecord",
    "EditStats",
    "WISEConfig",
    "WISEEditor",
    "WISELayer",
    "default_layer",
    "fictional_facts",
    "load_edits",
    "unrelated_prompts",
]
