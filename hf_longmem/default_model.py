"""The embedded default model: a small Llama trained by ``recipes/train_tiny.py`` on the synthetic tasks.

It ships in ``hf_longmem/assets/tiny-longmem`` and loads offline. It answers the pass-key, multi-key / multi-value /
multi-query needle, fictional-fact and shared-context prompts of :mod:`hf_longmem.evals.tasks` up to its training
length (1k tokens) and fails beyond it; variable tracking is learned only in part. See the model card
(``README.md`` in that folder) for accuracy by task and length, with n and intervals.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_PATH: Path = Path(__file__).resolve().parent / "assets" / "tiny-longmem"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _check_assets(path: Path) -> None:
    missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the default model assets are missing from {path}: {missing}. Reinstall hf_longmem, or train them "
            "with `python recipes/train_tiny.py --config recipes/configs/train_tiny_v4.yaml` followed by "
            "`--config recipes/configs/train_tiny_v4_stage2.yaml`, and copy the second run's output there."
        )
    with open(path / "model.safetensors", "rb") as handle:
        if handle.read(24).startswith(b"version https://git-lfs"):
            raise FileNotFoundError(f"{path / 'model.safetensors'} is a Git LFS pointer; run `git lfs pull`")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (or its name), got {dtype!r}")
    return resolved


def load_default_model(
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded tiny model and its tokenizer from the package assets (never from the network).

    Args:
        device: where to put the model (``None``: CPU).
        dtype: floating dtype of the weights (``None``: float32, as trained), e.g. ``torch.bfloat16``.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its word-level tokenizer (left padding,
        BOS prepended). Prompts continue with ``" " + answer`` then EOS, e.g. ``"... The pass key is"`` ->
        ``" 71432"``.

    Raises:
        FileNotFoundError: if the assets are missing (or are unfetched Git LFS pointers).
        ValueError: for a bad ``dtype``.
    """
    resolved = _resolve_dtype(dtype)
    _check_assets(DEFAULT_MODEL_PATH)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_PATH, local_files_only=True, dtype=resolved)
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    model.eval()
    return model, tokenizer
