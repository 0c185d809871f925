#!/usr/bin/env python
"""Train HCAM branches on top of the embedded tiny model, then evaluate them against the backbone alone.

The frozen backbone (``hf_longmem/assets/tiny-longmem``, trained on ~1k-token tasks) is wrapped by
:class:`hf_longmem.modeling.hcam.HCAMForCausalLM`; only the HCAM branches (and their gates) train, on generated
long-document tasks of :mod:`hf_longmem.evals.tasks` longer than one segment, so the answer has to come from the
chunk memory. The evaluation, the data stream and the loss are LongMem's recipe's (``recipes/train_longmem.py``):
teacher-forced passkey scoring far beyond the backbone's training length, for the trained model, the untrained one
(= the backbone on each segment alone) and the backbone over the full context.

    accelerate launch recipes/train_hcam.py --config recipes/configs/hcam_tiny.yaml
    python recipes/train_hcam.py --config recipes/configs/hcam_tiny.yaml --max_steps 3 --eval_num_samples 2 \\
        --output_dir /tmp/hcam
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import train_longmem as shared
from _config import parse_recipe_config
from transformers import AutoTokenizer

from hf_longmem.modeling.hcam import HCAMForCausalLM
from hf_longmem.training.distributed import full_tensor

ROOT = shared.ROOT


@dataclass
class TrainConfig(shared.TrainConfig):
    """LongMem's recipe configuration (see ``recipes/train_longmem.py``) with ``hcam``: :class:`HCAMConfig` fields
    (segment length, chunk size, top-k, memory size, memory layers) in place of ``longmem``."""

    output_dir: str = "runs/hcam-tiny"
    hcam: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """``--config`` YAML, scalar ``--key value`` overrides and the run options."""

    def run_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--eval_only", type=Path, default=None, help="evaluate this saved HCAM folder")
        parser.add_argument("--results", type=Path, default=None, help="also copy the results JSON here")

    config, args = parse_recipe_config(TrainConfig, argv, __doc__.split("\n\n")[0], run_options)
    config.long_sequence_options()
    if config.longmem:
        raise ValueError("this recipe trains HCAM: put the model fields under `hcam`, not `longmem`")
    if not 0 < config.min_length <= config.max_length:
        raise ValueError(f"need 0 < min_length <= max_length, got {config.min_length}, {config.max_length}")
    if config.max_steps < 1 or config.tokens_per_batch < 1:
        raise ValueError(
            f"max_steps and tokens_per_batch must be >= 1, got {config.max_steps}, {config.tokens_per_batch}"
        )
    unknown_eval = sorted(set(config.eval) - set(shared.EVAL_DEFAULTS))
    if unknown_eval:
        raise ValueError(f"unknown keys in eval: {unknown_eval} (known: {sorted(shared.EVAL_DEFAULTS)})")
    config.eval = {**shared.EVAL_DEFAULTS, **config.eval}
    return config, args


def train(config: TrainConfig) -> tuple[HCAMForCausalLM | None, Any, dict[str, Any]]:
    """Train the branches; returns ``(model, tokenizer, metadata)`` (LongMem's loop, ``train_longmem.train_wrapper``:
    ``model`` is ``None`` on processes other than the main one)."""

    def build(backbone):
        return HCAMForCausalLM.from_backbone(backbone, backbone_name_or_path=config.backbone, **config.hcam)

    def gates(model) -> dict[str, Any]:
        return {"gates": [round(float(torch.tanh(full_tensor(b.gate.detach()))), 4) for b in model.model.branches]}

    return shared.train_wrapper(config, build, gates, "train_hcam")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, args = parse_args(argv)
    torch.set_num_threads(config.num_threads)
    output_dir = Path(config.output_dir)
    if args.eval_only is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.eval_only, local_files_only=True)
        model = HCAMForCausalLM.from_pretrained(args.eval_only).eval()
        metadata_file = args.eval_only / "training_metadata.json"
        metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    else:
        model, tokenizer, metadata = train(config)
        if model is None:  # another process of a distributed run: the main one saves and evaluates
            return {}
        shared.save(model, tokenizer, output_dir, metadata)
    models: dict[str, tuple[Any, str]] = {"hcam (trained branches)": (model, "hcam")}
    if config.eval["untrained"]:
        backbone, _ = shared.load_backbone(config.backbone)
        untrained = HCAMForCausalLM.from_backbone(backbone, **{**config.hcam, "gate_init": 0.0})
        models["hcam untrained (= backbone per segment)"] = (untrained.eval(), "hcam")
    if config.eval["backbone"]:
        models["backbone alone (full context)"] = (shared.load_backbone(config.backbone)[0], "full")
    start = time.time()
    rows = shared.evaluate_all(models, tokenizer, config) if config.eval_num_samples > 0 else []
    backbone_path = config.backbone
    results = {
        "meta": {
            "backbone": os.path.relpath(backbone_path, ROOT) if Path(backbone_path).is_absolute() else backbone_path,
            "scoring": "teacher-forced: exact = every answer token and EOS is the argmax (= greedy exact match)",
            "eval_seed": config.eval["seed"],
            "train_steps": metadata.get("steps"),
            "train_wall_time_s": metadata.get("wall_time_s"),
            "train_cpu_time_s": metadata.get("cpu_time_s"),
            "train_tokens": metadata.get("tokens_seen"),
            "train_threads": metadata.get("threads"),
            "trainable_parameters": metadata.get("trainable_parameters"),
            "eval_wall_time_s": round(time.time() - start, 1),
            "command": " ".join(["python recipes/train_hcam.py", *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "rows": rows,
        "hcam_config": {k: v for k, v in model.config.to_dict().items() if k != "backbone_config"},
        "history": metadata.get("history", []),
    }
    shared.write_json_atomic(output_dir / "results.json", results)
    if args.results is not None:
        shared.write_json_atomic(args.results, results)
    if rows:
        print(shared.markdown_table(rows))
    return results


if __name__ == "__main__":
    main()
