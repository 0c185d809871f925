#!/usr/bin/env python
"""Table and stability-gap plot of several continual runs (the ``results.json`` of the continual recipes).

    python recipes/continual_report.py --run naive=runs/continual/naive --run "EWC=runs/continual/ewc" \\
        --plot docs/continual/stability_gap.png --summary docs/continual/results.json

Prints a markdown table (ACC, forgetting, BWT, FWT, avg min-ACC, WC-ACC, WF^10, wall time, trainable parameters) and
the accuracy matrices; ``--plot`` draws one stability-gap panel per run; ``--summary`` writes the matrices and metrics
without the per-step history.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_longmem.continual.evaluation import plot_results, write_json_atomic


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def table(runs: list[tuple[str, dict]]) -> str:
    lines = [
        "| method | ACC ↑ | forgetting ↓ | BWT ↑ | FWT | avg min-ACC ↑ | WC-ACC ↑ | WF¹⁰ ↓ | trainable params | wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, res in runs:
        m = res["metrics"]
        lines.append(
            f"| {label} | {_fmt(m.get('acc'))} | {_fmt(m.get('forgetting'))} | {_fmt(m.get('bwt'))} | "
            f"{_fmt(m.get('fwt'))} | {_fmt(m.get('avg_min_acc'))} | {_fmt(m.get('wc_acc'))} | {_fmt(m.get('wf_10'))} | "
            f"{res['meta'].get('trainable_parameters', 0):,} | {res['meta'].get('wall_seconds', 0):.0f} s |"
        )
    return "\n".join(lines)


def matrices(runs: list[tuple[str, dict]]) -> str:
    out = []
    for label, res in runs:
        names = res["tasks"]
        rows = ["| after \\ on | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        rows += [
            f"| {names[i]} | " + " | ".join(f"{a:.2f}" for a in row) + " |"
            for i, row in enumerate(res["accuracy_matrix"])
        ]
        out.append(f"**{label}**\n\n" + "\n".join(rows))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR", help="run label and output_dir")
    parser.add_argument("--plot", type=Path, default=None, help="stability-gap PNG (one panel per --plot_run)")
    parser.add_argument("--plot_run", action="append", default=None, help="labels to plot (default: all)")
    parser.add_argument("--summary", type=Path, default=None, help="compact JSON of matrices and metrics")
    args = parser.parse_args(argv)
    runs = []
    for item in args.run:
        if "=" not in item:
            raise ValueError(f"--run needs LABEL=DIR, got {item!r}")
        label, folder = item.rsplit("=", 1)
        runs.append((label, json.loads((Path(folder) / "results.json").read_text())))
    text = table(runs) + "\n\n" + matrices(runs)
    print(text)
    if args.plot:
        chosen = [r for r in runs if args.plot_run is None or r[0] in args.plot_run]
        plot_results(chosen, args.plot)
    if args.summary:
        write_json_atomic(
            args.summary,
            {
                label: {
                    "tasks": res["tasks"],
                    "accuracy_matrix": res["accuracy_matrix"],
                    "initial_accuracy": res["initial_accuracy"],
                    "metrics": res["metrics"],
                    "wall_seconds": res["meta"].get("wall_seconds"),
                    "command": res["meta"].get("command"),
                    "recipe_config": res["meta"].get("recipe_config"),
                }
                for label, res in runs
            },
        )
    return text


if __name__ == "__main__":
    main()
