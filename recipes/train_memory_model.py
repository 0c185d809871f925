#!/usr/bin/env python
"""Train any registered causal-LM architecture from scratch on generated recall tasks and evaluate its recall.

    accelerate launch recipes/train_memory_model.py --config recipes/configs/memory_titans_mag.yaml
    python recipes/train_memory_model.py --config recipes/configs/memory_swa.yaml --max_steps 3 --output_dir /tmp/x

Interface (stable; every architecture uses the same recipe, only its YAML differs):

- ``model``: ``{model_type: <registered type>, **config kwargs}``, e.g. ``titans``, ``mom``, ``mistral``, ``llama``.
  ``vocab_size`` and the special token ids come from the closed tokenizer of :mod:`hf_longmem.evals.vocab`. An
  ``hf_longmem`` architecture is imported (``hf_longmem.modeling.<model_type>``) when its type is not registered
  yet. The model is built with ``AutoModelForCausalLM.from_config`` after ``set_seed(seed)``.
- ``tasks``: training mixture, ``{task: {weight: w, <option>: value or list}}`` over
  :data:`hf_longmem.evals.recall.RECALL_TASKS` (``mqar``, ``fact_recall``); a list is sampled per batch. The option
  ``length`` (int or list) overrides ``seq_length`` for that task (a length mixture); ``variants`` (a list of option
  mappings, one drawn per batch) ties options together, e.g. a length to a number of pairs; ``mqar`` also takes
  ``num_pairs``, ``num_queries``, ``num_groups`` (keys and values in topic groups) and ``query_placement`` (``end``:
  all queries after the filler; ``spread``: Zoology's random query places, short- and long-range).
- ``eval``: ``{num_samples, batch_size, tasks: [{task, length, **options}, ...]}``: teacher-forced answer
  accuracy (:func:`hf_longmem.evals.recall.evaluate_recall`) after training, on seeds disjoint from training.
- ``publish`` (optional): ``{repo_id, local_root (a folder: offline LocalFolderApi; omit for the Hub), private,
  license, tags}``: pushes the checkpoint with the ``architecture`` model card via :func:`hf_longmem.hub.publish`.
- Every scalar key can be overridden on the command line (``--learning_rate 1e-3 --max_steps 50``).
- ``--eval_only true``: no training; loads the checkpoint a previous run saved in ``output_dir``, runs the ``eval``
  section on it and rewrites ``rows`` of its ``results.json`` (training ``meta``/``history`` kept; ``meta.eval_command``
  records the re-evaluation).

The loss is next-token cross entropy on the tasks' targets (for ``mqar`` only the answers, i.e. the value after each
query key; for ``fact_recall`` every token, answers weighted ``answer_loss_weight``); if the model's
output has an ``aux_loss`` (e.g. a router's load-balancing loss, already scaled by the model), it is added times
``aux_loss_weight``. Outputs in ``output_dir``: the checkpoint (``save_pretrained``: safetensors, config with
``auto_map`` for hf_longmem architectures, tokenizer) and ``results.json``, written atomically::

    {"meta": {...run settings...}, "rows": [{"model", "task", "cache", "context_length", "num_samples",
     "accuracy", "exact", "options"}, ...], "config": {...}, "history": [...]}

``rows``/``meta`` follow the evaluation-harness format, so ``results.json`` is directly the ``eval_results`` of
:func:`hf_longmem.hub.publish` and of ``hf_longmem.hub.eval_table_markdown``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from _config import LongSequenceConfig, parse_recipe_config
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from hf_longmem.evals.recall import RECALL_TASKS, RecallMixture, collate_recall, evaluate_recall
from hf_longmem.evals.vocab import build_tokenizer
from hf_longmem.training import next_token_cross_entropy
from hf_longmem.training.distributed import build_accelerator, global_share, global_weight_total, unsharded_model


@dataclass
class MemoryTrainConfig(LongSequenceConfig):
    """Recipe configuration (YAML keys; scalars can be overridden with ``--key value``); the long-sequence options
    ``activation_checkpointing``, ``activation_offload``, ``chunked_ce`` come from
    :class:`_config.LongSequenceConfig`."""

    output_dir: str = "runs/memory"
    seed: int = 0
    num_threads: int = 1
    max_steps: int = 500
    batch_size: int = 16
    seq_length: int = 256
    learning_rate: float = 3e-3
    min_lr_rate: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    answer_loss_weight: float = 1.0
    aux_loss_weight: float = 1.0
    log_every: int = 25
    save_checkpoint: bool = True
    eval_only: bool = False
    model: dict[str, Any] = field(default_factory=lambda: {"model_type": "llama"})
    tasks: dict[str, dict[str, Any]] = field(default_factory=lambda: {"mqar": {"weight": 1.0}})
    eval: dict[str, Any] = field(default_factory=dict)
    publish: dict[str, Any] | None = None


def parse_config(argv: list[str] | None = None) -> MemoryTrainConfig:
    """Read ``--config`` YAML, then apply scalar ``--key value`` overrides; validates the sections."""
    config, _ = parse_recipe_config(MemoryTrainConfig, argv, __doc__.split("\n\n")[0])
    validate(config)
    return config


def validate(config: MemoryTrainConfig) -> None:
    """Raise ``ValueError`` naming the bad key."""
    if config.max_steps < 1 or config.batch_size < 1 or config.seq_length < 2:
        raise ValueError(
            f"max_steps, batch_size must be >= 1 and seq_length >= 2, got "
            f"{config.max_steps}, {config.batch_size}, {config.seq_length}"
        )
    if not isinstance(config.model, dict) or not config.model.get("model_type"):
        raise ValueError(f"model must be a mapping with a model_type, got {config.model!r}")
    bad = sorted(set(config.tasks) - set(RECALL_TASKS))
    if bad or not config.tasks:
        raise ValueError(f"tasks must name tasks among {sorted(RECALL_TASKS)}, got {sorted(config.tasks)}")
    for spec in config.eval.get("tasks", []):
        if spec.get("task") not in RECALL_TASKS or int(spec.get("length", 0)) < 2:
            raise ValueError(f"eval.tasks entries need a task in {sorted(RECALL_TASKS)} and a length, got {spec}")
    if config.publish is not None and not config.publish.get("repo_id"):
        raise ValueError(f"publish needs a repo_id, got {config.publish!r}")
    config.long_sequence_options()


def ensure_registered(model_type: str) -> None:
    """Import ``hf_longmem`` (and ``hf_longmem.modeling.<model_type>`` when needed) so the type is registered."""
    import hf_longmem  # noqa: F401  (registers the architectures listed in hf_longmem.modeling)

    if model_type in CONFIG_MAPPING:
        return
    try:
        importlib.import_module(f"hf_longmem.modeling.{model_type}")
    except ModuleNotFoundError as err:
        if model_type in CONFIG_MAPPING:  # registered by hf_longmem.modeling's __init__ (type != folder, e.g. mom_gdn)
            return
        raise ValueError(f"model.model_type {model_type!r} is not a registered architecture") from err
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model.model_type {model_type!r} is not a registered architecture")


def build_model(model_spec: dict[str, Any], tokenizer: Any, seed: int) -> Any:
    """Seeded ``AutoModelForCausalLM.from_config`` of ``model_spec`` with the tokenizer's vocabulary."""
    kwargs = dict(model_spec)
    model_type = kwargs.pop("model_type")
    ensure_registered(model_type)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def recall_loss(
    output: Any,
    batch: dict[str, torch.Tensor],
    head: torch.nn.Linear | None = None,
    chunk_size: int = 0,
    accelerator: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted next-token cross entropy and, per sample, answer hits and answer counts.

    Args:
        output: model output with ``logits`` ``[batch, seq, vocab]``, or (``chunk_size > 0``, the head bypassed by
            :func:`hf_longmem.training.lm_head_bypassed`) the final hidden states ``[batch, seq, hidden]``.
        batch: :func:`hf_longmem.evals.recall.collate_recall` output.
        head: the LM head (``chunk_size > 0``).
        chunk_size: positions per chunk of the chunked cross entropy (``0``: from full logits).
        accelerator: with several processes, the weights are normalised over the global batch
            (:func:`~hf_longmem.training.distributed.global_weight_total`).

    Returns:
        ``(loss, hits [batch], answers [batch])``.
    """
    targets = batch["input_ids"][:, 1:]
    ce, predictions = next_token_cross_entropy(output.logits, targets, head, chunk_size)
    weights, answer = batch["loss_weights"], batch["answer_mask"]
    total = weights.sum() if accelerator is None else global_weight_total(weights.sum(), accelerator)
    loss = (ce * weights).sum() / total.clamp_min(1e-9)
    hits = ((predictions == targets) & answer).sum(-1)
    return loss, hits, answer.sum(-1)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)


def save_checkpoint(model: Any, tokenizer: Any, output_dir: Path) -> None:
    """``save_pretrained`` model (safetensors) and tokenizer into ``output_dir``."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def evaluate(model: Any, tokenizer: Any, config: MemoryTrainConfig, label: str) -> list[dict[str, Any]]:
    """Harness-format rows of the ``eval`` section (``cache`` is ``"own state"``: the model's own memory)."""
    rows = []
    for spec in config.eval.get("tasks", []):
        options = {k: v for k, v in spec.items() if k not in ("task", "length")}
        result = evaluate_recall(
            model,
            tokenizer,
            spec["task"],
            length=int(spec["length"]),
            num_samples=int(config.eval.get("num_samples", 256)),
            batch_size=int(config.eval.get("batch_size", 32)),
            seed=int(config.eval.get("seed", 0)),
            **options,
        )
        rows.append(
            {
                "model": label,
                "task": result["task"],
                "cache": "own state",
                "cache_kwargs": {},
                "context_length": result["length"],
                "num_samples": result["num_samples"],
                "accuracy": round(result["accuracy"], 4),
                "exact": round(result["exact"], 4),
                "options": options,
            }
        )
    return rows


def reevaluate(config: MemoryTrainConfig) -> dict[str, Any]:
    """``eval_only``: the ``eval`` section on the checkpoint in ``output_dir``; rewrites the rows of its results.json."""
    output_dir = Path(config.output_dir)
    torch.set_num_threads(config.num_threads)
    ensure_registered(config.model["model_type"])
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    path = output_dir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"meta": {"model_type": config.model["model_type"]}}
    start = time.time()
    label = config.eval.get("label") or output_dir.name
    results["rows"] = evaluate(model, tokenizer, config, label)
    results["meta"].update(eval_time_s=round(time.time() - start, 1), eval_command=" ".join(sys.argv))
    results["config"] = {**results.get("config", {}), "eval": config.eval}
    write_json_atomic(path, results)
    for row in results["rows"]:
        tqdm.write(json.dumps({k: row[k] for k in ("task", "context_length", "accuracy", "exact", "options")}))
    return results


def train(config: MemoryTrainConfig) -> dict[str, Any]:
    """Run the recipe (or only its evaluation, ``eval_only``); returns the ``results.json`` content (``{}`` on the
    processes of a distributed run other than the main one, which evaluates and saves).

    Every process draws the same global batch of ``batch_size`` samples per process and trains on its share, so a run
    of N processes is the one-process run on the same global batch (``tests/training/test_fsdp.py``)."""
    validate(config)
    if config.eval_only:
        return reevaluate(config)
    torch.set_num_threads(config.num_threads)
    accelerator = build_accelerator()
    set_seed(config.seed)
    tokenizer = build_tokenizer()
    model = build_model(config.model, tokenizer, config.seed)
    long_sequence = config.long_sequence_options()
    long_sequence.prepare(model)
    num_parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_rate
    )
    # the scheduler stays outside `prepare`: accelerate would step it once per process at every optimizer step,
    # while every process here runs all `max_steps` steps (the schedule would end after max_steps / processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    # every process draws the same global batch and trains on its share (a run of N processes is the one-process run
    # on the same global batch; MoM's auxiliary load-balancing loss is each share's own, as under any data parallelism)
    processes = accelerator.num_processes
    mixture = RecallMixture(tokenizer, config.tasks, seed=config.seed)
    batches = mixture.batches(config.batch_size * processes, config.seq_length)
    recent_hits: deque[tuple[int, int]] = deque(maxlen=max(1, config.log_every))
    training_tokens = 0
    history: list[dict[str, Any]] = []
    start = time.time()
    progress = tqdm(total=config.max_steps, disable=not accelerator.is_main_process, desc="train_memory_model")
    model.train()
    for step in range(1, config.max_steps + 1):
        samples = global_share(next(batches), accelerator)
        batch = {k: v.to(accelerator.device) for k, v in collate_recall(samples, config.answer_loss_weight).items()}
        training_tokens += batch["input_ids"].numel() * processes
        with long_sequence.step(model) as head:
            output = model(input_ids=batch["input_ids"])
            loss, hits, answers = recall_loss(output, batch, head, long_sequence.chunked_ce, accelerator)
        aux = getattr(output, "aux_loss", None)
        total = loss if aux is None or not config.aux_loss_weight else loss + config.aux_loss_weight * aux
        accelerator.backward(total)
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent_hits.append((int(hits.sum()), int(answers.sum())))
        progress.update(1)
        if step % config.log_every == 0 or step == config.max_steps:
            right, asked = map(sum, zip(*recent_hits))
            row = {
                "step": step,
                "loss": round(accelerator.reduce(loss.detach(), reduction="mean").item(), 6),
                "aux_loss": None if aux is None else round(float(accelerator.reduce(aux.detach(), "mean")), 4),
                "train_answer_accuracy": round(right / max(asked, 1), 4),
                "lr": scheduler.get_last_lr()[0],
                "elapsed_s": round(time.time() - start, 1),
            }
            history.append(row)
            progress.set_postfix(loss=row["loss"], acc=row["train_answer_accuracy"])
            if accelerator.is_main_process:
                tqdm.write(json.dumps(row))
    progress.close()
    train_time = time.time() - start
    # every process takes part (FSDP gathers the shards); the main process evaluates and saves the whole model
    unwrapped = unsharded_model(accelerator, model)
    if unwrapped is None:
        return {}
    label = config.eval.get("label") or Path(config.output_dir).name
    eval_start = time.time()
    rows = evaluate(unwrapped, tokenizer, config, label)
    model_spec = dict(config.model)
    results = {
        "meta": {
            "model_type": model_spec.get("model_type"),
            "num_parameters": num_parameters,
            "training_data": "generated recall tasks (hf_longmem.evals.recall): "
            + ", ".join(f"{name} {json.dumps(spec, sort_keys=True)}" for name, spec in config.tasks.items()),
            "training_steps": config.max_steps,
            "training_tokens": training_tokens,
            "distributed": {"type": accelerator.distributed_type.value, "num_processes": processes},
            "seq_length": config.seq_length,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "train_time_s": round(train_time, 1),
            "eval_time_s": round(time.time() - eval_start, 1),
            "threads": config.num_threads,
            "command": " ".join(sys.argv),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "rows": rows,
        "config": asdict(config),
        "model_config": unwrapped.config.to_dict(),
        "history": history,
    }
    output_dir = Path(config.output_dir)
    if config.save_checkpoint:
        save_checkpoint(unwrapped, tokenizer, output_dir)
    write_json_atomic(output_dir / "results.json", results)
    for row in rows:
        tqdm.write(json.dumps({k: row[k] for k in ("task", "context_length", "accuracy", "exact", "options")}))
    if config.publish:
        results["published"] = publish_checkpoint(unwrapped, tokenizer, results, config.publish)
        write_json_atomic(output_dir / "results.json", results)
    return results


def publish_checkpoint(model: Any, tokenizer: Any, results: dict[str, Any], spec: dict[str, Any]) -> str:
    """Push with :func:`hf_longmem.hub.publish` and the ``architecture`` card; ``local_root`` publishes offline."""
    from hf_longmem import hub

    api = hub.LocalFolderApi(spec["local_root"]) if spec.get("local_root") else None
    return hub.publish(
        model,
        spec["repo_id"],
        tokenizer=tokenizer,
        eval_results={"meta": results["meta"], "rows": results["rows"]},
        template="architecture",
        api=api,
        private=bool(spec.get("private", False)),
        license=spec.get("license"),
        tags=spec.get("tags"),
        description=spec.get("description"),
    )


if __name__ == "__main__":
    train(parse_config())
