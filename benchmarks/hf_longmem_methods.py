"""hf_longmem caches as methods of the shared kvpress baseline harness (``--plugin benchmarks.hf_longmem_methods``).

Each factory gets the harness's compression ratio (fraction of the KV removed, kvpress's convention) and builds the
hf_longmem equivalent of a kvpress press:

* ``hf_longmem:snapkv`` — SnapKV keeping ``int(context * (1 - ratio))`` prompt tokens (window 64, kernel 5, as
  ``kvpress:snapkv``);
* ``hf_longmem:think`` — ThinK with ``key_channel_ratio = ratio`` and no token eviction (as ``kvpress:think``, which
  zeroes channels instead of removing them);
* ``hf_longmem:duo_attention`` — DuoAttention with ``ratio`` of the KV heads streaming, sink 64 + recent 256, and
  the same random head scores kvpress's harness entry uses (no trained pattern exists for a random model);
* ``hf_longmem:streaming`` — StreamingLLM with 4 sinks and ``int(context * (1 - ratio))`` tokens.
"""

from __future__ import annotations

import numpy as np
import torch

import hf_longmem


def _budget(ratio: float, args) -> int:
    return max(2, int(args.context * (1 - ratio)))


def _method(make, note: str) -> dict:
    return {"make_cache": make, "note": note}


def snapkv(ratio, model, args):
    budget = _budget(ratio, args)
    return _method(
        lambda m: hf_longmem.make_cache("snapkv", m, budget=budget, window_size=64, kernel_size=5),
        f"budget={budget} window=64 kernel=5; tokens removed",
    )


def think(ratio, model, args):
    return _method(
        lambda m: hf_longmem.make_cache("think", m, base="full", key_channel_ratio=ratio),
        "key channels removed (packed storage), no token eviction",
    )


def duo_attention(ratio, model, args):
    rng = np.random.default_rng(0)
    gates = torch.tensor(rng.random((model.config.num_hidden_layers, model.config.num_key_value_heads)))
    return _method(
        lambda m: hf_longmem.make_cache(
            "duo_attention", m, head_pattern=gates, sparsity=ratio, sink_size=64, recent_size=256
        ),
        "streaming heads stored separately (sink 64 + recent 256); random head scores",
    )


def streaming(ratio, model, args):
    budget = _budget(ratio, args)
    return _method(
        lambda m: hf_longmem.make_cache("streaming", m, budget=budget, sink_size=4), f"budget={budget} sinks=4"
    )


METHODS = {
    "hf_longmem:snapkv": snapkv,
    "hf_longmem:think": think,
    "hf_longmem:duo_attention": duo_attention,
    "hf_longmem:streaming": streaming,
}
