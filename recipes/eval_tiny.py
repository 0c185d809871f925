#!/usr/bin/env python
"""Greedy full-cache accuracy of a model on the synthetic tasks, by task and context length.

    python recipes/eval_tiny.py --model hf_longmem/assets/tiny-longmem \\
        --lengths 256 512 1024 2048 4096 --num_samples 50 --output runs/eval_tiny.json

Fresh seeded samples (``--seed``, distinct from the training stream's seeds) are generated at each length,
answered with ``model.generate(do_sample=False)`` and scored with the task's metric (``hf_longmem.evals.metrics``:
RULER's ``string_match_all`` for needles and variable tracking, first integer for pass keys, exact match for facts)
and by exact match after stripping whitespace; each row carries the 95% Wilson interval of the score.
Shared-context samples are scored per question in two modes: ``rollback`` (each question right after the
context) and ``append`` (earlier questions with their golden answers and EOS kept in the prompt).
Writes a JSON with one row per (task, length) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_longmem.evals.metrics import exact_match, metric_for, metric_options, score, wilson_interval
from hf_longmem.evals.schema import Sample
from hf_longmem.evals.tasks import generate_task

#: Evaluated settings: label -> (generator name, options, shared-context mode or None).
SETTINGS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "passkey": ("passkey", {}, None),
    "multikey_needle": ("multikey_needle", {}, None),
    "niah_multivalue": ("niah_multivalue", {}, None),
    "niah_multiquery": ("niah_multiquery", {}, None),
    "variable_tracking": ("variable_tracking", {"num_chains": 2, "num_hops": 2}, None),
    "fact_qa": ("fact_qa", {"num_facts": 4, "num_questions": 4}, None),
    "shared_rollback": ("shared_context", {"generator": "multikey_needle", "num_questions": 4}, "rollback"),
    "shared_append": ("shared_context", {"generator": "multikey_needle", "num_questions": 4}, "append"),
}


def prompt_ids(tokenizer: Any, sample: Sample, turn: int, mode: str | None) -> list[int]:
    """Token ids of the prompt for question ``turn`` (``append``: earlier turns + golden answers + EOS)."""
    ids = tokenizer(sample.context, verbose=False)["input_ids"]
    history = range(turn) if mode == "append" else []
    for index in history:
        ids += tokenizer(sample.turns[index].query, add_special_tokens=False)["input_ids"]
        ids += tokenizer(" " + sample.turns[index].answers[0], add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    return ids + tokenizer(sample.turns[turn].query, add_special_tokens=False, verbose=False)["input_ids"]


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Left-pad ``prompts``, generate greedily, decode the new tokens (special tokens skipped)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def evaluate(
    model: Any, tokenizer: Any, setting: str, length: int, num_samples: int, seed: int, tokens_per_batch: int
) -> dict[str, Any]:
    """Accuracy of one setting at one length; returns a JSON-ready row."""
    name, options, mode = SETTINGS[setting]
    samples = generate_task(name, tokenizer, length, num_samples, seed, **options)
    items = [(s, t) for s in samples for t in range(len(s.turns))]
    batch_size = max(1, tokens_per_batch // length)
    correct, total, start = 0, 0.0, time.time()
    metric = None
    for begin in range(0, len(items), batch_size):
        chunk = items[begin : begin + batch_size]
        prompts = [prompt_ids(tokenizer, s, t, mode) for s, t in chunk]
        budget = max(s.turns[t].max_new_tokens for s, t in chunk)
        for (s, t), text in zip(chunk, greedy_answers(model, tokenizer, prompts, budget)):
            turn = s.turns[t]
            metric = metric_for(name, s.meta, turn)
            total += score(text, turn.answers, metric, **metric_options(s.meta, metric))
            correct += exact_match(text, turn.answers)
    mean = total / len(items)
    low, high = wilson_interval(mean, len(items))
    return {
        "task": setting,
        "length": length,
        "metric": metric,
        "score": mean,
        "interval": [round(low, 4), round(high, 4)],
        "accuracy": correct / len(items),  # exact match
        "num_questions": len(items),
        "mean_num_tokens": sum(s.meta["num_tokens"] for s in samples) / len(samples),
        "seconds": round(time.time() - start, 1),
    }


def markdown_table(rows: list[dict[str, Any]], key: str = "score", intervals: bool = False) -> str:
    """``key`` (the task metric's ``score`` or exact-match ``accuracy``) in % with tasks as rows and lengths as
    columns; ``intervals``: each score followed by its 95% Wilson interval, e.g. ``92 (81–97)``."""
    lengths = sorted({r["length"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by = {(r["task"], r["length"]): r for r in rows}

    def cell(row: dict[str, Any]) -> str:
        text = f"{100 * row.get(key, row['accuracy']):.0f}"
        if intervals and key == "score" and "interval" in row:
            low, high = row["interval"]
            text += f" ({100 * low:.0f}–{100 * high:.0f})"
        return text

    lines = ["| task | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for task in tasks:
        values = [cell(by[task, n]) if (task, n) in by else "" for n in lengths]
        lines.append(f"| {task} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "hf_longmem/assets/tiny-longmem"))
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--num_samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tokens_per_batch", type=int, default=4096)
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (the model is evaluated in fp32)")
    parser.add_argument("--output", type=Path, default=Path("runs/eval_tiny.json"))
    parser.add_argument("--card", type=Path, default=None, help="also write the model card (README.md) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).to(args.device).eval()
    grid = [(task, length) for length in args.lengths for task in args.tasks]
    rows = []
    for task, length in tqdm(grid, desc="eval_tiny"):
        rows.append(evaluate(model, tokenizer, task, length, args.num_samples, args.seed, args.tokens_per_batch))
        tqdm.write(json.dumps(rows[-1]))
    result = {
        "model": args.model,
        "seed": args.seed,
        "num_samples": args.num_samples,
        "decoding": "greedy",
        "device": args.device,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(rows))
    if args.card is not None:
        write_card(
            args.card, Path(args.model), result, " ".join(["python recipes/eval_tiny.py", *(argv or sys.argv[1:])])
        )
    return result


def training_lineage(model_dir: Path) -> list[dict[str, Any]]:
    """The training runs behind ``model_dir``, oldest first: its ``training_metadata.json`` and, while the run's
    ``init_from`` folder holds one too, the runs it was fine-tuned from (a run whose ``init_from`` is missing on disk
    ends the chain and is named by it)."""
    runs: list[dict[str, Any]] = []
    folder: Path | None = model_dir
    seen: set[Path] = set()
    while folder is not None and (folder / "training_metadata.json").is_file() and folder.resolve() not in seen:
        seen.add(folder.resolve())
        meta = json.loads((folder / "training_metadata.json").read_text())
        runs.append(meta)
        init_from = meta["config"].get("init_from") or ""
        folder = Path(init_from) if init_from else None
    return runs[::-1]


def _run_line(meta: dict[str, Any]) -> str:
    config = meta["config"]
    start = f"fine-tuned from `{config['init_from']}`" if config.get("init_from") else "from scratch"
    curriculum = "; ".join(
        f"to {int(100 * s['until'])}% of steps {s['min_length']}-{s['max_length']} tokens" for s in config["curriculum"]
    )
    return (
        f"- `{meta['command']}` ({start}, seed {config['seed']}): {meta['steps']:,} steps, {meta['tokens_seen']:,} "
        f"tokens, {meta['wall_time_s'] / 60:.0f} minutes of training loop on {meta.get('device', 'cpu')}; tasks "
        f"{', '.join(f'{k} ({v})' for k, v in config['tasks'].items())}; answer tokens weighted "
        f"{config['answer_loss_weight']}x (first answer token {config.get('first_answer_loss_weight') or config['answer_loss_weight']}x); "
        f"copy warm-up {config['copy_batch_size']} x {config['copy_length']} tokens (random offset "
        f"{config.get('copy_gap', 0)}); lr {config['learning_rate']} cosine to {config['min_lr_rate']}x; lengths {curriculum}."
    )


def accuracy_summary(rows: list[dict[str, Any]], trained_length: int, bar: float = 0.9) -> str:
    """One sentence per outcome, derived from ``rows``: the tasks at or above ``bar`` at the longest evaluated length
    within ``trained_length``, those below it, and how every task fares beyond the training length."""
    key = "score"
    inside = [r["length"] for r in rows if r["length"] <= trained_length]
    outside = [r for r in rows if r["length"] > trained_length]
    lines = []
    if inside:
        at = max(inside)
        cells = {r["task"]: r.get(key, r["accuracy"]) for r in rows if r["length"] == at}
        good = [t for t, v in cells.items() if v >= bar]
        weak = [t for t, v in cells.items() if v < bar]
        if good:
            lines.append(f"At {at} tokens it scores at least {100 * bar:.0f}% on {', '.join(good)}.")
        if weak:
            lines.append(
                f"Below {100 * bar:.0f}% at {at} tokens: "
                + ", ".join(f"{t} ({100 * cells[t]:.0f}%)" for t in weak)
                + "."
            )
    if outside:
        best = max(r.get(key, r["accuracy"]) for r in outside)
        lines.append(
            f"Beyond its training length ({trained_length} tokens) no task scores above {100 * best:.0f}% with the "
            "full cache (positions it was never trained on), which is where memory methods have to help."
        )
    return " ".join(lines)


def write_card(path: Path, model_dir: Path, result: dict[str, Any], eval_command: str) -> None:
    """The embedded model's card: every training run behind it (see :func:`training_lineage`) and its measured
    accuracy by length, the summary derived from the measured rows (atomic write)."""
    from huggingface_hub import ModelCard, ModelCardData

    lineage = training_lineage(model_dir)
    if not lineage:
        raise ValueError(f"{model_dir} has no training_metadata.json (a model trained by recipes/train_tiny.py)")
    meta = lineage[-1]
    model = meta["config"]["model"]
    heads, kv_heads = model["num_attention_heads"], model["num_key_value_heads"]
    attention = "MHA" if heads == kv_heads else f"GQA: {heads} query / {kv_heads} KV heads"
    trained_length = max(s["max_length"] for run in lineage for s in run["config"]["curriculum"])
    card_data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["hf-longmem", "synthetic", "long-context", "passkey"],
    )
    runs = "\n".join(_run_line(run) for run in lineage)
    body = f"""---
{card_data.to_yaml()}
---

# tiny-longmem

The embedded default model of `hf_longmem` (`hf_longmem.load_default_model()`): a {meta["num_parameters"]:,}-parameter
Llama ({attention}, {heads} heads of {model.get("head_dim", model["hidden_size"] // heads)}, RoPE,
{model["num_hidden_layers"]} layers, hidden {model["hidden_size"]}) with a closed word-level tokenizer, trained{" from scratch" if not lineage[0]["config"].get("init_from") else ""}
on the generated long-context tasks of `hf_longmem.evals.tasks` up to {trained_length} tokens. It exists
so that cache methods can be compared on real accuracy without downloading anything.

## Training

{sum(run["tokens_seen"] for run in lineage):,} tokens in {len(lineage)} run(s), in order (torch {meta["versions"]["torch"]},
transformers {meta["versions"]["transformers"]}):

{runs}

## Accuracy by context length (full cache, greedy, %)

Each task scored with its own metric (`hf_longmem.evals.metrics`: RULER's `string_match_all` for the needles and
variable tracking, the first integer for pass keys, exact match for facts). {result["num_samples"]} fresh samples per
task and length (seed {result["seed"]}); `fact_qa` and `shared_*` ask 4 questions per context, so their n is 4x. In
parentheses: the 95% Wilson interval. Every row, with n, is in `eval_results.json`. Command: `{eval_command}`.

{markdown_table(result["rows"], intervals=True)}

{accuracy_summary(result["rows"], trained_length)}

## Use

```python
import hf_longmem
model, tokenizer = hf_longmem.load_default_model()
cache = hf_longmem.make_cache("snapkv", model, budget=256)
```
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(body)
    ModelCard.load(tmp)  # the YAML header must parse
    tmp.replace(path)


if __name__ == "__main__":
    main()
