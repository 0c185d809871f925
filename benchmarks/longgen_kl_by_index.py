"""KL to the full cache by question index on the LongGenBench-style task (decode-time eviction, by position).

For each ``long_generation`` sample of the embedded model the gold response (``Answer_i: The answer is X.`` for all K
questions) is teacher-forced after the prompt through the full cache and through each compressed cache;
``KL(p_full || p_cache)`` is averaged over the tokens of each answer (:func:`hf_longmem.evals.longgenbench.kl_by_index`)
and then over samples.

    python benchmarks/longgen_kl_by_index.py --length 512 --num-samples 6 --budget 64 \\
        --out benchmarks/results/longgen_kl_by_index.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--num-samples", type=int, default=6)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--caches", default="streaming,h2o,snapkv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from hf_longmem import load_default_model
    from hf_longmem.evals.longgenbench import kl_by_index, long_generation

    model, tok = load_default_model()
    samples = long_generation(tok, args.length, args.num_samples, seed=args.seed)
    start = time.perf_counter()
    rows = []
    for name in args.caches.split(","):
        per_sample = [kl_by_index(model, tok, s, name, {"budget": args.budget}) for s in samples]
        k = min(len(r) for r in per_sample)
        mean = [sum(r[i] for r in per_sample) / len(per_sample) for i in range(k)]
        rows.append({"cache": name, "budget": args.budget, "kl_by_index": mean})
        print(f"{name:10s} " + " ".join(f"{m:5.2f}" for m in mean))
    result = {
        "length": args.length,
        "num_samples": args.num_samples,
        "num_questions": [s.meta["num_questions"] for s in samples],
        "seed": args.seed,
        "rows": rows,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
