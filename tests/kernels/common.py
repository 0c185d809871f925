"""Shared bits of the kernel tests: device, tolerances, random inputs with pads."""

from __future__ import annotations

import os

import pytest
import torch

from hf_longmem.kernels.utils import triton_available

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
#: CUDA when the kernels run compiled (TRITON_INTERPRET=0 on a GPU machine), else CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"

needs_triton = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and not INTERPRETED),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)

TOLERANCE = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.float16: {"atol": 3e-3, "rtol": 3e-3}}


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, dtype: torch.dtype) -> None:
    """Per-dtype tolerance; infinities (the LSE of a query that sees nothing) must match exactly."""
    assert ref.shape == tri.shape, f"{name}: {tuple(ref.shape)} != {tuple(tri.shape)}"
    torch.testing.assert_close(tri.float(), ref.float(), msg=lambda m: f"{name}: {m}", **TOLERANCE[dtype])


def rand(*shape, dtype=torch.float32, seed=None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


def pad_mask(batch: int, n: int, num_new: int, kv_heads: int | None = None, seed: int = 0) -> torch.Tensor:
    """``[b, n]`` (or ``[b, Hkv, n]``) slot mask: left padding on row 0, random holes elsewhere, the last
    ``num_new`` slots (the queries' own) always real."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, n) if kv_heads is None else (batch, kv_heads, n)
    valid = torch.rand(*shape, generator=generator) > 0.3
    valid[0, ..., :5] = False
    valid[..., n - num_new :] = True
    return valid.to(DEVICE)
