#!/usr/bin/env python
"""Train HMT's memory (and optional LoRA adapters) on top of the embedded model, then compare it with the backbone.

The backbone is hf_longmem's embedded ``tiny-longmem`` (trained on ~1k-token tasks; full-attention passkey accuracy
drops to 24% at 2048 and 0% at 4096 tokens). HMT reads it in segments of ``hmt.segment_length`` tokens with a memory
token, sensory memory and memory recall; only HMT's parameters (and LoRA, if ``hmt.lora_rank > 0``) train, on
generated samples of ``hf_longmem.evals.tasks`` a few segments long. The evaluation answers fresh passkey / needle
samples far beyond 1k tokens with ``generate`` (greedy, exact match), for the trained HMT and for the backbone alone
on the same samples, and writes harness-style JSON rows (``hub.publish`` turns them into the model card table).

    accelerate launch recipes/train_hmt.py --config recipes/configs/hmt_tiny.yaml
    python recipes/train_hmt.py --config recipes/configs/hmt_tiny.yaml --max_steps 3 --eval_num_samples 2 \\
        --output_dir /tmp/hmt --results /tmp/hmt.json
    python recipes/train_hmt.py --config recipes/configs/hmt_tiny.yaml --eval_only runs/hmt-tiny
    python recipes/train_hmt.py --config ... --eval_only runs/hmt-tiny --publish me/hmt-tiny [--publish_root /tmp/hub]

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
from _config import LongSequenceConfig, parse_recipe_config
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from hf_longmem.default_model import DEFAULT_MODEL_PATH
from hf_longmem.evals.mixture import TaskMixture, collate
from hf_longmem.evals.tasks import generate_task
from hf_longmem.modeling.hmt import HMTForCausalLM
from hf_longmem.training import next_token_cross_entropy
from hf_longmem.training.distributed import build_accelerator, global_share, global_weight_total, unsharded_model


@dataclass
class TrainConfig(LongSequenceConfig):
    """Recipe configuration (YAML keys; scalars can be overridden with ``--key value``; the long-sequence options
    ``activation_checkpointing``, ``activation_offload``, ``chunked_ce`` come from :class:`_config.LongSequenceConfig`).

    Training draws, per step, a length uniformly in ``[min_length, max_length]`` (multiples of 16) and
    ``max(1, tokens_per_batch // length)`` samples of that length from ``tasks`` (weights) with ``task_options``.
    Training stops at ``max_steps`` or after ``max_train_seconds`` (0: no limit), whichever comes first.
    ``curriculum`` (optional) is a list of stages ``{until, min_length, max_length, task_options}``: a step uses the
    first stage with ``progress < until``, where progress is the larger of the step and time fractions; a stage's
    keys default to the top-level ones.
    ``hmt`` holds :class:`~hf_longmem.modeling.hmt.HMTConfig` fields. The evaluation runs ``eval_tasks`` at
    ``eval_lengths`` with ``eval_num_samples`` fresh samples each (seed ``eval_seed``), for HMT and, if
    ``eval_backbone``, for the backbone alone. An ``eval_tasks`` entry is a task name of
    ``hf_longmem.evals.tasks`` or ``{label, task, options, num_samples}`` (e.g. a 1-digit passkey).
    """

    output_dir: str = "runs/hmt-tiny"
    results: str = "runs/hmt-tiny/eval_results.json"
    backbone: str = str(DEFAULT_MODEL_PATH)
    seed: int = 0
    num_threads: int = 1
    max_steps: int = 300
    max_train_seconds: float = 0.0
    tokens_per_batch: int = 2048
    min_length: int = 256
    max_length: int = 1024
    learning_rate: float = 2e-3
    min_lr_rate: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    answer_loss_weight: float = 5.0
    prompt_loss_weight: float = 1.0
    log_every: int = 10
    hmt: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=lambda: {"passkey": 1.0})
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    eval_tasks: list[Any] = field(default_factory=lambda: ["passkey"])
    eval_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 8192])
    eval_num_samples: int = 50
    eval_seed: int = 1234
    eval_backbone: int = 1


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """``--config`` YAML, scalar ``--key value`` overrides, and the run options (eval-only, publish)."""

    def run_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--eval_only", type=Path, default=None, help="evaluate this saved HMT folder, no training")
        parser.add_argument("--publish", default=None, help="publish the model with its card to this repo id")
        parser.add_argument("--publish_root", type=Path, default=None, help="publish into this local folder instead")

    config, args = parse_recipe_config(TrainConfig, argv, __doc__.split("\n\n")[0], run_options)
    config.long_sequence_options()
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
    head: torch.nn.Linear | None = None,
    chunk_size: int = 0,
    accelerator: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy weighted ``answer_weight`` on answer targets and ``prompt_weight`` on the other
    (non-pad) targets, and per-row answer exactness. With ``chunk_size > 0`` ``logits`` are the final hidden states
    (head bypassed) and the chunked cross entropy of ``head`` is used
    (:func:`hf_longmem.training.next_token_cross_entropy`).

    Rows are right-padded: HMT is causal, so the pads after a row's end never change that row's outputs. With
    several processes the weights are normalised over the global batch
    (:func:`~hf_longmem.training.distributed.global_weight_total`).
    """
    targets = batch["input_ids"][:, 1:]
    ce, predictions = next_token_cross_entropy(logits, targets, head, chunk_size)
    answer = batch["answer_mask"].float()
    weights = answer_weight * answer + prompt_weight * (batch["loss_weights"] > 0).float() * (1 - answer)
    exact = ((predictions == targets) | ~batch["answer_mask"]).all(-1)
    total = weights.sum() if accelerator is None else global_weight_total(weights.sum(), accelerator)
    return (ce * weights).sum() / total, exact


def train(config: TrainConfig) -> tuple[HMTForCausalLM | None, Any, dict[str, Any]]:
    """Wrap the backbone in HMT and train the memory parts; returns ``(model, tokenizer, metadata)``, saved to
    ``output_dir`` (``model`` is ``None`` on processes other than the main one: they take part in training only).

    Under several processes (DDP or FSDP, ``accelerate launch``) every process draws the same global batch of
    ``tokens_per_batch // length`` samples per process and trains on its share, so a run is the single-process run
    on the same global batch (``tests/training/test_fsdp.py``)."""
    accelerator = build_accelerator()
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.backbone, local_files_only=True)
    backbone = AutoModelForCausalLM.from_pretrained(config.backbone, local_files_only=True, dtype=torch.float32)
    model = HMTForCausalLM.from_backbone(backbone, backbone_name_or_path=config.backbone, **config.hmt)
    long_sequence = config.long_sequence_options()
    long_sequence.prepare(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_rate
    )
    # the scheduler stays outside `prepare`: accelerate would step it once per process at every optimizer step,
    # while every process here runs all `max_steps` steps (the schedule would end after max_steps / processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    parameters = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces them (clipping reads these)
    processes = accelerator.num_processes
    stages = config.curriculum or [{"until": 1.0}]
    mixtures = [
        TaskMixture(
            tokenizer,
            config.tasks,
            stage.get("task_options", config.task_options),
            seed=config.seed + 1000 * index,
        )
        for index, stage in enumerate(stages)
    ]
    rng = random.Random(config.seed)
    history: list[dict[str, Any]] = []
    recent: list[bool] = []
    tokens_seen, start, steps = 0, time.time(), 0
    progress = tqdm(total=config.max_steps, disable=not accelerator.is_main_process, desc="train_hmt")
    model.train()
    for step in range(1, config.max_steps + 1):
        fraction = (step - 1) / config.max_steps
        if config.max_train_seconds:
            fraction = max(fraction, synced_elapsed(accelerator, start) / config.max_train_seconds)
        index = next((i for i, stage in enumerate(stages) if fraction < stage["until"]), len(stages) - 1)
        low, high = (
            stages[index].get("min_length", config.min_length),
            stages[index].get("max_length", config.max_length),
        )
        length = 16 * rng.randint(-(-low // 16), high // 16)
        per_process = max(1, config.tokens_per_batch // length)
        samples = [mixtures[index].sample(length) for _ in range(per_process * processes)]  # the global batch
        samples = global_share(samples, accelerator)
        batch = {
            k: v.to(accelerator.device)
            for k, v in collate(samples, tokenizer.pad_token_id, config.answer_loss_weight).items()
        }
        with long_sequence.step(model) as head:
            logits = model(input_ids=batch["input_ids"]).logits
            loss, exact = weighted_loss(
                logits,
                batch,
                config.answer_loss_weight,
                config.prompt_loss_weight,
                head,
                long_sequence.chunked_ce,
                accelerator,
            )
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        real = batch["input_ids"] != tokenizer.pad_token_id
        tokens_seen += int(accelerator.reduce(real.sum(), reduction="sum"))
        recent = (recent + exact.tolist())[-100:]
        steps = step
        progress.update(1)
        elapsed = synced_elapsed(accelerator, start) if config.max_train_seconds else time.time() - start
        if step % config.log_every == 0 or step == config.max_steps:
            row = {
                "step": step,
                "loss": round(accelerator.reduce(loss.detach(), reduction="mean").item(), 6),
                "answer_exact_recent": round(sum(recent) / len(recent), 3),
                "length": batch["input_ids"].shape[1],
                "stage": index,
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
    if model is None:
        return None, tokenizer, {}
    metadata = {
        "config": asdict(config),
        "steps": steps,
        "distributed": {"type": accelerator.distributed_type.value, "num_processes": processes},
        "tokens_seen": tokens_seen,
        "train_time_s": round(time.time() - start, 1),
        "trainable_parameters": model.trainable_parameter_count(),
        "num_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "history": history,
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return model, tokenizer, metadata


def synced_elapsed(accelerator: Any, start: float) -> float:
    """Seconds since ``start``, the largest over the processes (so that every process picks the same curriculum
    stage and stops at the same step)."""
    elapsed = time.time() - start
    if accelerator.num_processes > 1:
        elapsed = float(accelerator.gather(torch.tensor([elapsed], device=accelerator.device)).max())
    return elapsed


@torch.no_grad()
def evaluate(
    model: Any, tokenizer: Any, task: str, length: int, num_samples: int, seed: int, options: dict | None = None
) -> dict[str, Any]:
    """Greedy exact-match accuracy of ``model.generate`` on fresh samples (batch size 1, no padding), and the share
    of samples whose first generated token is the answer's first token (e.g. the key's first digit: a backbone
    trained on 5-digit keys that finds a 1-digit key still appends more digits)."""
    model.eval()
    samples = generate_task(task, tokenizer, length, num_samples, seed, **(options or {}))
    correct, first_correct, start = 0, 0, time.time()
    for sample in tqdm(samples, desc=f"{task}@{length}", leave=False):
        turn = sample.turns[0]
        first = tokenizer(" " + turn.answers[0], add_special_tokens=False)["input_ids"][0]
        ids = tokenizer(sample.context + turn.query, return_tensors="pt")["input_ids"].to(model.device)
        out = model.generate(
            ids,
            max_new_tokens=turn.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        correct += text.strip() in [a.strip() for a in turn.answers]
        first_correct += out.shape[1] > ids.shape[1] and int(out[0, ids.shape[1]]) == first
    return {
        "task": task,
        "context_length": length,
        "num_samples": num_samples,
        "accuracy": correct / max(1, num_samples),
        "first_token_accuracy": first_correct / max(1, num_samples),
        "mean_num_tokens": sum(s.meta["num_tokens"] for s in samples) / max(1, len(samples)),
        "seconds": round(time.time() - start, 1),
    }


def evaluate_all(model: Any, tokenizer: Any, config: TrainConfig, backbone: Any = None) -> list[dict[str, Any]]:
    """Rows for HMT (``cache="hmt"``) and, when given, the backbone alone (``cache="none"``, full attention)."""
    hmt_kwargs = {
        key: getattr(model.config, key)
        for key in ("segment_length", "sensory_length", "num_memories", "num_memory_tokens", "lora_rank")
    }
    rows = []
    for entry in config.eval_tasks:
        spec = {"label": entry, "task": entry} if isinstance(entry, str) else dict(entry)
        num_samples = int(spec.get("num_samples", config.eval_num_samples))
        for length in config.eval_lengths:
            for name, candidate, kwargs in (("hmt", model, hmt_kwargs), ("none", backbone, {})):
                if candidate is None:
                    continue
                row = evaluate(
                    candidate, tokenizer, spec["task"], length, num_samples, config.eval_seed, spec.get("options")
                )
                row.update({"task": spec.get("label", spec["task"]), "model": "hmt-tiny-longmem"})
                row.update({"cache": name, "cache_kwargs": kwargs, "task_options": spec.get("options", {})})
                rows.append(row)
                tqdm.write(json.dumps(row))
    return rows


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    first = row.get("first_token_accuracy")
    return f"{100 * row['accuracy']:.0f}" + ("" if first is None else f" ({100 * first:.0f})")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Exact-match accuracy (%) by (task, method) and context length; first-token accuracy in parentheses."""
    lengths = sorted({r["context_length"] for r in rows})
    label = {"hmt": "HMT (trained memory)", "none": "backbone alone"}
    keys = list(dict.fromkeys((r["task"], r["cache"]) for r in rows))
    cell = {(r["task"], r["cache"], r["context_length"]): r for r in rows}
    lines = ["| task | model | " + " | ".join(str(n) for n in lengths) + " |", "|---|---" + "|---" * len(lengths) + "|"]
    for task, cache in keys:
        values = [_cell(cell.get((task, cache, n))) for n in lengths]
        lines.append(f"| {task} | {label.get(cache, cache)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def publish_model(model: Any, tokenizer: Any, repo_id: str, results: Path, root: Path | None) -> str:
    """``hub.publish`` with the HMT card (``model_cards/hmt.md``).

    The generic ``architecture`` card describes models trained from scratch and scored teacher-forced; HMT wraps a
    pretrained backbone and is scored with ``generate`` against that backbone, which its own card says.
    """
    from hf_longmem.hub import LocalFolderApi, publish

    return publish(
        model,
        repo_id,
        tokenizer=tokenizer,
        eval_results=results,
        template="hmt",
        tags=["hmt", "memory", "long-context"],
        license="apache-2.0",
        api=LocalFolderApi(root) if root is not None else None,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_args(argv)
    torch.set_num_threads(config.num_threads)
    if args.eval_only is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.eval_only, local_files_only=True)
        model = HMTForCausalLM.from_pretrained(args.eval_only)
        metadata_file = args.eval_only / "training_metadata.json"
        metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    else:
        model, tokenizer, metadata = train(config)
        if model is None:  # another process of a distributed run: the main one evaluates
            return {}
    backbone = None
    if config.eval_backbone:
        backbone = AutoModelForCausalLM.from_pretrained(config.backbone, local_files_only=True, dtype=torch.float32)
    start = time.time()
    rows = evaluate_all(model, tokenizer, config, backbone) if config.eval_num_samples > 0 else []
    results = {
        "meta": {
            "recipe": "recipes/train_hmt.py",
            "command": " ".join(sys.argv),
            "backbone": config.backbone,
            "train_time_s": metadata.get("train_time_s"),
            "train_steps": metadata.get("steps"),
            "trainable_parameters": metadata.get("trainable_parameters"),
            "eval_time_s": round(time.time() - start, 1),
            "eval_seed": config.eval_seed,
            "num_threads": config.num_threads,
            "hmt": {k: v for k, v in model.config.to_dict().items() if k != "backbone_config"},
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
    if args.publish:
        print("published:", publish_model(model, tokenizer, args.publish, path, args.publish_root))
    return results


if __name__ == "__main__":
    main()
