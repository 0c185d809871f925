"""Comparing tensors computed in another Python process.

Two processes give bit-identical float32 results only when they run the same kernels with the same number of
threads (the thread count decides how a matmul or a reduction is split, hence the order of its sums). The test
process caps itself at 2 threads (``tests/conftest.py``) while a fresh process would take one per core, so a child
gets the parent's count through :func:`same_threads_env`; the comparison still allows for a different summation
order (:func:`assert_float32_close`), since a BLAS may pick kernels by the CPU's load or alignment.
"""

from __future__ import annotations

import torch

#: float32 unit roundoff.
FLOAT32_U = 2.0**-24


def same_threads_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` plus the thread-count variables that make a child use this process's ``torch.get_num_threads()``."""
    threads = str(torch.get_num_threads())
    return {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def float32_tolerance(reference: torch.Tensor, sequential_ops: int, width: int) -> float:
    """Absolute tolerance for a float32 result recomputed with another summation order.

    Each of ``sequential_ops`` dependent dot products of length ``width`` contributes at most ``width * u`` relative
    error (the classical bound for a sum in another order); the errors add along the chain and scale with the
    result's magnitude.
    """
    return sequential_ops * width * FLOAT32_U * max(1.0, float(reference.abs().max()))


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, *, sequential_ops: int, width: int) -> None:
    atol = float32_tolerance(expected, sequential_ops, width)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
