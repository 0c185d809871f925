"""What each registered cache adds to a decode step: aten ops dispatched and Python time, next to DynamicCache.

On a GPU at batch 1 a decode step is bound by kernel launches and Python, so the number of aten ops a cache
dispatches per step is a deterministic proxy for what it costs there (issue 20). For every registered cache
(options from the registry's ``options_for_budget``) and transformers' DynamicCache, the script prefills a random
prompt into a tiny Llama, decodes a few warm-up tokens, then counts the aten ops of the next ``--steps`` decode steps
with a ``TorchDispatchMode`` (and the ops of the prefill), and times steps without the counter.

    python benchmarks/decode_overhead.py                         # 4 layers, 1k prompt, budget 256 (issue 20)
    python benchmarks/decode_overhead.py --markdown docs/decode_overhead.md --out runs/decode_overhead.json

The table: ops per step (median over the counted steps, and the largest), per layer (step / layers), the ratio to
DynamicCache, prefill ops, and the median wall time of a step (CPU, the tiny model: mostly Python and dispatch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import hf_longmem
from hf_longmem.files import atomic_write_text

#: The tiny Llama of issue 20's measurements (GQA: 4 query heads over 2 KV heads).
MODEL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=65536,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def half_retrieval_heads(model) -> list[list[bool]]:
    """DuoAttention pattern ``[layers][kv_heads]``: every other (layer, KV head) a retrieval head (no pattern is
    shipped for a random model; the paper streams half the heads of GQA models)."""
    heads = model.config.num_key_value_heads
    return [[(layer + head) % 2 == 0 for head in range(heads)] for layer in range(model.config.num_hidden_layers)]


#: Options merged over ``options_for_budget`` (functions of the model) where that alone cannot build the cache.
EXTRA_OPTIONS = {"duo_attention": {"head_pattern": half_retrieval_heads}}

#: Issue 20's per-step targets, as a multiple of DynamicCache's ops per step.
TARGETS = {"infllm": 2.0, "emllm": 2.0}
DEFAULT_TARGET = 1.1


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched under it (``ops``: name -> count)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def tiny_llama(layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, **MODEL)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return model


def build_cache(name: str, model, budget: int):
    """A fresh cache: ``"dynamic"`` is transformers' DynamicCache, else a registered hf_longmem method."""
    if name == "dynamic":
        return DynamicCache(config=model.config)
    return hf_longmem.make_cache(name, model, **cache_options(name, model, budget))


def cache_options(name: str, model, budget: int) -> dict:
    options = dict(hf_longmem.get_cache_spec(name).options_for_budget(budget))
    for key, value in EXTRA_OPTIONS.get(name, {}).items():
        options[key] = value(model) if callable(value) else value
    return options


class Session:
    """A cache being decoded greedily, one token per :meth:`step`, with the inputs ``generate`` passes."""

    def __init__(self, model, cache, prompt: torch.Tensor):
        self.model, self.cache = model, cache
        self.batch, self.seen = prompt.shape[0], 0
        self.next_ids = prompt

    @torch.no_grad()
    def step(self) -> None:
        num_new = self.next_ids.shape[-1]
        mask = torch.ones(self.batch, self.seen + num_new, dtype=torch.long)
        positions = torch.arange(self.seen, self.seen + num_new)[None].expand(self.batch, -1)
        out = self.model(
            input_ids=self.next_ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True
        )
        self.seen += num_new
        self.next_ids = out.logits[:, -1:].argmax(-1)


def counted(fn) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def measure(name: str, model, prompt: torch.Tensor, budget: int, warmup: int, steps: int, timed: int) -> dict:
    """Ops of the prefill and of ``steps`` decode steps after ``warmup``; median wall time of ``timed`` more steps."""
    session = Session(model, build_cache(name, model, budget), prompt)
    prefill = counted(session.step)
    for _ in range(warmup):
        session.step()
    step_counts = [counted(session.step) for _ in range(steps)]
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        session.step()
        times.append(time.perf_counter() - start)
    totals = [c.total for c in step_counts]
    median_step = step_counts[sorted(range(steps), key=lambda i: totals[i])[steps // 2]]
    return {
        "cache": name,
        "options": {} if name == "dynamic" else cache_options(name, model, budget),
        "step_ops": totals,
        "step_ops_median": int(statistics.median(totals)),
        "step_ops_max": max(totals),
        "prefill_ops": prefill.total,
        "step_ms_median": 1e3 * statistics.median(times),
        "step_op_kinds": dict(median_step.ops.most_common()),
    }


def step_ops(name: str, model, prompt: torch.Tensor, budget: int, warmup: int, steps: int) -> list[int]:
    """Ops dispatched by each of ``steps`` decode steps after the prefill and ``warmup`` steps (for tests)."""
    session = Session(model, build_cache(name, model, budget), prompt)
    session.step()
    for _ in range(warmup):
        session.step()
    return [counted(session.step).total for _ in range(steps)]


def table(rows: list[dict], layers: int) -> str:
    base = next(r for r in rows if r["cache"] == "dynamic")
    lines = [
        "| cache | ops/step (median) | max | ops/step/layer | vs DynamicCache | target | prefill ops | ms/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["step_ops_median"] / base["step_ops_median"]
        target = "" if r["cache"] in ("dynamic", "full") else f"{TARGETS.get(r['cache'], DEFAULT_TARGET):.1f}x"
        lines.append(
            f"| {r['cache']} | {r['step_ops_median']} | {r['step_ops_max']} | {r['step_ops_median'] / layers:.1f} | "
            f"{ratio:.2f}x | {target} | {r['prefill_ops']} | {r['step_ms_median']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", nargs="*", help="registered names (default: all) ; DynamicCache always runs")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=4, help="decode steps before counting")
    parser.add_argument("--steps", type=int, default=8, help="decode steps counted")
    parser.add_argument("--timed", type=int, default=20, help="decode steps timed (without the counter)")
    parser.add_argument("--out", type=Path, help="JSON with every count (and the op kinds of the median step)")
    parser.add_argument("--markdown", type=Path, help="write the table here too")
    args = parser.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    names = args.caches or hf_longmem.available_caches()
    unknown = [n for n in names if n not in hf_longmem.available_caches()]
    if unknown:
        parser.error(f"unknown cache(s) {unknown}; available: {hf_longmem.available_caches()}")
    model = tiny_llama(args.layers)
    prompt = torch.randint(
        3, MODEL["vocab_size"], (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    rows = []
    for name in ["dynamic", *names]:
        rows.append(measure(name, model, prompt, args.budget, args.warmup, args.steps, args.timed))
        print(f"{name}: {rows[-1]['step_ops_median']} ops/step, {rows[-1]['step_ms_median']:.2f} ms", file=sys.stderr)
    command = "python benchmarks/decode_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"Tiny Llama ({args.layers} layers, GQA 4/2 heads of 16), prompt {args.prompt}, batch {args.batch}, budget "
        f"{args.budget}; ops counted over {args.steps} decode steps after {args.warmup} warm-up steps; torch "
        f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s).\n\n`{command.strip()}`\n"
    )
    text = header + "\n" + table(rows, args.layers) + "\n"
    print(text)
    if args.markdown:
        atomic_write_text(args.markdown, text)
    if args.out:
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}
        atomic_write_text(args.out, json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
