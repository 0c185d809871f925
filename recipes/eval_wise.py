#!/usr/bin/env python
"""Lifelong-editing table of WISE-Retrieve, WISE-Merge and plain fine-tuning, for T = 1, 10, 100 sequential edits.

Writes fictional facts (or a ZsRE-format file) into a model one after the other and, after T edits, measures on
the first T: reliability (edit prompts), generalization (paraphrases) and locality (unrelated prompts, agreement
with the unedited model), as teacher-forced token accuracy (EasyEdit's ``token em``). The fine-tuning baseline
trains the same layer's main weight with the same loss, optimiser and steps (no side memory, no routing).

    python recipes/eval_wise.py                                   # embedded model, 100 fictional facts
    python recipes/eval_wise.py --model random                    # tiny random Llama of the embedded model's shape
    python recipes/eval_wise.py --model ./llama --edits zsre_mend_eval.json --option n_iter=30 --out results/wise
    python recipes/eval_wise.py --num-edits 20 --checkpoints 1,10,20 --methods WISE-Retrieve,FT

Outputs ``<out>.json`` (``{"meta": {...}, "rows": [...]}``, one row per method and T) and ``<out>.md`` (the table).
Defaults: EasyEdit's WISE hyperparameters, except ``save_freq=25``/``merge_freq=50`` so that 100 edits make four
shards and two merges (EasyEdit's 500/1000 would keep T <= 100 in one shard).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hf_longmem.editing import WISEConfig, fictional_facts, load_edits, unrelated_prompts
from hf_longmem.editing.evaluate import METHODS, run_sequential

DEFAULT_OPTIONS: dict[str, Any] = {"save_freq": 25, "merge_freq": 50}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="local causal LM folder, 'random' (tiny random Llama + the embedded model's tokenizer), "
        "or nothing for the embedded model",
    )
    parser.add_argument("--edits", metavar="FILE", help="ZsRE-format edits (default: generated fictional facts)")
    parser.add_argument("--num-edits", type=int, default=100, help="edits in the stream (default 100)")
    parser.add_argument("--checkpoints", default="1,10,100", help="values of T (default 1,10,100)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="WISEConfig field (repeatable; JSON values)"
    )
    parser.add_argument("--seed", type=int, default=0, help="fact generator and WISE seed")
    parser.add_argument("--init-std", type=float, default=0.1, help="weight init std of --model random (0.1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--out", default="recipes/results/wise_eval", help="output path without extension (git-ignored folder)"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def random_model(seed: int = 0, init_std: float = 0.1) -> tuple[Any, Any]:
    """A tiny random Llama with the shape of the embedded model and its closed word-level tokenizer.

    ``init_std`` is the normal init of its weights: at transformers' default (0.02) the FFN activations of this tiny
    model are about 100 times smaller than the scale EasyEdit's margins (5, 20, 10) assume and attention is nearly
    uniform; 0.1 gives activations of order 1-10 and peaked attention, closer to a trained model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_longmem.evals.vocab import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.config._name_or_path = "random-tiny-llama"
    return model, tokenizer


def load(model_arg: str | None, seed: int, init_std: float = 0.1) -> tuple[Any, Any, str]:
    if model_arg == "random":
        model, tokenizer = random_model(seed, init_std)
        return model, tokenizer, f"random tiny Llama (hidden 192, 4 layers, init std {init_std}; embedded tokenizer)"
    if model_arg is None:
        from hf_longmem import load_default_model

        model, tokenizer = load_default_model()
        return model, tokenizer, "hf_longmem/tiny-longmem (embedded)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_arg, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_arg, local_files_only=True).eval()
    return model, tokenizer, str(model_arg)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| Method | T | Reliability | Generalization | Locality | s / edit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['T']} | {fmt(row['reliability'])} | {fmt(row['generalization'])} | "
            f"{fmt(row['locality'])} | {row['seconds_per_edit']:.2f} |"
        )
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = sorted({int(t) for t in args.checkpoints.split(",") if t.strip()})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if args.num_edits < max(checkpoints):
        raise SystemExit(f"--num-edits {args.num_edits} is smaller than the largest checkpoint {max(checkpoints)}")
    options = dict(DEFAULT_OPTIONS)
    for text in args.option:
        key, _, raw = text.partition("=")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    options.setdefault("seed", args.seed)
    config = WISEConfig.from_dict(options)
    model, tokenizer, model_name = load(args.model, args.seed, args.init_std)
    if args.edits:
        records = load_edits(args.edits, limit=args.num_edits)
        source = str(args.edits)
    else:
        records = fictional_facts(tokenizer, args.num_edits, seed=args.seed, num_paraphrases=1)
        source = f"fictional facts (seed {args.seed})"
    if len(records) < max(checkpoints):
        raise SystemExit(f"only {len(records)} edits available, fewer than T = {max(checkpoints)}")
    irrelevant = [f"{p} {a}" for p, a in unrelated_prompts(tokenizer, len(records), seed=args.seed + 1000)]
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for method in methods:
        rows += run_sequential(
            method,
            model,
            tokenizer,
            records,
            config=config,
            checkpoints=checkpoints,
            irrelevant=irrelevant,
            progress=not args.no_progress,
            on_row=lambda row: print(json.dumps(row), file=sys.stderr, flush=True),
        )
    table = markdown_table(rows)
    meta = {
        "model": model_name,
        "edits": source,
        "num_edits": len(records[: max(checkpoints)]),
        "checkpoints": checkpoints,
        "config": {k: v for k, v in config.to_dict().items() if k != "context_templates"},
        "protocol": "sequential edits; after T edits the first T are evaluated; teacher-forced token accuracy; "
        "locality = agreement with the unedited model on each edit's unrelated prompt",
        "irrelevant_training_samples": f"unrelated_prompts(seed={args.seed + 1000}) (disjoint from the locality set)",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "device": "cpu",
        "threads": args.threads,
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    _write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    _write_atomic(out.with_suffix(".md"), f"Model: {model_name}; edits: {source}\n\n{table}\n")
    print(table)
    print(f"\nresults: {out.with_suffix('.json')} and {out.with_suffix('.md')} ({meta['wall_time_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
