"""What scoring costs at prefill: each cache's prefill time over DynamicCache's, measured interleaved (issue 20).

For every context length, each round prefills the same random prompt once with every cache in turn (DynamicCache
first), in one process, and the table reports the median over the rounds of each cache's time divided by
DynamicCache's time in the same round. The tiny Llama of ``decode_overhead.py`` (attention dominates its prefill).

    python benchmarks/prefill_overhead.py                                  # 4k, budget 1k, 5 rounds
    python benchmarks/prefill_overhead.py --contexts 4096 16384 --rounds 3 --out runs/prefill_overhead.json
    python benchmarks/prefill_overhead.py --caches h2o d2o --floor   # also what exact column sums cost at least

``--floor`` times two more things in the same rounds, at the model's attention shapes (every layer): the causal SDPA
calls alone (``(sdpa alone)``: the attention's share of the prefill) and one pass of ``q.k`` products and ``exp``
over the causal half, in the blocks of queries the library scores by, with no mask, sum or softmax
(``(q.k + exp pass)``). Exact column sums of the attention probabilities (H2O, D2O) need each query's final
log-sum-exp before any of its probabilities, so they take a second pass over the keys with at least these products
and exponentials: ``1 + (q.k + exp pass)`` is a lower bound on the H2O / D2O ratio for an implementation in torch ops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: `benchmarks` imports
from benchmarks.decode_overhead import MODEL, Session, build_cache, tiny_llama
from hf_longmem.files import atomic_write_text

#: The scoring caches of issue 20's prefill target, and streaming (no scoring) for reference.
DEFAULT_CACHES = ("snapkv", "pyramidkv", "think", "h2o", "d2o", "kvmerger", "streaming")


def prefill_seconds(name: str, model, prompt: torch.Tensor, budget: int) -> float:
    session = Session(model, build_cache(name, model, budget), prompt)
    start = time.perf_counter()
    session.step()
    return time.perf_counter() - start


def floor_timers(model, context: int):
    """``{"(sdpa alone)": fn, "(q.k + exp pass)": fn}`` at ``model``'s attention shapes, every layer (see the
    module docstring); random float32 inputs."""
    from hf_longmem.memory.scoring import LSE_QUERY_BLOCK

    config = model.config
    layers, q_heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim, group = config.head_dim, q_heads // kv_heads
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, q_heads, context, head_dim, generator=generator)
    keys, values = (torch.randn(1, kv_heads, context, head_dim, generator=generator) for _ in range(2))
    scale = head_dim**-0.5

    def sdpa() -> None:
        for _ in range(layers):
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, keys, values, 0.0, True, scale=scale)

    grouped = query.view(1, kv_heads, group, context, head_dim)
    keys_t = keys.transpose(-1, -2)

    def products_and_exp() -> None:
        for _ in range(layers):
            for start in range(0, context, LSE_QUERY_BLOCK):
                stop = min(start + LSE_QUERY_BLOCK, context)
                block = grouped[:, :, :, start:stop].reshape(1, kv_heads, group * (stop - start), head_dim)
                torch.matmul(block, keys_t[..., :stop]).exp_()

    return {"(sdpa alone)": sdpa, "(q.k + exp pass)": products_and_exp}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", nargs="*", default=list(DEFAULT_CACHES))
    parser.add_argument("--contexts", nargs="*", type=int, default=[4096])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--floor", action="store_true", help="also time SDPA alone and one q.k + exp pass")
    args = parser.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = tiny_llama(args.layers)
    rows = []
    for context in args.contexts:
        prompt = torch.randint(3, MODEL["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))
        names = ["dynamic", *args.caches]
        for name in names:  # warm-up (allocator, lazy imports)
            prefill_seconds(name, model, prompt[:, :512], min(args.budget, 256))
        extra = floor_timers(model, context) if args.floor else {}
        for fn in extra.values():  # warm-up
            fn()
        times = {name: [] for name in [*names, *extra]}
        for _ in range(args.rounds):
            for name in names:
                times[name].append(prefill_seconds(name, model, prompt, args.budget))
            for name, fn in extra.items():
                times[name].append(timed(fn))
        for name in times:
            ratios = [t / base for t, base in zip(times[name], times["dynamic"])]
            rows.append(
                {
                    "context": context,
                    "cache": name,
                    "seconds_median": statistics.median(times[name]),
                    "ratio_median": statistics.median(ratios),
                }
            )
            print(f"{context} {name}: {statistics.median(ratios):.2f}x", file=sys.stderr)
    command = "python benchmarks/prefill_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Tiny Llama ({args.layers} layers), budget {args.budget}, median of {args.rounds} interleaved rounds; torch "
        f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s).",
        "",
        f"`{command.strip()}`",
        "",
        "| context | cache | prefill s (median) | vs DynamicCache (median of per-round ratios) |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {r['context']} | {r['cache']} | {r['seconds_median']:.3f} | {r['ratio_median']:.2f}x |" for r in rows]
    print("\n".join(lines))
    if args.out:
        atomic_write_text(args.out, json.dumps({"args": {**vars(args), "out": str(args.out)}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
