#!/usr/bin/env python
"""Train LongMem's SideNet on top of the embedded tiny model, then evaluate it against the backbone alone.

The frozen backbone (``hf_longmem/assets/tiny-longmem``, trained on ~1k-token tasks) is wrapped by
:class:`hf_longmem.modeling.longmem.LongMemForCausalLM`; only the SideNet (and its memory gate) trains, on generated
long-document tasks of :mod:`hf_longmem.evals.tasks` (longer than one segment, so the answer has to come from the
memory bank). The evaluation answers fresh passkey / needle samples far beyond the backbone's training length with
the trained wrapper, the untrained wrapper (``sidenet_init="zero_output"`` = the backbone on each segment alone) and
the backbone over the full context, and writes a JSON of rows plus a markdown table.

    accelerate launch recipes/train_longmem.py --config recipes/configs/longmem_tiny.yaml
    python recipes/train_longmem.py --config recipes/configs/longmem_tiny.yaml --max_steps 3 --eval_num_samples 2 \\
        --output_dir /tmp/longmem
    python recipes/train_longmem.py --config ... --publish me/longmem-tiny [--publish_root /tmp/hub]

Scores are teacher forced: one forward over ``prompt + " " + answer + EOS``; ``exact`` is 1 when every answer token
and the EOS are the argmax (which is exactly when greedy decoding returns the answer), ``accuracy`` the fraction of
those tokens that are. Every scalar config key can be overridden on the command line (``--learning_rate 1e-3``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from _config import LongSequenceConfig, parse_recipe_config
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from hf_longmem.evals.mixture import TaskMixture, collate
from hf_longmem.evals.tasks import generate_task
from hf_longmem.modeling.longmem import LongMemForCausalLM
from hf_longmem.training import next_token_cross_entropy
from hf_longmem.training.distributed import (
    any_process,
    build_accelerator,
    full_tensor,
    global_share,
    global_weight_total,
    unsharded_model,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig(LongSequenceConfig):
    """Recipe configuration (YAML keys; scalars can be overridden with ``--key value``; the long-sequence options
    ``activation_checkpointing``, ``activation_offload``, ``chunked_ce`` come from :class:`_config.LongSequenceConfig`).

    ``longmem``: :class:`LongMemConfig` fields (segment length, chunk size, bank size, top-k, SideNet layout).
    Training lengths are drawn uniformly in ``[min_length, max_length]`` (multiples of ``length_multiple``); a batch
    holds ``tokens_per_batch // length`` samples. ``max_cpu_minutes`` stops training early when this process has used
    that much CPU time (``time.process_time``: with one thread, the time on one core whatever the machine's load).
    ``eval``: ``tasks`` (label -> generator name and options), ``lengths``, ``num_samples``, ``seed``,
    ``tokens_per_batch``, and which reference models to score (``backbone``, ``untrained``).
    """

    output_dir: str = "runs/longmem-tiny"
    backbone: str = str(ROOT / "hf_longmem/assets/tiny-longmem")
    seed: int = 0
    num_threads: int = 1
    max_steps: int = 300
    max_cpu_minutes: float = 9.5
    tokens_per_batch: int = 4096
    min_length: int = 1024
    max_length: int = 3072
    length_multiple: int = 64
    learning_rate: float = 1e-3
    min_lr_rate: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    answer_loss_weight: float = 5.0
    log_every: int = 10
    eval_num_samples: int = 50
    longmem: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=lambda: {"passkey": 1.0})
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)


EVAL_DEFAULTS: dict[str, Any] = {
    "tasks": {"passkey": {"generator": "passkey", "options": {}}},
    "lengths": [4096, 8192],
    "seed": 1234,
    "tokens_per_batch": 16384,
    "backbone": True,
    "untrained": True,
}


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """``--config`` YAML, scalar ``--key value`` overrides and the run options."""

    def run_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--eval_only", type=Path, default=None, help="evaluate this saved LongMem folder, no training"
        )
        parser.add_argument("--publish", default=None, help="publish the trained model with its card to this repo id")
        parser.add_argument("--publish_root", type=Path, default=None, help="publish into this local folder (offline)")
        parser.add_argument("--results", type=Path, default=None, help="also copy the results JSON here")

    config, args = parse_recipe_config(TrainConfig, argv, __doc__.split("\n\n")[0], run_options)
    config.long_sequence_options()
    if not 0 < config.min_length <= config.max_length:
        raise ValueError(f"need 0 < min_length <= max_length, got {config.min_length}, {config.max_length}")
    if config.max_steps < 1 or config.tokens_per_batch < 1:
        raise ValueError(
            f"max_steps and tokens_per_batch must be >= 1, got {config.max_steps}, {config.tokens_per_batch}"
        )
    unknown_eval = sorted(set(config.eval) - set(EVAL_DEFAULTS))
    if unknown_eval:
        raise ValueError(f"unknown keys in eval: {unknown_eval} (known: {sorted(EVAL_DEFAULTS)})")
    config.eval = {**EVAL_DEFAULTS, **config.eval}
    return config, args


def length_schedule(config: TrainConfig) -> Iterator[tuple[int, int]]:
    """``(length, batch_size)`` per step (seeded)."""
    rng, m = random.Random(config.seed), config.length_multiple
    for _ in range(config.max_steps):
        length = m * rng.randint(-(-config.min_length // m), config.max_length // m)
        yield length, max(1, config.tokens_per_batch // length)


def weighted_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    head: torch.nn.Linear | None = None,
    chunk_size: int = 0,
    accelerator: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted next-token cross entropy (weights of :func:`collate`) and per-row answer exactness ``[b]``; with
    ``chunk_size > 0`` ``logits`` are the final hidden states and ``head``'s chunked cross entropy is used
    (:func:`hf_longmem.training.next_token_cross_entropy`). With several processes the weights are normalised over
    the global batch (:func:`~hf_longmem.training.distributed.global_weight_total`)."""
    targets = batch["input_ids"][:, 1:]
    ce, predictions = next_token_cross_entropy(logits, targets, head, chunk_size)
    weights = batch["loss_weights"]
    exact = ((predictions == targets) | ~batch["answer_mask"]).all(-1)
    total = weights.sum() if accelerator is None else global_weight_total(weights.sum(), accelerator)
    return (ce * weights).sum() / total, exact


def load_backbone(path: str) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backbone = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return backbone, tokenizer


def train(config: TrainConfig) -> tuple[LongMemForCausalLM | None, Any, dict[str, Any]]:
    """Train the SideNet; returns ``(model, tokenizer, metadata)`` (see :func:`train_wrapper`)."""

    def build(backbone):
        return LongMemForCausalLM.from_backbone(backbone, backbone_name_or_path=config.backbone, **config.longmem)

    def gate(model) -> dict[str, Any]:
        return {"gate": torch.sigmoid(full_tensor(model.model.memory_gate_logits())).tolist()}

    return train_wrapper(config, build, gate, "train_longmem")


def train_wrapper(
    config: TrainConfig, build: Callable[[Any], Any], gate: Callable[[Any], dict[str, Any]], name: str
) -> tuple[Any, Any, dict[str, Any]]:
    """Train the memory branch of a wrapper around the frozen backbone (LongMem's SideNet, HCAM's branches).

    Args:
        build: the wrapper model from the loaded backbone.
        gate: the logged gate values of the (unwrapped, possibly sharded) model; every process calls it.
        name: the progress bar's name.

    Returns:
        ``(model, tokenizer, metadata)``; ``model`` is ``None`` on processes other than the main one (they take part
        in training only). Under several processes (DDP or FSDP, ``accelerate launch``) every process draws the same
        global batch of ``tokens_per_batch // length`` samples per process and trains on its share, so a run is the
        single-process run on the same global batch (``tests/training/test_fsdp.py``).
    """
    accelerator = build_accelerator()
    set_seed(config.seed)
    backbone, tokenizer = load_backbone(config.backbone)
    model = build(backbone)
    long_sequence = config.long_sequence_options()
    long_sequence.prepare(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_rate
    )
    # the scheduler stays outside `prepare`: accelerate would step it once per process at every optimizer step,
    # while every process here runs all `max_steps` steps (the schedule would end after max_steps / processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [
        p for p in model.parameters() if p.requires_grad
    ]  # FSDP replaces the parameters (clipping reads these)
    mixture = TaskMixture(tokenizer, config.tasks, config.task_options, seed=config.seed)
    processes = accelerator.num_processes
    schedule = ((length, size * processes) for length, size in length_schedule(config))  # global batches
    recent: dict[str, deque[bool]] = {name: deque(maxlen=100) for name in config.tasks}
    history: list[dict[str, Any]] = []
    tokens_seen, start, cpu_start, steps = 0, time.time(), time.process_time(), 0
    progress = tqdm(total=config.max_steps, disable=not accelerator.is_main_process, desc=name)
    model.train()
    for step, samples in enumerate(mixture.batches(schedule), start=1):
        samples = global_share(samples, accelerator)
        batch = {
            k: v.to(accelerator.device)
            for k, v in collate(samples, tokenizer.pad_token_id, config.answer_loss_weight).items()
        }
        mask = (batch["input_ids"] != tokenizer.pad_token_id).long()  # right padding; pads never enter the memory
        with long_sequence.step(model) as head:
            logits = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits
            loss, exact = weighted_loss(logits, batch, head, long_sequence.chunked_ce, accelerator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += int(accelerator.reduce(mask.sum(), reduction="sum"))
        steps = step
        for sample, ok in zip(samples, exact.tolist()):
            recent[sample.task].append(ok)
        progress.update(1)
        elapsed, cpu = time.time() - start, time.process_time() - cpu_start
        # every process stops at the same step (any one out of CPU time stops them all)
        out_of_time = any_process(cpu > 60 * config.max_cpu_minutes, accelerator)
        if step % config.log_every == 0 or step == config.max_steps or out_of_time:
            row = {
                "step": step,
                "loss": round(accelerator.reduce(loss.detach(), reduction="mean").item(), 6),
                "lr": scheduler.get_last_lr()[0],
                "length": batch["input_ids"].shape[1],
                "elapsed_s": round(elapsed, 1),
                "cpu_s": round(cpu, 1),
                "answer_exact": {k: round(sum(v) / len(v), 3) for k, v in recent.items() if v},
                **gate(accelerator.unwrap_model(model)),
            }
            history.append(row)
            if accelerator.is_main_process:
                tqdm.write(json.dumps(row))
        if out_of_time:
            break
    progress.close()
    # every process takes part (FSDP gathers the shards); the main process gets the whole model
    unwrapped = unsharded_model(accelerator, model)
    if unwrapped is None:
        return None, tokenizer, {}
    unwrapped.eval()
    metadata = {
        "config": asdict(config),
        "steps": steps,
        "distributed": {"type": accelerator.distributed_type.value, "num_processes": processes},
        "tokens_seen": tokens_seen,
        "wall_time_s": round(time.time() - start, 1),
        "cpu_time_s": round(time.process_time() - cpu_start, 1),
        "trainable_parameters": unwrapped.trainable_parameter_count(),
        "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
        "command": " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "history": history,
    }
    return unwrapped, tokenizer, metadata


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def save(model: LongMemForCausalLM, tokenizer: Any, output_dir: Path, metadata: dict[str, Any]) -> None:
    """Model (backbone + SideNet, safetensors, remote-code shims), tokenizer, ``training_metadata.json``."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    write_json_atomic(output_dir / "training_metadata.json", metadata)


# ---------------------------------------------------------------------------------------------------- evaluation
def encode_for_scoring(tokenizer: Any, sample: Any) -> tuple[list[int], int]:
    """``prompt + " " + answer + EOS`` ids and the index of the first scored target (the answer's first token)."""
    prompt = tokenizer(sample.context + sample.turns[0].query, verbose=False)["input_ids"]
    answer = tokenizer(" " + sample.turns[0].answers[0], add_special_tokens=False)["input_ids"]
    return prompt + answer + [tokenizer.eos_token_id], len(prompt)


@torch.no_grad()
def score(model: Any, tokenizer: Any, samples: list[Any], tokens_per_batch: int) -> tuple[list[bool], list[float]]:
    """Teacher-forced ``(exact, token accuracy)`` per sample over the answer tokens and EOS (right-padded batches)."""
    encoded = [encode_for_scoring(tokenizer, s) for s in samples]
    width = max(len(ids) for ids, _ in encoded)
    batch_size = max(1, tokens_per_batch // width)
    exact, accuracy = [], []
    for begin in range(0, len(encoded), batch_size):
        chunk = encoded[begin : begin + batch_size]
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (tokens, _) in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for row, (tokens, first) in enumerate(chunk):
            hits = predicted[row, first - 1 : len(tokens) - 1] == ids[row, first : len(tokens)]
            exact.append(bool(hits.all()))
            accuracy.append(hits.float().mean().item())
    return exact, accuracy


def evaluate_all(models: dict[str, Any], tokenizer: Any, config: TrainConfig) -> list[dict[str, Any]]:
    """One row per (model, task, length)."""
    spec, rows = config.eval, []
    for length in spec["lengths"]:
        for label, task in spec["tasks"].items():
            samples = generate_task(
                task["generator"], tokenizer, length, config.eval_num_samples, spec["seed"], **task.get("options", {})
            )
            for name, (model, cache_label) in models.items():
                start = time.time()
                exact, accuracy = score(model, tokenizer, samples, spec["tokens_per_batch"])
                row = {
                    "model": name,
                    "task": label,
                    "cache": cache_label,
                    "context_length": length,
                    "num_samples": len(samples),
                    "accuracy": sum(accuracy) / len(accuracy),
                    "exact": sum(exact) / len(exact),
                    "options": task.get("options", {}),
                    "mean_num_tokens": sum(s.meta["num_tokens"] for s in samples) / len(samples),
                    "seconds": round(time.time() - start, 1),
                }
                rows.append(row)
                tqdm.write(json.dumps(row))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Exact match (%) by (task, model) and context length."""
    lengths = sorted({r["context_length"] for r in rows})
    keys = list(dict.fromkeys((r["task"], r["model"]) for r in rows))
    cell = {(r["task"], r["model"], r["context_length"]): r["exact"] for r in rows}
    lines = ["| task | model | " + " | ".join(str(n) for n in lengths) + " |", "|---|---" + "|---" * len(lengths) + "|"]
    for task, model in keys:
        values = [f"{100 * cell[task, model, n]:.0f}" if (task, model, n) in cell else "" for n in lengths]
        lines.append(f"| {task} | {model} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def publish_model(model: Any, tokenizer: Any, repo_id: str, results: dict[str, Any], root: Path | None) -> str:
    """``hub.publish`` with the architecture card (``model_cards/architecture.md``); ``root``: offline folder."""
    from hf_longmem.hub import LocalFolderApi, list_card_templates, publish

    template = "architecture" if "architecture" in list_card_templates() else "default"
    description = (
        "LongMem (Wang et al., 2023) around the embedded tiny-longmem Llama: the frozen backbone encodes the input in "
        f"segments of {model.config.segment_length} tokens, a residual SideNet of {model.config.num_sidenet_layers} "
        f"layers retrieves the top-{model.config.topk_chunks} chunks of a {model.config.memory_size}-token memory "
        "bank of earlier segments. Trained with `recipes/train_longmem.py`; the table compares it with the backbone "
        "alone on passkey prompts far beyond the backbone's 1k-token training length."
    )
    return publish(
        model,
        repo_id,
        tokenizer=tokenizer,
        eval_results={"meta": results["meta"], "rows": results["rows"]},
        template=template,
        description=description,
        tags=["longmem", "memory", "long-context"],
        license="apache-2.0",
        api=LocalFolderApi(root) if root is not None else None,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_args(argv)
    torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
    if args.eval_only is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.eval_only, local_files_only=True)
        model = LongMemForCausalLM.from_pretrained(args.eval_only).eval()
        metadata_file = args.eval_only / "training_metadata.json"
        metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    else:
        model, tokenizer, metadata = train(config)
        if model is None:  # another process of a distributed run: the main one saves and evaluates
            return {}
        save(model, tokenizer, output_dir, metadata)
    models: dict[str, tuple[Any, str]] = {"longmem (trained SideNet)": (model, "longmem")}
    if config.eval["untrained"]:
        backbone, _ = load_backbone(config.backbone)
        untrained = LongMemForCausalLM.from_backbone(backbone, **{**config.longmem, "sidenet_init": "zero_output"})
        models["longmem untrained (= backbone per segment)"] = (untrained.eval(), "longmem")
    if config.eval["backbone"]:
        models["backbone alone (full context)"] = (load_backbone(config.backbone)[0], "full")
    start = time.time()
    rows = evaluate_all(models, tokenizer, config) if config.eval_num_samples > 0 else []
    results = {
        "meta": {
            "backbone": os.path.relpath(config.backbone, ROOT)
            if Path(config.backbone).is_absolute()
            else config.backbone,
            "scoring": "teacher-forced: exact = every answer token and EOS is the argmax (= greedy exact match)",
            "eval_seed": config.eval["seed"],
            "train_steps": metadata.get("steps"),
            "train_wall_time_s": metadata.get("wall_time_s"),
            "train_cpu_time_s": metadata.get("cpu_time_s"),
            "train_tokens": metadata.get("tokens_seen"),
            "train_threads": metadata.get("threads"),
            "trainable_parameters": metadata.get("trainable_parameters"),
            "eval_wall_time_s": round(time.time() - start, 1),
            "command": " ".join(["python recipes/train_longmem.py", *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "rows": rows,
        "longmem_config": {k: v for k, v in model.config.to_dict().items() if k != "backbone_config"},
        "history": metadata.get("history", []),
    }
    write_json_atomic(output_dir / "results.json", results)
    if args.results is not None:
        write_json_atomic(args.results, results)
    if rows:
        print(markdown_table(rows))
    if args.publish:
        results["published"] = publish_model(model, tokenizer, args.publish, results, args.publish_root)
        write_json_atomic(output_dir / "results.json", results)
    return results


if __name__ == "__main__":
    main()
