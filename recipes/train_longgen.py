#!/usr/bin/env python
"""LongGen length extension: convert the embedded model to LongGen and fine-tune it at a longer length.

The base is hf_longmem's embedded ``tiny-longmem`` (trained on <= 1k-token tasks; full-attention passkey accuracy
24% at 2048 and 0% at 4096 tokens). :meth:`LongGenForCausalLM.from_pretrained_base` keeps ``longgen.full_layers``
with full attention and gives every other layer the sparse pattern (``longgen.sparse``: sinks + window, or
block-sparse); then every parameter fine-tunes on generated samples of ``hf_longmem.evals.tasks`` at the new length,
as the paper fine-tunes at the target length with partial contexts. The evaluation answers fresh samples with
``generate`` (greedy, exact match, the LongGen cache), for the fine-tuned model and for the base model alone on the
same samples, and writes harness-style JSON rows and a markdown table.

    accelerate launch recipes/train_longgen.py --config recipes/configs/longgen_tiny.yaml
    python recipes/train_longgen.py --config recipes/configs/longgen_tiny.yaml --max_steps 3 --eval_num_samples 2 \\
        --output_dir /tmp/longgen --results /tmp/longgen.json
    python recipes/train_longgen.py --config recipes/configs/longgen_tiny.yaml --eval_only runs/longgen-tiny

Every scalar config key can be overridden on the command line (``--learning_rate 1e-3``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _config import parse_recipe_config
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from hf_longmem.default_model import DEFAULT_MODEL_PATH
from hf_longmem.evals.mixture import TaskMixture, collate
from hf_longmem.evals.tasks import generate_task
from hf_longmem.modeling.longgen import LongGenCache, LongGenForCausalLM
from hf_longmem.training.distributed import build_accelerator, is_sharded, unsharded_model


@dataclass
class TrainConfig:
    """Recipe configuration (YAML keys; scalars can be overridden with ``--key value``).

    Each step draws a length uniformly in ``[min_length, max_length]`` (multiples of 16) and
    ``max(1, tokens_per_batch // length)`` samples of that length from ``tasks`` (weights) with ``task_options``.
    Training stops at ``max_steps`` or after ``max_train_seconds`` (0: no limit), whichever comes first.
    ``longgen`` holds the keyword arguments of :meth:`LongGenForCausalLM.from_pretrained_base` (``full_layers``,
    ``sparse``, ``sink_size``, ``window``, ...). The evaluation runs ``eval_tasks`` at ``eval_lengths`` with
    ``eval_num_samples`` fresh samples each (seed ``eval_seed``), for LongGen and, if ``eval_base``, the base model.
    """

    output_dir: str = "runs/longgen-tiny"
    results: str = "runs/longgen-tiny/eval_results.json"
    base: str = str(DEFAULT_MODEL_PATH)
    seed: int = 0
    num_threads: int = 1
    max_steps: int = 300
    max_train_seconds: float = 0.0
    tokens_per_batch: int = 2048
    min_length: int = 2048
    max_length: int = 2048
    learning_rate: float = 1e-3
    min_lr_rate: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    answer_loss_weight: float = 5.0
    prompt_loss_weight: float = 1.0
    log_every: int = 10
    longgen: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=lambda: {"passkey": 1.0})
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_tasks: list[str] = field(default_factory=lambda: ["passkey"])
    eval_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    eval_num_samples: int = 50
    eval_seed: int = 1234
    eval_base: int = 1


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """``--config`` YAML, scalar ``--key value`` overrides, and ``--eval_only``."""

    def run_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--eval_only", type=Path, default=None, help="evaluate this saved LongGen folder")

    config, args = parse_recipe_config(TrainConfig, argv, __doc__.split("\n\n")[0], run_options)
    if not 0 < config.min_length <= config.max_length:
        raise ValueError(f"need 0 < min_length <= max_length, got {config.min_length}, {config.max_length}")
    if config.max_steps < 1 or config.tokens_per_batch < 1:
        raise ValueError(
            f"max_steps and tokens_per_batch must be >= 1, got {config.max_steps}, {config.tokens_per_batch}"
        )
    return config, args


def weighted_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    answer_weight: float,
    prompt_weight: float,
    accelerator: Accelerator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy weighted ``answer_weight`` on answer targets and ``prompt_weight`` on the other
    (non-pad) targets, and per-row answer exactness (rows are right-padded; the model is causal).

    With ``accelerator`` of ``N`` processes, the loss is normalised by the weight summed over all processes (times
    ``N``), so the gradient DDP / FSDP average equals one process's gradient on the whole global batch.
    """
    logits = logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    answer = batch["answer_mask"].float()
    weights = answer_weight * answer + prompt_weight * (batch["loss_weights"] > 0).float() * (1 - answer)
    exact = ((logits.argmax(-1) == targets) | ~batch["answer_mask"]).all(-1)
    total = weights.sum()
    if accelerator is not None and accelerator.num_processes > 1:
        total = accelerator.reduce(total.detach(), reduction="sum") / accelerator.num_processes
    return (ce * weights).sum() / total, exact


def train(config: TrainConfig) -> tuple[LongGenForCausalLM, Any, dict[str, Any]]:
    """Convert the base model and fine-tune it; returns ``(model, tokenizer, metadata)``."""
    accelerator = build_accelerator()
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.base, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(config.base, local_files_only=True, dtype=torch.float32)
    model = LongGenForCausalLM.from_pretrained_base(base, **config.longgen)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_rate
    )
    # the scheduler stays outside `prepare` (accelerate would step it once per process): one step per global batch
    model, optimizer = accelerator.prepare(model, optimizer)
    # one global batch drawn alike on every process, each taking its contiguous share (as one process would see it)
    mixture = TaskMixture(tokenizer, config.tasks, config.task_options, seed=config.seed)
    rng = random.Random(config.seed)
    history: list[dict[str, Any]] = []
    recent: list[bool] = []
    tokens_seen, start, steps = 0, time.time(), 0
    progress = tqdm(total=config.max_steps, disable=not accelerator.is_main_process, desc="train_longgen")
    model.train()
    for step in range(1, config.max_steps + 1):
        length = 16 * rng.randint(-(-config.min_length // 16), config.max_length // 16)
        per_process = max(1, config.tokens_per_batch // length)
        samples = [mixture.sample(length) for _ in range(per_process * accelerator.num_processes)]
        samples = samples[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
        batch = {
            k: v.to(accelerator.device)
            for k, v in collate(samples, tokenizer.pad_token_id, config.answer_loss_weight).items()
        }
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss, exact = weighted_loss(logits, batch, config.answer_loss_weight, config.prompt_loss_weight, accelerator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += int(batch["input_ids"].numel())
        recent = (recent + exact.tolist())[-50:]
        steps = step
        progress.update(1)
        elapsed = time.time() - start
        if step % config.log_every == 0 or step == config.max_steps:
            row = {
                "step": step,
                "loss": round(accelerator.reduce(loss.detach(), reduction="mean").item(), 6),
                "answer_exact_recent": round(sum(recent) / len(recent), 3),
                "length": batch["input_ids"].shape[1],
                "lr": scheduler.get_last_lr()[0],
                "elapsed_s": round(elapsed, 1),
            }
            history.append(row)
            if accelerator.is_main_process:
                tqdm.write(json.dumps(row))
        if config.max_train_seconds and elapsed > config.max_train_seconds:
            break
    progress.close()
    # every process takes part (FSDP gathers the shards); the main process gets the whole model
    model = unsharded_model(accelerator, model)
    metadata = {
        "config": asdict(config),
        "steps": steps,
        "tokens_seen": tokens_seen * accelerator.num_processes,
        "distributed": {"type": accelerator.distributed_type.value, "num_processes": accelerator.num_processes},
        "train_time_s": round(time.time() - start, 1),
        "num_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "history": history,
    }
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "training_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    if is_sharded(accelerator) and not accelerator.is_main_process:
        # the sharded model's forward is collective: the other processes evaluate the saved whole model
        accelerator.wait_for_everyone()
        model = LongGenForCausalLM.from_pretrained(out)
    elif is_sharded(accelerator):
        accelerator.wait_for_everyone()
    return model, tokenizer, metadata


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, task: str, length: int, num_samples: int, seed: int) -> dict[str, Any]:
    """Greedy exact-match accuracy of ``model.generate`` on fresh samples (batch size 1), and for LongGen the KV
    bytes its cache holds after the prompt next to what a full cache would hold."""
    model.eval()
    samples = generate_task(task, tokenizer, length, num_samples, seed)
    correct, start, kv_ratio = 0, time.time(), []
    for sample in tqdm(samples, desc=f"{task}@{length}", leave=False):
        turn = sample.turns[0]
        ids = tokenizer(sample.context + turn.query, return_tensors="pt")["input_ids"].to(model.device)
        kwargs = {}
        if isinstance(model, LongGenForCausalLM):
            kwargs["cache"] = LongGenCache(model.config)
        out = model.generate(
            ids,
            max_new_tokens=turn.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        if "cache" in kwargs:
            config, seen = model.config, kwargs["cache"].get_seq_length()
            width = 2 * config.num_key_value_heads * config.head_dim * next(model.parameters()).element_size()
            kv_ratio.append(kwargs["cache"].kv_bytes() / (config.num_hidden_layers * seen * width))
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        correct += text.strip() in [a.strip() for a in turn.answers]
    row = {
        "task": task,
        "context_length": length,
        "num_samples": num_samples,
        "accuracy": correct / max(1, num_samples),
        "mean_num_tokens": sum(s.meta["num_tokens"] for s in samples) / max(1, len(samples)),
        "seconds": round(time.time() - start, 1),
    }
    if kv_ratio:
        row["kv_bytes_vs_full"] = round(sum(kv_ratio) / len(kv_ratio), 4)
    return row


def evaluate_all(model: Any, tokenizer: Any, config: TrainConfig, base: Any = None) -> list[dict[str, Any]]:
    """Rows for LongGen (``model="longgen"``) and, when given, the base model (``model="base"``, full attention)."""
    rows = []
    for task in config.eval_tasks:
        for length in config.eval_lengths:
            for name, candidate in (("longgen", model), ("base", base)):
                if candidate is None:
                    continue
                row = evaluate(candidate, tokenizer, task, length, config.eval_num_samples, config.eval_seed)
                row["model"] = name
                rows.append(row)
                tqdm.write(json.dumps(row))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Exact-match accuracy (%) by (task, model) and context length."""
    lengths = sorted({r["context_length"] for r in rows})
    keys = list(dict.fromkeys((r["task"], r["model"]) for r in rows))
    cell = {(r["task"], r["model"], r["context_length"]): r for r in rows}
    lines = ["| task | model | " + " | ".join(str(n) for n in lengths) + " |", "|---|---" + "|---" * len(lengths) + "|"]
    for task, name in keys:
        values = [f"{100 * cell[(task, name, n)]['accuracy']:.0f}" if (task, name, n) in cell else "" for n in lengths]
        lines.append(f"| {task} | {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_args(argv)
    torch.set_num_threads(config.num_threads)
    if args.eval_only is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.eval_only, local_files_only=True)
        model = LongGenForCausalLM.from_pretrained(args.eval_only)
        metadata_file = args.eval_only / "training_metadata.json"
        metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    else:
        model, tokenizer, metadata = train(config)
    base = None
    if config.eval_base:
        base = AutoModelForCausalLM.from_pretrained(config.base, local_files_only=True, dtype=torch.float32)
    start = time.time()
    rows = evaluate_all(model, tokenizer, config, base) if config.eval_num_samples > 0 else []
    results = {
        "meta": {
            "recipe": "recipes/train_longgen.py",
            "command": " ".join(sys.argv),
            "base": config.base,
            "train_time_s": metadata.get("train_time_s"),
            "train_steps": metadata.get("steps"),
            "eval_time_s": round(time.time() - start, 1),
            "eval_seed": config.eval_seed,
            "num_threads": config.num_threads,
            "longgen": {
                k: getattr(model.config, k)
                for k in (
                    "full_layers",
                    "sparse",
                    "sink_size",
                    "window",
                    "block_size",
                    "local_blocks",
                    "vertical_stride",
                )
            },
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        },
        "rows": rows,
    }
    path = Path(config.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(path)
    if rows:
        print(markdown_table(rows))
    return results


if __name__ == "__main__":
    main()
