"""Train memory-model configs over several seeds in parallel and summarise the evaluation across seeds.

One architecture beating another on a small recall task can be a property of one seed (docs/mom.md, "(c)"), so a
claim needs several seeds. This runs ``recipes/train_memory_model.py --config C --seed S --output_dir
<runs>/<name>_seed<S>`` for every config x seed, ``--jobs`` at a time (one torch thread each, on the CPU unless
``--device-visible``), and writes one JSON with every run's rows plus, per config and evaluation column, the mean,
the standard error over seeds, and the per-seed accuracies.

    python benchmarks/memory_seed_sweep.py --configs recipes/configs/memory_mom_m4_grouped.yaml \\
        recipes/configs/memory_mom_m1_grouped.yaml --seeds 0 1 2 3 --jobs 8 \\
        --out benchmarks/results/memory_recall/mom_grouped_seeds.json

``--compare A B`` (run names, e.g. ``mom_m3_shared_grouped mom_m1_grouped``) adds, per column, the difference of the
mean accuracies, Welch's t, a two-sided permutation p-value (seeds of A and B relabelled at random, 100,000 times,
fixed generator) and the chance that a seed of A beats a seed of B. Different seeds of two architectures are
independent samples, not pairs.

Runs whose ``results.json`` already exists are not retrained (``--retrain`` forces it), so an interrupted sweep
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_name(config: Path) -> str:
    """``memory_mom_m4_grouped.yaml`` -> ``mom_m4_grouped`` (the recipe's own output-dir naming)."""
    stem = config.stem
    return stem[len("memory_") :] if stem.startswith("memory_") else stem


def column_label(row: dict) -> str:
    """One evaluation column: task, context length and the task options (e.g. ``mqar@67 num_pairs=32``)."""
    options = " ".join(f"{k}={v}" for k, v in sorted(row.get("options", {}).items()) if v is not None)
    return f"{row['task']}@{row['context_length']} {options}".strip()


def summarise(results: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """``{config: {seed: results.json}}`` -> ``{config: {column: {mean, sem, n, per_seed}}}`` (sem = std / sqrt(n),
    sample std; 0 for one seed)."""
    summary: dict[str, dict[str, dict]] = {}
    for name, by_seed in results.items():
        columns: dict[str, dict[int, float]] = {}
        for seed, result in sorted(by_seed.items()):
            for row in result["rows"]:
                columns.setdefault(column_label(row), {})[seed] = row["accuracy"]
        summary[name] = {}
        for label, per_seed in columns.items():
            values = list(per_seed.values())
            n = len(values)
            mean = sum(values) / n
            var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
            summary[name][label] = {
                "mean": round(mean, 4),
                "sem": round(math.sqrt(var / n), 4),
                "n": n,
                "per_seed": {str(s): v for s, v in per_seed.items()},
            }
    return summary


def compare(
    summary: dict[str, dict[str, dict]], first: str, second: str, permutations: int = 100_000, seed: int = 0
) -> dict[str, dict]:
    """Per column shared by runs ``first`` and ``second``: ``difference`` (mean first - mean second), Welch's ``t``,
    a two-sided permutation ``p`` (how often relabelling the seeds gives a difference at least as large in size),
    and ``superiority``, the chance that a seed of first beats a seed of second (Mann-Whitney ``U / (n_a n_b)``, ties
    count half)."""
    import numpy as np

    generator = np.random.default_rng(seed)
    out = {}
    for label in summary[first]:
        if label not in summary[second]:
            continue
        a = np.array(list(summary[first][label]["per_seed"].values()))
        b = np.array(list(summary[second][label]["per_seed"].values()))
        difference = a.mean() - b.mean()
        var = (a.var(ddof=1) / len(a) if len(a) > 1 else 0.0) + (b.var(ddof=1) / len(b) if len(b) > 1 else 0.0)
        pooled = np.concatenate([a, b])
        shuffled = generator.permuted(np.broadcast_to(pooled, (permutations, len(pooled))), axis=1)
        null = shuffled[:, : len(a)].mean(1) - shuffled[:, len(a) :].mean(1)
        out[label] = {
            "difference": round(float(difference), 4),
            "welch_t": round(float(difference / np.sqrt(var)), 2) if var > 0 else None,
            "permutation_p": round(float((np.abs(null) >= abs(difference) - 1e-12).mean()), 4),
            "superiority": round(float((a[:, None] > b).mean() + 0.5 * (a[:, None] == b).mean()), 3),
            "n": [len(a), len(b)],
        }
    return out


def train_one(config: Path, seed: int, runs: Path, args) -> tuple[Path, int, float]:
    # an overridden step count gets its own folder: resuming must never mix runs of different lengths
    suffix = "" if args.max_steps is None else f"_{args.max_steps}steps"
    out_dir = runs / f"{run_name(config)}_seed{seed}{suffix}"
    if (out_dir / "results.json").exists() and not args.retrain:
        return out_dir, 0, 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(REPO / "recipes" / "train_memory_model.py"),
        "--config",
        str(config),
        "--seed",
        str(seed),
        "--output_dir",
        str(out_dir),
    ]
    if args.max_steps is not None:
        cmd += ["--max_steps", str(args.max_steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    if not args.device_visible:
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    with open(out_dir / "train.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return out_dir, rc, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, required=True, help="recipe YAML configs")
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/memory"), help="parent of the runs' output dirs")
    parser.add_argument("--max-steps", type=int, default=None, help="override the configs' max_steps")
    parser.add_argument("--retrain", action="store_true", help="train again even where results.json exists")
    parser.add_argument("--device-visible", action="store_true", help="let runs see the GPU (default: CPU only)")
    parser.add_argument("--out", type=Path, required=True, help="summary JSON")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="two run names (config stems without 'memory_') to test A against B per column",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    for config in args.configs:
        if not config.is_file():
            parser.error(f"--configs: no such file {config}")
        yaml.safe_load(config.read_text())  # fail early on a broken config
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has duplicates: {args.seeds}")
    names = [run_name(config) for config in args.configs]
    if len(set(names)) != len(names):
        parser.error(f"--configs must have distinct file names (they name the runs' folders), got {names}")
    if args.compare and not set(args.compare) <= set(names):
        parser.error(f"--compare takes two of the configs' run names {names}, got {args.compare}")

    jobs = [(config, seed) for seed in args.seeds for config in args.configs]
    results: dict[str, dict[int, dict]] = {}
    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(train_one, config, seed, args.runs, args) for config, seed in jobs]
        for (config, seed), future in zip(jobs, futures):
            out_dir, rc, seconds = future.result()
            result_file = out_dir / "results.json"
            if rc != 0 or not result_file.exists():
                failed.append(f"{config} seed {seed}: rc={rc}, log {out_dir / 'train.log'}")
                continue
            results.setdefault(run_name(config), {})[seed] = json.loads(result_file.read_text())
            print(f"{run_name(config)} seed {seed}: done ({seconds:.0f} s)", flush=True)

    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "summary": summarise(results),
        # each run's meta and evaluation rows (its training history stays in its own results.json)
        "runs": {
            name: {str(s): {"meta": r["meta"], "rows": r["rows"]} for s, r in by_seed.items()}
            for name, by_seed in results.items()
        },
        "failed": failed,
    }
    if args.compare and all(name in report["summary"] for name in args.compare):
        report["compare"] = {
            "a": args.compare[0],
            "b": args.compare[1],
            "columns": compare(report["summary"], *args.compare),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out)
    for name, columns in report["summary"].items():
        for label, stats in columns.items():
            print(f"{name:32s} {label:40s} {stats['mean']:.3f} ± {stats['sem']:.3f} (n={stats['n']})")
    for label, stats in report.get("compare", {}).get("columns", {}).items():
        print(
            f"{args.compare[0]} - {args.compare[1]} {label:40s} {stats['difference']:+.3f}  t={stats['welch_t']}  "
            f"p={stats['permutation_p']}  P(A>B)={stats['superiority']}"
        )
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
