"""The shared body of ``recipes/continual_pretrain.py`` and ``recipes/continual_finetune.py``.

A recipe config is YAML (alignment-handbook style, one file per method in ``recipes/configs/continual_*.yaml``)::

    output_dir: runs/continual/naive
    seed: 0
    num_threads: 1
    model: {source: embedded}           # the embedded tiny model; or {config: {...LlamaConfig kwargs...}} (random)
    peft: null                          # or LoraConfig kwargs: {r: 8, lora_alpha: 16, target_modules: [...]}
    tasks: {num_tasks: 3, facts_per_task: 16, num_digits: 3, shared_keys: false, seed: 0}
    train: {steps_per_task: 150, batch_size: 16, learning_rate: 3.0e-3, schedule: {kind: constant}, ...}
    strategies: [{name: replay, ratio: 0.05}]
    publish: null                       # or {repo_id: me/name, local_dir: /tmp/hub (LocalFolderApi), merge_lora: false}

Any key can be overridden on the command line with ``--set train.learning_rate=1e-3`` (values parsed as YAML).
``--resume`` continues from the newest complete checkpoint in ``output_dir``.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState

from hf_longmem.training.distributed import build_accelerator, is_sharded, unsharded_model

from .base import build_strategy
from .data import fact_domains, tokenize_task
from .trainer import ContinualTrainer, TrainerConfig

__all__ = ["build_model", "card_description", "load_config", "main", "parse_args", "publish_result", "run"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot, YAML 1.2 style) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that parses ``1e-3`` as a float (PyYAML follows YAML 1.1, which needs ``1.0e-3``)."""
    return yaml.load(text, Loader=_Loader)


_TOP_KEYS = {"output_dir", "seed", "num_threads", "model", "peft", "tasks", "train", "strategies", "publish"}


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {key!r} is not a mapping")
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = (), defaults: dict[str, Any] | None = None) -> dict:
    """Read the YAML ``path`` over ``defaults`` and apply ``key.sub=value`` overrides."""
    config = copy.deepcopy(defaults or {})
    if path is not None:
        loaded = yaml_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config {path} must be a YAML mapping")
        for key, value in loaded.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set needs key=value, got {item!r}")
        key, value = item.split("=", 1)
        _set(config, key, yaml_load(value))
    unknown = sorted(set(config) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {sorted(_TOP_KEYS)}")
    return config


def build_model(spec: dict[str, Any] | None, seed: int = 0):
    """``(model, tokenizer, base_name)`` for ``{source: embedded}`` or ``{config: {...}}`` (a seeded random Llama
    over :func:`~hf_longmem.evals.vocab.build_tokenizer`'s default 354-word vocabulary, a subset of the embedded
    model's 474 words)."""
    from hf_longmem.default_model import DEFAULT_MODEL_PATH, load_default_model
    from hf_longmem.evals.vocab import build_tokenizer

    spec = dict(spec or {"source": "embedded"})
    if "config" in spec:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = build_tokenizer()
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **spec["config"],
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg), tokenizer, "random-llama"
    if spec.get("source", "embedded") != "embedded":
        raise ValueError(f"model.source must be 'embedded' (or give model.config), got {spec.get('source')!r}")
    model, tokenizer = load_default_model()
    model.train()
    return model, tokenizer, str(DEFAULT_MODEL_PATH)


def _wrap_peft(model, spec: dict[str, Any] | None, seed: int):
    if not spec:
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **spec))


def card_description(results: dict[str, Any], config: dict[str, Any]) -> str:
    """Markdown body of the model card: method, task sequence and accuracy matrix."""
    names = results["tasks"]
    lines = [
        "A model continually trained with [hf_longmem](https://github.com/hf-longmem/hf_longmem) "
        f"(`hf_longmem.continual`), strategies: {', '.join(results['meta']['strategies']) or 'none (naive fine-tuning)'}"
        f"{' on LoRA adapters' if config.get('peft') else ' (full fine-tuning)'}.",
        "",
        "## Task sequence",
        "",
        "| # | task | examples | steps |",
        "|---:|---|---:|---:|",
    ]
    steps = results["meta"]["steps_per_task"]
    sizes = results["meta"].get("task_sizes", ["?"] * len(names))
    lines += [f"| {i} | {n} | {sizes[i]} | {steps[i]} |" for i, n in enumerate(names)]
    lines += ["", "## Accuracy matrix", "", "Row *i*: exact-match accuracy on every task after training task *i*.", ""]
    lines.append("| after \\ on | " + " | ".join(names) + " |")
    lines.append("|---|" + "---:|" * len(names))
    if results.get("initial_accuracy") is not None:
        lines.append("| (initial) | " + " | ".join(f"{a:.3f}" for a in results["initial_accuracy"]) + " |")
    for i, row in enumerate(results["accuracy_matrix"]):
        lines.append(f"| {names[i]} | " + " | ".join(f"{a:.3f}" for a in row) + " |")
    lines += ["", "Accuracy of every task during training (the stability gap): `continual/stability_gap.png`;", ""]
    lines += ["all periodic evaluations: `continual/results.json`."]
    m = results["metrics"]
    lines += ["", "## Continual metrics", ""]
    for key in ("acc", "forgetting", "bwt", "fwt", "avg_min_acc", "wc_acc", "wf_10"):
        if m.get(key) is not None:
            lines.append(f"- **{key}:** {m[key]:.3f}")
    lines += ["", "## Training configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```"]
    return "\n".join(lines)


def save_final(trainer: ContinualTrainer, path: Path, model: Any = None) -> Path:
    """``save_pretrained`` of the final model (the evaluated weights; a LoRA model saves its adapter) and tokenizer,
    written to ``path.tmp`` and renamed. ``model``: the whole model (:func:`unsharded_model`; default: the trainer's
    unwrapped model)."""
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib_exit([s for s in trainer.strategies if s.name == "ilora"]):
        (trainer.unwrapped if model is None else model).save_pretrained(tmp, safe_serialization=True)
    trainer.tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def publish_result(
    trainer: ContinualTrainer, results: dict[str, Any], config: dict[str, Any], base_name: str, model: Any = None
) -> str:
    """Publish the trained model (or LoRA adapter) with a card stating the task sequence and accuracy matrix
    (``model``: the whole model, default the trainer's unwrapped one)."""
    from hf_longmem.hub import LocalFolderApi, publish

    spec = dict(config["publish"])
    if "repo_id" not in spec:
        raise ValueError("publish.repo_id is required")
    model = trainer.unwrapped if model is None else model
    with_ema = [s for s in trainer.strategies if s.name == "ilora" and s.infer_with == "ema"]
    with contextlib_exit(with_ema):
        if config.get("peft") and spec.get("merge_lora", False):
            model = copy.deepcopy(model).merge_and_unload()  # not unload(): that would discard what was learned
        api = LocalFolderApi(spec["local_dir"]) if spec.get("local_dir") else None
        out = Path(trainer.config.output_dir)
        extra = {
            f"continual/{name}": out / name for name in ("results.json", "stability_gap.png") if (out / name).is_file()
        }
        return publish(
            model,
            spec["repo_id"],
            tokenizer=trainer.tokenizer,
            template="continual",
            description=card_description(results, config),
            tags=["continual-learning", *results["meta"]["strategies"]],
            api=api,
            dry_run=bool(spec.get("dry_run", False)),
            staging_dir=spec.get("staging_dir"),
            extra_files=extra,
        )


class contextlib_exit:  # noqa: N801 - used like a contextlib helper
    """Enter the ``eval_context`` of the given strategies (so published weights are the evaluated ones)."""

    def __init__(self, strategies):
        import contextlib

        self.stack = contextlib.ExitStack()
        self.strategies = strategies

    def __enter__(self):
        for s in self.strategies:
            self.stack.enter_context(s.eval_context())
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def run(
    config: dict[str, Any],
    *,
    loss_on: str,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, Any] | None:
    """Build everything from ``config`` and train; returns the results (``None`` if stopped early)."""
    torch.set_num_threads(int(config.get("num_threads", 1)))
    seed = int(config.get("seed", 0))
    model, tokenizer, base_name = build_model(config.get("model"), seed)
    model = _wrap_peft(model, config.get("peft"), seed)
    task_spec = dict(config.get("tasks") or {})
    task_spec.setdefault("seed", seed)
    tasks = [tokenize_task(t, tokenizer) for t in fact_domains(**task_spec)]
    train = dict(config.get("train") or {})
    train.setdefault("loss_on", loss_on)
    train.setdefault("seed", seed)
    train["output_dir"] = str(config.get("output_dir", train.get("output_dir", "runs/continual")))
    if "betas" in train:
        train["betas"] = tuple(train["betas"])
    try:
        trainer_config = TrainerConfig(**train)
    except TypeError as error:
        raise ValueError(f"bad train options: {error}") from error
    strategies = [build_strategy(s) for s in config.get("strategies") or []]
    if accelerator is None:
        # on CPU-only hosts under `accelerate launch --num_processes N` this is gloo DDP (or FSDP2 with the FSDP
        # plugin), never N independent single-process runs
        accelerator = build_accelerator()
    if config.get("peft") and is_sharded(accelerator):
        raise ValueError(
            "a LoRA (peft) model cannot be gathered from FSDP shards for saving here (unsharded_model rebuilds "
            "a transformers model from its config): train it with DDP (recipes/configs/accelerate/ddp.yaml)"
        )
    trainer = ContinualTrainer(model, tokenizer, tasks, strategies, trainer_config, accelerator=accelerator)
    start = time.time()
    results = trainer.train(
        resume_from="latest" if resume else None, stop_after_steps=stop_after_steps, overwrite=overwrite
    )
    if results is None:
        return None
    results["meta"]["wall_seconds"] = round(time.time() - start, 1)
    results["meta"]["task_sizes"] = [len(t.examples) for t in tasks]
    results["meta"]["command"] = " ".join(sys.argv)
    results["meta"]["base_model"] = base_name
    results["meta"]["recipe_config"] = config
    final = unsharded_model(trainer.accelerator, trainer.model)  # every process (FSDP gathers); None off the main
    if trainer.accelerator.is_main_process:
        from .evaluation import write_json_atomic

        write_json_atomic(Path(trainer_config.output_dir) / "results.json", results)
        save_final(trainer, Path(trainer_config.output_dir) / "final", final)
    if config.get("publish") and trainer.accelerator.is_main_process:
        results["published_to"] = publish_result(trainer, results, config, base_name, final)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return results


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, required=True, help="recipe YAML (recipes/configs/continual_*.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.batch_size=8"
    )
    parser.add_argument("--output_dir", default=None, help="override output_dir")
    parser.add_argument(
        "--resume", action="store_true", help="resume from the newest checkpoint in output_dir (of this same run)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in an output_dir that holds an earlier run's files"
    )
    parser.add_argument("--stop_after_steps", type=int, default=None, help="stop after this many steps (testing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, loss_on: str, description: str = "") -> dict[str, Any] | None:
    """Command-line entry of the recipes."""
    args = parse_args(argv, description)
    overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    config = load_config(args.config, overrides)
    if args.resume and args.overwrite:
        raise SystemExit("--resume and --overwrite exclude each other")
    results = run(
        config, loss_on=loss_on, resume=args.resume, overwrite=args.overwrite, stop_after_steps=args.stop_after_steps
    )
    if results is not None and PartialState().is_main_process:
        m = results["metrics"]
        print(
            f"ACC {m['acc']:.3f}  forgetting {m.get('forgetting', 0):.3f}  BWT {m.get('bwt', 0):.3f}  "
            f"WC-ACC {m['wc_acc']:.3f}  min-ACC {m.get('avg_min_acc')}  time {results['meta']['wall_seconds']}s  "
            f"-> {Path(config.get('output_dir', 'runs/continual')) / 'results.json'}"
        )
    return results
