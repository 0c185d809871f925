"""KL to the full cache of H2O, D2O and KVMerger at one budget ratio on the embedded model (issue 4 table).

D2O runs twice: with ``uncompressed_layers=[]`` (every layer compressed: the same KV bytes as H2O, the fair
comparison) and with the paper default (layers 0, 1 and L-1 uncompressed: 3 of the tiny model's 4 layers, about
3x the bytes). ``uncompressed_layers`` is a list, which ``hf-longmem bench --cache-option`` cannot pass, hence this
script; everything else is the harness of ``hf-longmem bench --fidelity``.

    python benchmarks/kl_merging.py --tasks passkey,variable_tracking --lengths 1024 --num-samples 10 \\
        --out benchmarks/results/issue4_kl.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="passkey")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--budget-ratio", type=float, default=0.25)
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from hf_longmem import load_default_model
    from hf_longmem.evals.runner import run_benchmark

    model, tokenizer = load_default_model()
    model.eval()
    ratio = args.budget_ratio

    def budget(length: int) -> int:
        return max(1, round(ratio * length))

    caches = {
        "h2o": ("h2o", lambda n: {"budget": budget(n)}),
        "d2o(all layers)": ("d2o", lambda n: {"budget": budget(n), "uncompressed_layers": []}),
        "d2o(paper: 0,1,L-1 kept)": ("d2o", lambda n: {"budget": budget(n)}),
        "kvmerger": ("kvmerger", lambda n: {"budget": budget(n)}),
    }
    start = time.perf_counter()
    rows = run_benchmark(
        model, tokenizer, args.tasks.split(","), [int(x) for x in args.lengths.split(",")], caches,
        num_samples=args.num_samples, seed=args.seed, fidelity=True, model_name="tiny-longmem", progress=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    print(f"{'task':<18} {'length':>6}  {'cache':<26} {'KV bytes':>10} {'KL':>8} {'top1':>6} {'acc':>6}")
    for r in rows:
        print(
            f"{r['task']:<18} {r['context_length']:>6}  {r['cache']:<26} {r['kv_bytes']:>10} {r['kl']:>8.4f} "
            f"{r['top1_agreement']:>6.3f} {r['accuracy']:>6.2f}"
        )
    print(f"{elapsed:.1f} s")
    if args.out:
        meta = {"budget_ratio": ratio, "num_samples": args.num_samples, "seed": args.seed, "wall_time_s": elapsed}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
