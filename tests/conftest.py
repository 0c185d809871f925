"""Shared fixtures: tiny random models built from configs (never downloaded)."""

from __future__ import annotations

import importlib.util
import os

# One thread by default, for this process and the subprocesses tests start (inherited through OMP_NUM_THREADS):
# the tiny models gain nothing from more, and on a busy machine OpenMP threads that wait for a core spin — the
# contract tests took 84 s with 2 threads vs 8 s with 1 while another job kept the 2 cores busy.
THREADS = os.environ.get("HF_LONGMEM_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
os.environ.setdefault("MKL_NUM_THREADS", THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(THREADS))

# Triton kernels: without a GPU they run on CPU tensors under the interpreter, which must be chosen before triton
# is first imported (TRITON_INTERPRET=0 on a GPU machine runs tests/kernels compiled, on CUDA tensors). Under the
# interpreter an autotuner would time every config; keep the first.
os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ["TRITON_INTERPRET"] == "1" and importlib.util.find_spec("triton") is not None:
    from triton.runtime.autotuner import Autotuner

    Autotuner.prune_configs = lambda self, kwargs: self.configs[:1]

from tests.helpers.tiny_models import MODEL_SHAPES, tiny_model  # noqa: E402


@pytest.fixture(params=sorted(MODEL_SHAPES))
def shape_name(request):
    return request.param


@pytest.fixture(params=["sdpa", "eager"])
def attn_impl(request):
    return request.param


@pytest.fixture
def llama_gqa():
    return tiny_model("llama_gqa", "sdpa")
