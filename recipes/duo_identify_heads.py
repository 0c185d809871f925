#!/usr/bin/env python
"""Identify DuoAttention retrieval heads: learn one gate per (layer, KV head), threshold it, write the pattern.

The method of DuoAttention (Xiao et al., 2024, §3.1), as in the official ``duo_attn/train.py``:

* the model is frozen; one gate ``α ∈ [0, 1]`` per (layer, KV head), initialised to 1, is the only parameter;
* every attention layer outputs ``α · full_attention + (1 − α) · streaming_attention`` per KV-head group, where
  streaming attention is causal attention restricted to the first ``sink_size`` tokens and the last
  ``recent_size`` ones (the official training mask: ``recent_size`` keys including the query itself);
* each batch is run twice: full attention without gradient (the teacher) and the gated model;
* ``loss = Σ_{answer tokens} mean_d (h_full − h_gated)² / N + λ · mean|α|`` on the final hidden states (after the
  last norm), where only the passkey question and answer tokens count;
* AdamW (lr 0.02, no weight decay) with linear warmup and decay over 1/5 of the steps each (floor 0.1), gates
  clamped to ``[0, 1]`` after each step; then the gates are thresholded to a ``sparsity`` (fraction of streaming
  heads) and saved (atomically) with :func:`hf_longmem.cache_classes.duo_attention.save_head_pattern`.

The gated forward works on any transformers causal LM that uses ``AttentionInterface``: a temporary attention
function is registered under its own name, the model is switched to it for the run and switched back after.

    python recipes/duo_identify_heads.py --config recipes/configs/duo_identify_heads.yaml
    python recipes/duo_identify_heads.py --model path/to/model --steps 500 --sparsity 0.5 --output heads.json

Then: ``make_cache("duo_attention", model, head_pattern="heads.json", sparsity=0.5)``. Every scalar config key
can be overridden on the command line (``--learning_rate 0.01``). ``--model`` defaults to the embedded model of
``hf_longmem.load_default_model()``.

Deviations from the official code: the data are the generated passkey samples of ``hf_longmem.evals.tasks``
(one pass key in filler sentences, not 10 passkeys in BookSum); the two runs are two forward passes rather than
one doubled batch; gates are clamped after each step (the official loop clamps before the forward, so its last
saved gates may leave ``[0, 1]``); warmup/decay lengths are at least one step (the official ``num_steps // 5``
divides by zero below 5 steps); left-padded batches are supported (per-row sinks and windows).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from hf_longmem.cache_classes.duo_attention import save_head_pattern, select_retrieval_heads
from hf_longmem.evals.tasks import generate_task

#: Name the temporary gated attention is registered under.
GATED_ATTENTION_NAME = "hf_longmem_duo_gated"


@dataclass
class IdentifyConfig:
    """Recipe configuration (YAML keys; scalars can be overridden with ``--key value``).

    Each step draws a context length from ``num_length_intervals`` evenly spaced lengths in
    ``[min_length, max_length]`` (the official data use 50 intervals over 1K–32K tokens) and ``batch_size`` fresh
    samples of ``task`` at that length.
    """

    model: str | None = None
    output: str = "runs/duo_identify_heads/duo_attention_heads.json"
    seed: int = 0
    num_threads: int = 0  # 0: torch's default
    dtype: str = "float32"
    steps: int = 2000
    batch_size: int = 1
    min_length: int = 512
    max_length: int = 1280
    num_length_intervals: int = 50
    sink_size: int = 64
    recent_size: int = 256
    learning_rate: float = 0.02
    reg_weight: float = 0.05
    warmup_fraction: float = 0.2
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    initial_value: float = 1.0
    sparsity: float = 0.5
    log_every: int = 10
    task: str = "passkey"
    task_options: dict[str, Any] = field(default_factory=dict)


_SCALAR_TYPES = {"str": str, "int": int, "float": float, "str | None": str}


def parse_config(argv: list[str] | None = None) -> IdentifyConfig:
    """Read ``--config`` YAML, then apply scalar ``--key value`` overrides, and check the values."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML file with IdentifyConfig keys")
    scalars = [f for f in fields(IdentifyConfig) if f.type in _SCALAR_TYPES]
    for f in scalars:
        parser.add_argument(f"--{f.name}", type=_SCALAR_TYPES[f.type], default=None)
    args = parser.parse_args(argv)
    values = (yaml.safe_load(args.config.read_text()) or {}) if args.config else {}
    unknown = sorted(set(values) - {f.name for f in fields(IdentifyConfig)})
    if unknown:
        raise ValueError(f"unknown keys in --config {args.config}: {unknown}")
    values.update({f.name: getattr(args, f.name) for f in scalars if getattr(args, f.name) is not None})
    config = IdentifyConfig(**values)
    check_config(config)
    return config


def check_config(config: IdentifyConfig) -> None:
    for name in ("steps", "batch_size", "min_length", "num_length_intervals", "recent_size", "log_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"`{name}` must be >= 1, got {getattr(config, name)}")
    if config.sink_size < 0:
        raise ValueError(f"`sink_size` must be >= 0, got {config.sink_size}")
    if config.max_length < config.min_length:
        raise ValueError(f"`max_length` ({config.max_length}) must be >= `min_length` ({config.min_length})")
    if not 0.0 <= config.sparsity < 1.0:
        raise ValueError(f"`sparsity` (fraction of streaming heads) must be in [0, 1), got {config.sparsity}")
    if config.learning_rate <= 0 or config.reg_weight < 0:
        raise ValueError("`learning_rate` must be > 0 and `reg_weight` >= 0")
    if not 0.0 <= config.initial_value <= 1.0:
        raise ValueError(f"`initial_value` must be in [0, 1], got {config.initial_value}")
    if not (0 <= config.warmup_fraction <= 1 and 0 <= config.decay_fraction <= 1 and 0 < config.min_lr_ratio <= 1):
        raise ValueError("`warmup_fraction`/`decay_fraction` must be in [0, 1] and `min_lr_ratio` in (0, 1]")


# ------------------------------------------------------------------------------------------------------- data
def length_grid(config: IdentifyConfig) -> list[int]:
    """The context lengths a step can draw: ``num_length_intervals`` evenly spaced values (deduplicated)."""
    count = config.num_length_intervals
    if count == 1:
        return [config.max_length]
    span = config.max_length - config.min_length
    return sorted({config.min_length + round(i * span / (count - 1)) for i in range(count)})


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def make_batch(tokenizer, length: int, batch_size: int, seed: int, task: str = "passkey", **options) -> dict:
    """``batch_size`` samples of ``task`` at ``length`` tokens, left-padded.

    Returns ``input_ids``/``attention_mask``/``label_mask`` ``[batch, T]``: the labels are the question and answer
    tokens (``query + " " + answer``), as the official data label the passkey questions and answers.
    """
    rows, labels = [], []
    for sample in generate_task(task, tokenizer, length, batch_size, seed, **options):
        turn = sample.turns[0]
        context = _encode(tokenizer, sample.context, special=True)
        qa = _encode(tokenizer, turn.query, special=False) + _encode(tokenizer, " " + turn.answers[0], special=False)
        rows.append(context + qa)
        labels.append([False] * len(context) + [True] * len(qa))
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    label_mask = torch.tensor([[False] * (width - len(row)) + lab for row, lab in zip(rows, labels)])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "label_mask": label_mask}


def batches(config: IdentifyConfig, tokenizer) -> Iterator[dict]:
    """One batch per step, seeded: step ``s`` draws its length from the grid and uses task seed ``seed + s``."""
    rng = random.Random(config.seed)
    grid = length_grid(config)
    for step in range(config.steps):
        length = rng.choice(grid)
        yield make_batch(tokenizer, length, config.batch_size, config.seed + step, config.task, **config.task_options)


# ------------------------------------------------------------------------------------------ gated attention
class GatedAttention:
    """The temporary attention function: ``α · full + (1 − α) · streaming`` per KV head, with α = ``gates[layer]``.

    Args:
        gates: ``[num_layers, num_kv_heads]`` parameter.
        sink_size, recent_size: the streaming mask (``recent_size`` keys including the query).

    Call :meth:`set_batch` with the batch's 2-D attention mask before each forward. With ``teacher = True`` it
    computes full attention only (the no-gradient teacher run).
    """

    def __init__(self, gates: torch.nn.Parameter, sink_size: int, recent_size: int):
        self.gates, self.sink_size, self.recent_size = gates, sink_size, recent_size
        self.teacher = False
        self._full: torch.Tensor | None = None
        self._streaming: torch.Tensor | None = None
        self._distance: torch.Tensor | None = None

    def set_batch(self, attention_mask: torch.Tensor) -> None:
        """Builds both masks ``[batch, 1, T, T]`` from a left-padded ``[batch, T]`` mask (positions per row)."""
        real = attention_mask.bool()
        position = attention_mask.long().cumsum(-1) - 1  # [b, T] position among the row's real tokens
        total = attention_mask.shape[-1]
        slots = torch.arange(total, device=attention_mask.device)
        causal = slots[None, :] <= slots[:, None]  # [T, T]
        full = causal & real[:, None, :]
        distance = position[:, :, None] - position[:, None, :]  # query - key, [b, T, T]
        streaming = full & ((position[:, None, :] < self.sink_size) | (distance < self.recent_size))
        itself = torch.eye(total, dtype=torch.bool, device=attention_mask.device)  # pad queries: no empty row
        self._full, self._streaming = (full | itself)[:, None], (streaming | itself)[:, None]
        self._distance = distance[:, None]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """query ``[b, Hq, T, d]``, key/value ``[b, Hkv, T, d]`` -> ``([b, T, Hq, d], None)``. The model's own mask
        is ignored (the masks of :meth:`set_batch` encode the same causal + padding pattern)."""
        if self._full is None:
            raise RuntimeError("GatedAttention.set_batch() must be called before the forward")
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise ValueError(f"unsupported model: {type(module).__name__} has no `layer_idx`")
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        full_mask, streaming_mask = self._full, self._streaming
        window = kwargs.get("sliding_window")
        if window:  # a sliding-window layer: both masks keep its window
            inside = self._distance < window
            full_mask, streaming_mask = full_mask & inside, streaming_mask & inside
        sdpa = torch.nn.functional.scaled_dot_product_attention
        full = sdpa(query, key, value, attn_mask=full_mask, scale=scaling)
        if self.teacher:
            return full.transpose(1, 2).contiguous(), None
        streaming = sdpa(query, key, value, attn_mask=streaming_mask, scale=scaling)
        gate = self.gates[layer_idx].clamp(0.0, 1.0).repeat_interleave(group).to(query.dtype)[None, :, None, None]
        output = gate * full + (1.0 - gate) * streaming  # gate 1 gives exactly the full output
        return output.transpose(1, 2).contiguous(), None


@contextmanager
def gated_attention(model: PreTrainedModel, gated: GatedAttention):
    """Switches ``model`` to the gated attention inside the block, and back to its own attention after."""
    AttentionInterface.register(GATED_ATTENTION_NAME, gated)
    AttentionMaskInterface.register(GATED_ATTENTION_NAME, lambda *args, **kwargs: None)  # masks built per batch
    previous = model.config._attn_implementation
    model.set_attn_implementation(GATED_ATTENTION_NAME)
    try:
        if model.config._attn_implementation != GATED_ATTENTION_NAME:
            raise ValueError(
                f"unsupported model: {type(model).__name__} cannot switch its attention implementation "
                "(it does not use transformers' AttentionInterface)"
            )
        yield gated
    finally:
        model.set_attn_implementation(previous)


# ------------------------------------------------------------------------------------------------- training
def lr_factor(step: int, config: IdentifyConfig) -> float:
    """The official schedule: ``min(1, max((s+1)/W, floor), max((N-s)/D, floor))``."""
    warmup = max(1, round(config.warmup_fraction * config.steps))
    decay = max(1, round(config.decay_fraction * config.steps))
    floor = config.min_lr_ratio
    return min(1.0, max((step + 1) / warmup, floor), max((config.steps - step) / decay, floor))


def _kv_heads(model: PreTrainedModel) -> tuple[int, int]:
    text = model.config.get_text_config(decoder=True)
    return text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or text.num_attention_heads


def identify_heads(model: PreTrainedModel, tokenizer, config: IdentifyConfig, progress: bool = True):
    """Learns the gates; returns ``(gates [num_layers, num_kv_heads] in [0, 1], history)``."""
    torch.manual_seed(config.seed)
    model.eval()
    model.requires_grad_(False)
    device = next(model.parameters()).device
    gates = torch.nn.Parameter(torch.full(_kv_heads(model), config.initial_value, device=device))
    optimizer = torch.optim.AdamW([gates], lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    gated = GatedAttention(gates, config.sink_size, config.recent_size)
    decoder = model.base_model  # final hidden states, after the last norm
    history: list[dict[str, float]] = []
    bar = tqdm(total=config.steps, desc="duo gates", disable=not progress)
    with gated_attention(model, gated):
        for step, batch in enumerate(batches(config, tokenizer)):
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            inputs = {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
                "use_cache": False,
            }
            gated.set_batch(batch["attention_mask"])
            gated.teacher = True
            with torch.no_grad():
                teacher = decoder(**inputs).last_hidden_state
            gated.teacher = False
            student = decoder(**inputs).last_hidden_state
            labels = batch["label_mask"]
            distill = (teacher[labels].float() - student[labels].float()).pow(2).mean(-1).sum() / labels.sum()
            reg = gates.abs().mean()
            loss = distill + config.reg_weight * reg
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            record = {
                "step": step + 1,
                "loss": loss.item(),
                "distill_loss": distill.item(),
                "reg_loss": reg.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "length": int(batch["input_ids"].shape[1]),
            }
            history.append(record)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                bar.set_postfix(distill=f"{record['distill_loss']:.4f}", reg=f"{record['reg_loss']:.3f}")
            bar.update(1)
    bar.close()
    return gates.detach().clamp(0.0, 1.0).cpu(), history


# ------------------------------------------------------------------------------------------------------ main
def load_model(config: IdentifyConfig):
    """``(model, tokenizer, name)`` from ``config.model``, or the embedded default model."""
    dtype = getattr(torch, config.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"`dtype` must name a floating torch dtype, got {config.dtype!r}")
    if config.model is None:
        from hf_longmem import load_default_model

        try:
            model, tokenizer = load_default_model(dtype=dtype)
        except FileNotFoundError as error:
            raise ValueError(f"no --model given and the embedded default model is unavailable: {error}") from None
        return model, tokenizer, "hf_longmem default model"
    path = Path(config.model)
    if not path.is_dir():
        raise ValueError(f"`model` must be a local model folder, got {config.model!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model, tokenizer, str(path)


def main(argv: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Runs the recipe; returns a summary (also printed as JSON)."""
    config = parse_config(argv)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model, tokenizer, model_name = load_model(config)
    start = time.perf_counter()
    gates, history = identify_heads(model, tokenizer, config, progress=progress)
    retrieval = select_retrieval_heads(gates, config.sparsity)
    streaming = int((~retrieval).sum())
    metadata = {
        "method": "duo_attention",
        "model": model_name,
        "sparsity": config.sparsity,
        "retrieval": retrieval.tolist(),
        "num_streaming_heads": streaming,
        "num_heads": retrieval.numel(),
        "sink_size": config.sink_size,
        "recent_size": config.recent_size,
        "final_loss": history[-1]["loss"],
        "final_distill_loss": history[-1]["distill_loss"],
        "wall_time_s": time.perf_counter() - start,
        "config": asdict(config),
        "history": history,
    }
    output = save_head_pattern(config.output, gates, metadata=metadata)
    summary = {
        "output": str(output),
        "model": model_name,
        "steps": config.steps,
        "sparsity": config.sparsity,
        "num_streaming_heads": streaming,
        "num_heads": retrieval.numel(),
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "final_distill_loss": history[-1]["distill_loss"],
        "mean_gate": float(gates.mean()),
    }
    print(json.dumps(summary))
    return summary


__all__ = ["GatedAttention", "IdentifyConfig", "gated_attention", "identify_heads", "main", "parse_config"]

if __name__ == "__main__":
    main()
