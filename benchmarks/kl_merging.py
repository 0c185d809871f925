"""KL to the full cache of H2O, D2O and KVMerger at one budget ratio on the embedded model (issue 4 table).

The metric is the harness's fidelity (:mod:`hf_longmem.evals.fidelity`, what ``hf-longmem bench --fidelity``
reports): the full cache greedily answers ``context + query``; that answer (the digits and EOS, up to the task's
``max_new_tokens``) is teacher-forced through the compressed cache, and ``KL(p_full || p_cache)`` is averaged over
the answer positions of a sample. The first position is predicted by the prefill forward, which attends to the whole
prompt in every cache, so only the later answer positions can differ. Here every sample's KL is kept, so the table
gives mean ± standard error over samples and the paired difference to H2O on the same samples (the passkey KL is
bimodal: about 0 when the digits survive, several nats at the position of a lost digit).

Rows: H2O; D2O with every layer compressed (``uncompressed_layers=[]``: the same KV bytes as H2O, the fair
comparison); D2O with the paper default (layers 0, 1 and L-1 uncompressed: 3 of the tiny model's 4 layers, about
3x the bytes); KVMerger at its default ``sim_threshold=0.8`` and at ``--kvmerger-threshold`` (0.1, chosen on seed 1,
see docs/merging_caches.md); KVMerger with merging switched off (``sim_threshold=1.5``: its window-voted eviction
alone, the ablation of the merge); SnapKV (pooled window votes) as a non-merging reference.

    python benchmarks/kl_merging.py --tasks passkey,variable_tracking,multikey_needle --num-samples 50 \\
        --out benchmarks/results/kl_merging.json
    # threshold selection (held-out seed, never the evaluation samples):
    python benchmarks/kl_merging.py --seed 1 --num-samples 20 --sweep 0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1,0.0 \\
        --out benchmarks/results/kl_merging_sweep_seed1.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="passkey,variable_tracking,multikey_needle")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--budget-ratio", type=float, default=0.25)
    parser.add_argument("--num-samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kvmerger-threshold", type=float, default=0.1)
    parser.add_argument("--sweep", default=None, help="comma-separated KVMerger thresholds (H2O + these rows only)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from hf_longmem import load_default_model, make_cache
    from hf_longmem.cache_classes.base import cache_memory_bytes
    from hf_longmem.evals.fidelity import compare_to_reference, reference_continuation
    from hf_longmem.evals.tasks import generate_task

    model, tokenizer = load_default_model()
    model.eval()
    budget = max(1, round(args.budget_ratio * args.length))
    caches: dict[str, tuple[str, dict]] = {"h2o": ("h2o", {"budget": budget})}
    if args.sweep:
        for t in args.sweep.split(","):
            caches[f"kvmerger(sim_threshold={float(t)})"] = ("kvmerger", {"budget": budget, "sim_threshold": float(t)})
    else:
        caches.update(
            {
                "d2o(all layers)": ("d2o", {"budget": budget, "uncompressed_layers": []}),
                "d2o(paper: 0,1,L-1 kept)": ("d2o", {"budget": budget}),
                "kvmerger(default 0.8)": ("kvmerger", {"budget": budget}),
                f"kvmerger(sim_threshold={args.kvmerger_threshold})": (
                    "kvmerger",
                    {"budget": budget, "sim_threshold": args.kvmerger_threshold},
                ),
                "kvmerger(no merging)": ("kvmerger", {"budget": budget, "sim_threshold": 1.5}),
                "snapkv(reference)": ("snapkv", {"budget": budget}),
            }
        )
    start = time.perf_counter()
    rows = []
    for task in args.tasks.split(","):
        samples = generate_task(task, tokenizer, args.length, args.num_samples, args.seed)
        per = {label: {"kl": [], "top1": [], "kv_bytes": []} for label in caches}
        for sample in samples:
            context = tokenizer(sample.context, add_special_tokens=True)["input_ids"]
            query = tokenizer(sample.turns[0].query, add_special_tokens=False)["input_ids"]
            prompt = torch.tensor([context + query], device=model.device)
            reference = reference_continuation(
                model, prompt, max_new_tokens=sample.turns[0].max_new_tokens, eos_token_id=tokenizer.eos_token_id
            )
            for label, (name, options) in caches.items():
                cache = make_cache(name, model, **options)
                result = compare_to_reference(model, reference, cache)
                per[label]["kl"].append(result.kl)
                per[label]["top1"].append(result.top1_agreement)
                per[label]["kv_bytes"].append(cache_memory_bytes(cache))
        base = per["h2o"]["kl"]
        for label, (name, options) in caches.items():
            kl, se = _mean_se(per[label]["kl"])
            diff, diff_se = _mean_se([a - b for a, b in zip(per[label]["kl"], base)])
            rows.append(
                {
                    "task": task,
                    "context_length": args.length,
                    "cache": label,
                    "cache_name": name,
                    "cache_kwargs": options,
                    "num_samples": len(samples),
                    "kl": kl,
                    "kl_se": se,
                    "kl_minus_h2o": diff,
                    "kl_minus_h2o_se": diff_se,
                    "top1_agreement": sum(per[label]["top1"]) / len(samples),
                    "kv_bytes": round(sum(per[label]["kv_bytes"]) / len(samples)),
                    "kl_per_sample": per[label]["kl"],
                }
            )
    elapsed = time.perf_counter() - start
    print(f"{'task':<18} {'cache':<32} {'KV bytes':>10} {'KL':>18} {'KL - H2O (paired)':>20} {'top1':>6}")
    for r in rows:
        print(
            f"{r['task']:<18} {r['cache']:<32} {r['kv_bytes']:>10} {r['kl']:>9.4f} ± {r['kl_se']:<6.4f} "
            f"{r['kl_minus_h2o']:>+10.4f} ± {r['kl_minus_h2o_se']:<6.4f} {r['top1_agreement']:>6.3f}"
        )
    print(f"{elapsed:.1f} s")
    if args.out:
        meta = {
            "budget_ratio": args.budget_ratio,
            "budget": budget,
            "num_samples": args.num_samples,
            "seed": args.seed,
            "wall_time_s": elapsed,
            "metric": "harness fidelity: mean KL(full || cache) over the teacher-forced greedy answer of the full cache",
        }
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        tmp.replace(path)


if __name__ == "__main__":
    main()
