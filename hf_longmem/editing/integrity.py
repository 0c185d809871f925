"""Integrity of saved edits: file digests, a fingerprint of the base weight the side memory was trained against, and
JSON encoding of the edit log."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """sha256 of the bytes plus dtype-independent samples, to recognise the base weight the edits were made on."""
    data = weight.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
    flat = data.float()
    index = torch.linspace(0, flat.numel() - 1, min(64, flat.numel())).long()
    return {
        "sha256": digest,
        "dtype": str(weight.dtype).replace("torch.", ""),
        "samples": [float(v) for v in flat[index]],
        "abs_mean": float(flat.abs().mean()),
    }


def same_base(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    if saved.get("sha256") == current["sha256"]:
        return True
    if saved.get("dtype") == current["dtype"]:
        return False  # same dtype, different bytes: another base
    samples = torch.tensor(saved.get("samples") or [], dtype=torch.float64)
    now = torch.tensor(current["samples"], dtype=torch.float64)
    if samples.shape != now.shape:
        return False
    scale = max(float(saved.get("abs_mean") or 0.0), 1e-12)
    return bool(torch.allclose(samples, now, rtol=1e-2, atol=1e-2 * scale))


def json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
