#!/usr/bin/env python
"""Train CMT's memory parts on top of the embedded model, then compare with the backbone alone far beyond 1k tokens.

Only the compressor trains (memory tokens, LoRA adapters used while compressing, the self-matching key projection);
the LM's weights never change. Training samples are generated passkey / multi-key needle prompts of
``train_min_length``..``train_max_length`` tokens (the backbone's own training range): the context is split at
sentence ends into documents of at most ``max_document_tokens`` tokens, which become the sample's memories; the loss
is the answer's cross entropy after the top-k aggregated prefix (gold memory + the best-scoring others) plus the
self-matching loss (:meth:`CMTForCausalLM.memory_training_loss`).

Evaluation, on fresh samples (seed ``eval_seed``) at each of ``eval_lengths``:

- **backbone alone**: greedy answer of the embedded LM given the whole prompt (context + question) in its context;
- **CMT**: ``model.memorize(context)`` (split into documents), then greedy ``generate`` from the question alone.

    accelerate launch recipes/train_cmt.py --config recipes/configs/cmt.yaml
    python recipes/train_cmt.py --config recipes/configs/cmt.yaml --max_steps 3 --eval_num_samples 2 --output_dir /tmp/x
    python recipes/train_cmt.py --config recipes/configs/cmt.yaml --eval_only runs/cmt --publish me/tiny-cmt

Writes the model (``save_pretrained``), tokenizer and ``results.json`` (harness-style rows ``{model, task, cache,
context_length, num_samples, accuracy, ...}``) into ``output_dir`` and prints a markdown table. ``--publish REPO``
uploads the trained wrapper with its card through :func:`hf_longmem.hub.publish` (``--publish_folder DIR`` writes the
repository into a local folder with :class:`hf_longmem.hub.LocalFolderApi` instead of the Hub).
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
from _config import parse_recipe_config
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from hf_longmem.default_model import DEFAULT_MODEL_PATH, load_default_model
from hf_longmem.evals.haystack import PromptTooLongError
from hf_longmem.evals.tasks import generate_task
from hf_longmem.modeling.cmt import CMTForCausalLM
from hf_longmem.modeling.cmt.documents import left_pad, split_text
from hf_longmem.training.distributed import build_accelerator, global_share, unsharded_model


@dataclass
class CMTRecipeConfig:
    """Recipe configuration (YAML keys; scalars can be overridden with ``--key value``)."""

    output_dir: str = "runs/cmt"
    seed: int = 0
    num_threads: int = 1
    max_steps: int = 600
    batch_size: int = 4
    learning_rate: float = 2e-3
    min_lr_rate: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    retrieval_weight: float = 1.0
    document_weight: float = 0.0
    distill_weight: float = 1.0
    train_min_length: int = 256
    train_max_length: int = 1024
    log_every: int = 25
    eval_lengths: list[int] = field(default_factory=lambda: [4096, 8192])
    eval_num_samples: int = 30
    eval_seed: int = 4321
    eval_tasks: list[str] = field(default_factory=lambda: ["passkey"])
    eval_baseline: bool = True
    model: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=lambda: {"passkey": 1.0})
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> tuple[CMTRecipeConfig, argparse.Namespace]:
    """``--config`` YAML, scalar ``--key value`` overrides, and the run options (``--eval_only``, ``--publish``)."""

    def run_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--eval_only", type=Path, default=None, help="evaluate this saved CMT model, do not train")
        parser.add_argument("--publish", default=None, help="repo id to publish the trained model to")
        parser.add_argument("--publish_folder", type=Path, default=None, help="publish into this local folder instead")
        parser.add_argument("--eval_lengths", type=int, nargs="+", default=None)
        parser.add_argument("--eval_tasks", nargs="+", default=None)

    config, args = parse_recipe_config(
        CMTRecipeConfig, argv, __doc__.split("\n\n")[0], run_options, extra_overrides=("eval_lengths", "eval_tasks")
    )
    if not 0 < config.train_min_length <= config.train_max_length:
        raise ValueError(
            f"need 0 < train_min_length <= train_max_length, got {config.train_min_length}, {config.train_max_length}"
        )
    if config.max_steps < 1 or config.batch_size < 1:
        raise ValueError(f"max_steps and batch_size must be >= 1, got {config.max_steps}, {config.batch_size}")
    if config.eval_num_samples < 0:
        raise ValueError(f"eval_num_samples must be >= 0 (0: no evaluation), got {config.eval_num_samples}")
    return config, args


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def sample_documents(sample, tokenizer, max_document_tokens: int) -> tuple[list[list[int]], int | None]:
    """The context's documents (token ids, BOS each) and the index of the first one that states the answer."""
    pieces = split_text(sample.context, tokenizer, max_document_tokens)
    answer = sample.turns[0].answers[0]
    gold = next((i for i, p in enumerate(pieces) if answer in tokenizer.decode(p, skip_special_tokens=True)), None)
    return pieces, gold


def make_batch(samples, tokenizer, max_document_tokens: int) -> dict[str, torch.Tensor]:
    """Collate samples into the inputs of :meth:`CMTForCausalLM.memory_training_loss`."""
    documents, owners, golds, questions, qa, labels = [], [], [], [], [], []
    for index, sample in enumerate(samples):
        pieces, gold = sample_documents(sample, tokenizer, max_document_tokens)
        golds.append(len(documents) + gold)
        documents += pieces
        owners += [index] * len(pieces)
        turn = sample.turns[0]
        question = tokenizer(turn.query, verbose=False)["input_ids"]
        answer = tokenizer(" " + turn.answers[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        questions.append(question)
        qa.append(question + answer)
        labels.append([-100] * len(question) + answer)
    document_ids, document_mask = left_pad(documents, tokenizer.pad_token_id)
    question_ids, question_mask = left_pad(questions, tokenizer.pad_token_id)
    width = max(len(x) for x in qa)
    qa_ids = torch.full((len(qa), width), tokenizer.pad_token_id, dtype=torch.long)
    qa_mask = torch.zeros_like(qa_ids)
    qa_labels = torch.full_like(qa_ids, -100)
    for row, (ids, lab) in enumerate(zip(qa, labels)):
        qa_ids[row, : len(ids)], qa_mask[row, : len(ids)] = torch.tensor(ids), 1
        qa_labels[row, : len(lab)] = torch.tensor(lab)
    return {
        "document_ids": document_ids,
        "document_mask": document_mask,
        "document_owner": torch.tensor(owners),
        "gold_document": torch.tensor(golds),
        "question_ids": question_ids,
        "question_mask": question_mask,
        "qa_ids": qa_ids,
        "qa_mask": qa_mask,
        "qa_labels": qa_labels,
    }


def sample_stream(config: CMTRecipeConfig, tokenizer, max_document_tokens: int):
    """Infinite seeded stream of training samples whose answer lies in one document."""
    rng = random.Random(config.seed)
    names = list(config.tasks)
    counter = 0
    while True:
        name = rng.choices(names, weights=[config.tasks[n] for n in names])[0]
        options = {
            key: rng.choice(value) if isinstance(value, list) else value
            for key, value in config.task_options.get(name, {}).items()
        }
        length = rng.randint(config.train_min_length, config.train_max_length)
        counter += 1
        try:
            (sample,) = generate_task(name, tokenizer, length, 1, 10**6 * (config.seed + 1) + counter, **options)
        except PromptTooLongError:
            continue
        if sample_documents(sample, tokenizer, max_document_tokens)[1] is not None:
            yield sample


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy(model, ids: list[int], max_new_tokens: int, pad_id: int) -> list[int]:
    out = model.generate(
        input_ids=torch.tensor([ids], device=model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return out[0, len(ids) :].tolist()


def evaluate(model: CMTForCausalLM, tokenizer, config: CMTRecipeConfig) -> list[dict[str, Any]]:
    """Accuracy (greedy exact match) of the backbone alone (whole prompt) and of CMT (memorized context)."""
    rows = []
    top_k = model.config.memory_top_k
    for task in config.eval_tasks:
        for length in config.eval_lengths:
            samples = generate_task(task, tokenizer, length, config.eval_num_samples, config.eval_seed)
            hits = {"cmt": 0, "backbone": 0}
            retrieved_gold, seconds = 0, {"cmt": 0.0, "backbone": 0.0}
            for sample in tqdm(samples, desc=f"eval {task} {length}", leave=False):
                turn = sample.turns[0]
                question = tokenizer(turn.query, verbose=False)["input_ids"]
                pieces, gold = sample_documents(sample, tokenizer, model.config.max_document_tokens)
                start = time.time()
                model.forget()
                names = model.memorize(pieces, doc_ids=[f"piece-{i}" for i in range(len(pieces))])
                out = model.generate(
                    input_ids=torch.tensor([question], device=model.device),
                    max_new_tokens=turn.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    return_dict_in_generate=True,
                )
                answer = tokenizer.decode(out.sequences[0, len(question) :], skip_special_tokens=True).strip()
                hits["cmt"] += answer in turn.answers
                retrieved = out.cache.retrieved_doc_ids[0] if out.cache.retrieved_doc_ids else []
                retrieved_gold += gold is not None and names[gold] in retrieved
                seconds["cmt"] += time.time() - start
                if config.eval_baseline:
                    start = time.time()
                    prompt = tokenizer(sample.context, verbose=False)["input_ids"]
                    prompt += tokenizer(turn.query, add_special_tokens=False, verbose=False)["input_ids"]
                    tokens = greedy(model.backbone, prompt, turn.max_new_tokens, tokenizer.pad_token_id)
                    hits["backbone"] += tokenizer.decode(tokens, skip_special_tokens=True).strip() in turn.answers
                    seconds["backbone"] += time.time() - start
            n = len(samples)
            mean_tokens = sum(s.meta["num_tokens"] for s in samples) / n
            rows.append(
                {
                    "model": "tiny-longmem + CMT",
                    "task": task,
                    "cache": "cmt",
                    "cache_kwargs": {
                        "memory_top_k": top_k,
                        "num_memory_tokens": model.config.num_memory_tokens,
                        "max_document_tokens": model.config.max_document_tokens,
                    },
                    "options": {"method": "cmt", "memory_top_k": top_k},
                    "context_length": length,
                    "num_samples": n,
                    "accuracy": hits["cmt"] / n,
                    "retrieval_recall": retrieved_gold / n,
                    "mean_num_tokens": mean_tokens,
                    "prompt_tokens_seen_by_llm": top_k * model.config.num_memory_tokens,
                    "seconds": round(seconds["cmt"], 1),
                }
            )
            if config.eval_baseline:
                rows.append(
                    {
                        "model": "tiny-longmem (backbone alone)",
                        "task": task,
                        "cache": "full",
                        "cache_kwargs": {},
                        "options": {"method": "backbone, whole prompt in context"},
                        "context_length": length,
                        "num_samples": n,
                        "accuracy": hits["backbone"] / n,
                        "mean_num_tokens": mean_tokens,
                        "seconds": round(seconds["backbone"], 1),
                    }
                )
            tqdm.write(json.dumps(rows[-2:] if config.eval_baseline else rows[-1:]))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy (%) by task and length: backbone alone vs CMT (and CMT's retrieval recall)."""
    lines = [
        "| task | context tokens | backbone alone (whole prompt) | CMT (memorized context) | CMT retrieval recall |",
        "|---|---:|---:|---:|---:|",
    ]
    keyed = {(r["task"], r["context_length"], r["cache"]): r for r in rows}
    for task, length in dict.fromkeys((r["task"], r["context_length"]) for r in rows):
        base, cmt = keyed.get((task, length, "full")), keyed[(task, length, "cmt")]
        base_cell = f"{100 * base['accuracy']:.0f}%" if base else "–"
        lines.append(
            f"| {task} | {length:,} | {base_cell} | {100 * cmt['accuracy']:.0f}% | "
            f"{100 * cmt['retrieval_recall']:.0f}% |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------------------


class MemoryTrainingStep(torch.nn.Module):
    """:meth:`CMTForCausalLM.memory_training_loss` as a module's ``forward``.

    DDP and FSDP act in the forward of the module they wrap: DDP arms its gradient all-reduce there (a method of the
    unwrapped model called directly leaves every process with its own gradients) and FSDP gathers the root's
    parameters there. Wrapping this module makes the recipe's training step that forward.
    """

    def __init__(self, model: CMTForCausalLM):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP's auto-wrap reads the root's

    def forward(self, **kwargs) -> dict[str, torch.Tensor]:
        return self.model.memory_training_loss(**kwargs)


def train(config: CMTRecipeConfig, accelerator: Accelerator) -> tuple[CMTForCausalLM | None, Any, dict[str, Any]]:
    """Train the compressor; returns ``(model, tokenizer, training record)`` (``model`` is ``None`` on processes other
    than the main one).

    Every process draws the same global batch of ``batch_size`` samples per process and trains on its share (under
    DDP or FSDP, through :class:`MemoryTrainingStep`)."""
    set_seed(config.seed)
    backbone, tokenizer = load_default_model()
    model = CMTForCausalLM.from_backbone(
        backbone, backbone_name_or_path="hf_longmem/assets/tiny-longmem", **config.model
    )
    step_module = MemoryTrainingStep(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_rate
    )
    # the scheduler stays outside `prepare`: accelerate would step it once per process at every optimizer step,
    # while every process here runs all `max_steps` steps (the schedule would end after max_steps / processes)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    parameters = [p for p in step_module.parameters() if p.requires_grad]  # FSDP replaces them (clipping reads these)
    unwrapped = accelerator.unwrap_model(step_module).model
    processes = accelerator.num_processes
    stream = sample_stream(config, tokenizer, unwrapped.config.max_document_tokens)
    generator = torch.Generator().manual_seed(config.seed)
    history, window = [], []
    start = time.time()
    unwrapped.train()
    unwrapped.backbone.eval()  # frozen: no dropout either
    progress = tqdm(range(1, config.max_steps + 1), desc="train_cmt", disable=not accelerator.is_main_process)
    for step in progress:
        samples = global_share([next(stream) for _ in range(config.batch_size * processes)], accelerator)
        batch = {
            k: v.to(accelerator.device)
            for k, v in make_batch(samples, tokenizer, unwrapped.config.max_document_tokens).items()
        }
        out = step_module(
            **batch,
            retrieval_weight=config.retrieval_weight,
            document_weight=config.document_weight,
            distill_weight=config.distill_weight,
            generator=generator,
        )
        accelerator.backward(out["loss"])
        accelerator.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append({k: float(accelerator.reduce(v.detach(), reduction="mean")) for k, v in out.items()})
        if step % config.log_every == 0 or step == config.max_steps:
            row = {k: round(sum(w[k] for w in window) / len(window), 6) for k in window[0]}
            row.update(step=step, lr=scheduler.get_last_lr()[0], elapsed_s=round(time.time() - start, 1))
            history.append(row)
            window = []
            progress.set_postfix(qa=row["qa_loss"], ret=row["retrieval_accuracy"])
            if accelerator.is_main_process:
                tqdm.write(json.dumps(row))
    # every process takes part (FSDP gathers the shards); the main process gets the whole model
    unwrapped = unsharded_model(accelerator, accelerator.unwrap_model(step_module).model)
    if unwrapped is None:
        return None, tokenizer, {}
    record = {
        "steps": config.max_steps,
        "distributed": {"type": accelerator.distributed_type.value, "num_processes": processes},
        "samples_seen": config.max_steps * config.batch_size * processes,
        "train_wall_time_s": round(time.time() - start, 1),
        "trainable_parameters": unwrapped.trainable_parameter_count(),
        "total_parameters": sum(p.numel() for p in unwrapped.parameters()),
        "history": history,
    }
    unwrapped.eval()
    return unwrapped, tokenizer, record


def publish_model(model, tokenizer, results_path: Path, repo_id: str, folder: Path | None) -> str:
    """Upload (or write into ``folder``) the trained wrapper with the architecture card and the results table."""
    from hf_longmem.hub import LocalFolderApi, publish

    model.forget()  # publish the trained memory parts, not the last evaluation's memories
    description = (
        "CMT (Compression Memory Training, Li et al., AAAI 2025) around the frozen embedded `tiny-longmem` Llama: "
        "`model.memorize(documents, tokenizer=tokenizer)` compresses documents into a bounded memory bank, and "
        "`generate` answers a question from the top-k self-matched memories, given to the frozen LM as a KV prefix. "
        "Only the compressor (memory tokens, LoRA adapters active while compressing, key projection) was trained. "
        "Accuracy below is greedy exact match on fresh samples: CMT answers from the memorized context, the "
        "backbone alone gets the whole prompt in its context."
    )
    return publish(
        model,
        repo_id,
        tokenizer=tokenizer,
        eval_results=str(results_path),
        template="architecture",
        description=description,
        base_model=None,
        tags=["cmt", "memory", "long-context"],
        license="apache-2.0",
        api=LocalFolderApi(folder) if folder is not None else None,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_args(argv)
    torch.set_num_threads(config.num_threads)
    accelerator = build_accelerator()
    output_dir = Path(config.output_dir)
    if args.eval_only is not None:
        model = AutoModelForCausalLM.from_pretrained(args.eval_only).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.eval_only)
        record = json.loads((args.eval_only / "results.json").read_text()).get("meta", {}).get("training", {})
    else:
        model, tokenizer, record = train(config, accelerator)
        if model is None:  # another process of a distributed run: the main one evaluates and saves
            return {}
    rows = []
    start = time.time()
    if accelerator.is_main_process and config.eval_num_samples > 0:
        rows = evaluate(model, tokenizer, config)
    meta = {
        "recipe": "recipes/train_cmt.py",
        "command": " ".join(["python recipes/train_cmt.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": asdict(config),
        "backbone": str(DEFAULT_MODEL_PATH.relative_to(DEFAULT_MODEL_PATH.parents[2])),
        "training": record,
        "eval_wall_time_s": round(time.time() - start, 1),
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "num_threads": config.num_threads,
        "decoding": "greedy, exact match after stripping whitespace",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    result = {"meta": meta, "rows": rows}
    if accelerator.is_main_process:
        model.forget()
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        temporary = output_dir / "results.json.tmp"
        temporary.write_text(json.dumps(result, indent=2) + "\n")
        temporary.replace(output_dir / "results.json")
        if rows:
            print(markdown_table(rows))
        if args.publish:
            print(
                "published:",
                publish_model(model, tokenizer, output_dir / "results.json", args.publish, args.publish_folder),
            )
    return result


if __name__ == "__main__":
    main()
