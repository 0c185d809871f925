"""What scoring costs at prefill: each cache's prefill time over DynamicCache's, measured interleaved (issue 20).

For every context length, each round prefills the same random prompt once with every cache in turn (DynamicCache
first), in one process, and the table reports the median over the rounds of each cache's time divided by
DynamicCache's time in the same round. The tiny Llama of ``decode_overhead.py`` (attention dominates its prefill).

    python benchmarks/prefill_overhead.py                                  # 4k, budget 1k, 5 rounds
    python benchmarks/prefill_overhead.py --contexts 4096 16384 --rounds 3 --out runs/prefill_overhead.json
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caches", nargs="*", default=list(DEFAULT_CACHES))
    parser.add_argument("--contexts", nargs="*", type=int, default=[4096])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = tiny_llama(args.layers)
    rows = []
    for context in args.contexts:
        prompt = torch.randint(3, MODEL["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))
        names = ["dynamic", *args.caches]
        for name in names:  # warm-up (allocator, lazy imports)
            prefill_seconds(name, model, prompt[:, :512], min(args.budget, 256))
        times = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                times[name].append(prefill_seconds(name, model, prompt, args.budget))
        for name in names:
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
