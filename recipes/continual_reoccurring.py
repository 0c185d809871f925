"""A seeded SCoLe-style re-occurring stream on the embedded model: naive fine-tuning, replay and I-LoRA, with the
memory probes (knowledge accumulation on the whole pool, 2AFC recognition, retention of the first task's facts).

    python recipes/continual_reoccurring.py                       # all three methods, ~minutes on 2 CPU cores
    python recipes/continual_reoccurring.py --methods naive --steps-per-task 20

Writes ``<output_dir>/<method>/results.json`` (every evaluation with its probes), ``<output_dir>/summary.json`` and,
with ``--plot``, a figure of the knowledge-accumulation and retention curves (see ``docs/continual.md``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from hf_longmem.continual import (
    ContinualTrainer,
    LogProbProbe,
    RecallProbe,
    RecognitionProbe,
    TrainerConfig,
    build_strategy,
    fit_forgetting_curve,
    knowledge_accumulation,
    probe_series,
    scole_stream,
)
from hf_longmem.continual.evaluation import write_json_atomic
from hf_longmem.continual.probes import fact_foils, occurrence_forgetting
from hf_longmem.default_model import load_default_model

LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
METHODS = {
    "naive": {"strategies": [], "peft": None, "learning_rate": 1e-3},
    "replay": {"strategies": [{"name": "replay", "ratio": 0.25}], "peft": None, "learning_rate": 1e-3},
    "ilora": {"strategies": [{"name": "ilora", "buffer_size": 500}], "peft": LORA, "learning_rate": 2e-3},
}


def run_method(name: str, args: argparse.Namespace) -> dict:
    stream = scole_stream(
        args.groups, args.facts_per_group, args.groups_per_task, args.tasks, num_digits=3, seed=args.seed
    )
    model, tokenizer = load_default_model()
    model.train()
    spec = METHODS[name]
    if spec["peft"]:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **spec["peft"]))
    first = stream.tasks[0].examples
    probes = [
        RecallProbe("pool", stream.pool),
        RecognitionProbe("recognition", stream.pool, fact_foils(stream.pool, seed=args.seed)),
        RecallProbe("first_task", first),
        LogProbProbe("pool_logprob", stream.pool),
    ]
    config = TrainerConfig(
        steps_per_task=args.steps_per_task,
        batch_size=args.batch_size,
        learning_rate=spec["learning_rate"],
        eval_every=args.eval_every,
        seed=args.seed,
        output_dir=str(Path(args.output_dir) / name),
        plot=False,
    )
    trainer = ContinualTrainer(
        model,
        tokenizer,
        stream.tasks,
        [build_strategy(s) for s in spec["strategies"]],
        config,
        accelerator=Accelerator(cpu=True),
        probes=probes,
    )
    start = time.time()
    results = trainer.train(overwrite=True)
    seconds = time.time() - start
    ka = knowledge_accumulation(stream, results, probe="pool")
    retention = probe_series(results["history"], "first_task", "exact_match", after=results["task_end_steps"][0])
    # forgetting between a group's first occurrence and its next one, pooled over the groups, with the fitted laws
    by_group = occurrence_forgetting(stream, results)
    points = sorted(p for g in by_group.values() for p in g["retainability"])
    fit = fit_forgetting_curve(*zip(*points)) if len(points) >= 3 else None
    return {
        "seconds": round(seconds, 1),
        "task_groups": stream.task_groups,
        "task_end_steps": results["task_end_steps"],
        "knowledge_accumulation": ka,
        "recognition": probe_series(results["history"], "recognition", "accuracy"),
        "first_task_retention": retention,
        "forgetting_between_occurrences": {
            "groups": {
                g: {k: m[k] for k in ("first_task", "next_task", "effectivity", "fit")} for g, m in by_group.items()
            },
            "points": points,
            "fit": fit,
        },
        "acc": results["metrics"]["acc"],
        "forgetting": results["metrics"].get("forgetting"),
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right, third) = plt.subplots(1, 3, figsize=(15, 3.6))
    coverage = None
    for name, res in summary["methods"].items():
        ka = res["knowledge_accumulation"]
        tasks = range(1, len(ka["acc_all"]) + 1)
        (line,) = left.plot(tasks, ka["acc_all"], marker="o", ms=3, label=f"{name}: whole pool")
        absent = [v if v is not None else float("nan") for v in ka["acc_absent"]]
        left.plot(tasks, absent, ls=":", color=line.get_color(), label=f"{name}: facts absent from the task")
        coverage = (tasks, ka["seen"])
        steps, values = res["first_task_retention"]
        right.plot(steps, values, color=line.get_color(), label=name)
        forgetting = res["forgetting_between_occurrences"]
        if forgetting["fit"]:
            t, r = zip(*forgetting["points"])
            third.scatter(t, r, s=6, alpha=0.4, color=line.get_color())
            law = forgetting["fit"]["log"]
            grid = np.geomspace(min(t), max(t), 50)
            label = f"{name}: R = {law['b']:.2f} - {law['a']:.2f} log10 t"
            third.plot(grid, law["b"] - law["a"] * np.log10(grid), color=line.get_color(), label=label)
    if coverage:
        left.plot(*coverage, color="gray", ls="--", lw=0.8, label="pool share seen so far")
    left.set_xlabel("task")
    left.set_ylabel("exact-match recall")
    left.set_title("knowledge accumulation (SCoLe)", fontsize=9)
    left.set_ylim(-0.02, 1.02)
    left.legend(fontsize=6)
    for step in next(iter(summary["methods"].values()))["task_end_steps"][:-1]:
        right.axvline(step, color="gray", lw=0.4)
    right.set_xlabel("optimizer step")
    right.set_title("retention of the first task's facts (recall)", fontsize=9)
    right.set_ylim(-0.02, 1.02)
    right.legend(fontsize=7)
    third.set_xscale("log")
    third.set_xlabel("steps t after the acquisition maximum (until the group re-occurs)")
    third.set_ylabel("retainability R(t)")
    third.set_title("forgetting of injected facts (Chang et al. 2024 fit)", fontsize=9)
    if third.get_legend_handles_labels()[0]:
        third.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--facts-per-group", type=int, default=4)
    parser.add_argument("--groups-per-task", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--steps-per-task", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--output-dir", default="runs/continual/reoccurring")
    parser.add_argument("--summary", default=None, help="also write the summary JSON here (e.g. docs/continual/...)")
    parser.add_argument("--plot", default=None, help="PNG of the accumulation and retention curves")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    start = time.time()
    summary = {"args": vars(args), "methods": {}}
    for name in args.methods:
        summary["methods"][name] = run_method(name, args)
        ka = summary["methods"][name]["knowledge_accumulation"]
        print(
            f"{name}: acc_all per task {[round(v, 2) for v in ka['acc_all']]}, accumulation {ka['accumulation']:.3f}, "
            f"{summary['methods'][name]['seconds']} s",
            flush=True,
        )
    summary["total_seconds"] = round(time.time() - start, 1)
    print(f"total wall time {summary['total_seconds']} s")
    for path in filter(None, [Path(args.output_dir) / "summary.json", args.summary and Path(args.summary)]):
        write_json_atomic(path, summary)
    if args.plot:
        plot(summary, Path(args.plot))
    return summary


if __name__ == "__main__":
    json.dumps(main())
