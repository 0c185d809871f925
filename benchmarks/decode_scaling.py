"""Decode time per token vs context length, for any ``AutoModelForCausalLM`` config.

A recurrent-memory model (MoM, Titans) should decode in constant time per token, whatever the context; an
attention model (the Llama baseline) reads a KV cache that grows with it. For each model and context length ``n``,
the script prefills ``n`` random tokens (with the model's own cache), then times ``--new_tokens`` greedy decode steps
(one token each, batch 1) and reports the median milliseconds per token (best of ``--repeats`` rounds that visit
the contexts in turn), and the ratio of each context's time to the shortest context's.

    python benchmarks/decode_scaling.py                                   # MoM vs a Llama, 1k..8k
    python benchmarks/decode_scaling.py --models recipes/configs/memory_mom_m4.yaml llama \\
        --contexts 1024 2048 4096 8192 --out benchmarks/results/decode_scaling.json

``--models`` entries are preset names (``mom``, ``llama``) or YAML files with a ``model:`` section
``{model_type: ..., **config kwargs}`` (the format of ``recipes/train_memory_model.py``, so any architecture that
recipe trains, e.g. ``recipes/configs/memory_titans_mag.yaml``). Random weights: decode time does not depend on them.
Criterion of issue 5: per-token time at 8k within 1.2x of 1k for the recurrent models.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 512

PRESETS: dict[str, dict[str, Any]] = {
    # MoM of memory_mom_m4.yaml's shape (4 memories, top-2)
    "mom": dict(
        model_type="mom_gdn",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=16,
        num_memories=4,
        topk=2,
        shared_mem=False,
        conv_size=4,
    ),
    # attention baseline of the same width and depth (full causal attention, KV cache grows with the context)
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=65536,
        attn_implementation="sdpa",
    ),
}


def model_spec(entry: str) -> tuple[str, dict[str, Any]]:
    """``(name, {model_type, **kwargs})`` from a preset name or a YAML file with a ``model:`` section."""
    if entry in PRESETS:
        return entry, dict(PRESETS[entry])
    path = Path(entry)
    if not path.is_file():
        raise ValueError(f"--models entry {entry!r} is neither a preset {sorted(PRESETS)} nor a YAML file")
    spec = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(spec, dict) or "model_type" not in spec:
        raise ValueError(f"{entry}: needs a `model:` mapping with a model_type")
    return path.stem, dict(spec)


def build(spec: dict[str, Any]) -> torch.nn.Module:
    kwargs = dict(spec)
    model_type = kwargs.pop("model_type")
    attn = kwargs.pop("attn_implementation", None)
    if model_type not in CONFIG_MAPPING:
        importlib.import_module("hf_longmem.modeling")
        if model_type not in CONFIG_MAPPING:
            importlib.import_module(f"hf_longmem.modeling.{model_type}")
    kwargs.setdefault("vocab_size", VOCAB)
    kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    extra = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_config(config, **extra).eval()


@torch.no_grad()
def decode_times(model, contexts: list[int], new_tokens: int, repeats: int, warmup: int = 2) -> dict[int, dict]:
    """Median ms per decoded token for each context (best of ``repeats`` rounds).

    Every context is prefilled once; the rounds then visit the contexts in turn (interleaved, so a burst of load
    on a shared machine hits every context alike), each decoding ``new_tokens`` more tokens from where the last
    round stopped (an attention cache grows by ``repeats * (warmup + new_tokens)`` tokens over the run).
    """
    vocab = model.config.vocab_size
    state, result = {}, {}
    for context in contexts:
        prompt = torch.randint(3, vocab, (1, context), generator=torch.Generator().manual_seed(context))
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        result[context] = {"prefill_s": time.perf_counter() - start, "ms_per_token": float("inf")}
        state[context] = (out.cache, out.logits[:, -1:].argmax(-1))
    for _ in range(repeats):
        for context in contexts:
            cache, token = state[context]
            steps = []
            for i in range(warmup + new_tokens):
                start = time.perf_counter()
                out = model(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                if i >= warmup:
                    steps.append(time.perf_counter() - start)
            state[context] = (cache, token)
            result[context]["ms_per_token"] = min(result[context]["ms_per_token"], statistics.median(steps) * 1e3)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mom", "llama"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep_denormals", action="store_true", help="do not flush subnormal floats to zero")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_scaling.json"))
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.contexts) or args.new_tokens < 1 or args.repeats < 1:
        raise ValueError("--contexts, --new_tokens and --repeats must be positive")
    torch.set_num_threads(args.threads)
    # Strong learned decays (alpha = exp(g) down to ~1e-40) make subnormal floats in the recurrent update; x86 CPUs
    # compute on subnormals ~30x slower, which shows up as random per-token spikes unrelated to context length.
    # Flush them to zero (values below 1.2e-38 are numerically irrelevant here); --keep_denormals to see the effect.
    torch.set_flush_denormal(not args.keep_denormals)
    try:
        return _run(args)
    finally:
        torch.set_flush_denormal(False)  # the process default


def _run(args) -> dict:
    contexts = sorted(args.contexts)
    rows = []
    for entry in args.models:
        name, spec = model_spec(entry)
        model = build(spec)
        timings = decode_times(model, contexts, args.new_tokens, args.repeats)
        base = timings[contexts[0]]["ms_per_token"]
        for context in contexts:
            timing = timings[context]
            row = {
                "model": name,
                "model_type": spec["model_type"],
                "context_length": context,
                **timing,
                "ratio_to_shortest": timing["ms_per_token"] / base,
            }
            rows.append(row)
            print(
                f"{name:>16} ctx {context:>6}: {row['ms_per_token']:.3f} ms/token "
                f"(x{row['ratio_to_shortest']:.2f} of ctx {contexts[0]}), prefill {row['prefill_s']:.2f} s",
                flush=True,
            )
    result = {
        "meta": {
            "benchmark": "decode_scaling",
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
            "device": "cpu",
            "flush_denormal": not args.keep_denormals,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "command": " ".join(["python", *sys.argv]),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2))
    os.replace(temporary, args.out)
    return result


if __name__ == "__main__":
    main()
