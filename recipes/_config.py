"""YAML + command-line configuration shared by the training recipes.

A recipe describes its settings as a dataclass; ``--config file.yaml`` fills it, and every scalar field (``str``,
``int``, ``float``, ``bool``, annotated as a type or as a string under ``from __future__ import annotations``) can
be overridden as ``--name value``. Recipes import this module as ``_config`` (they run as scripts, and tests put ``recipes/`` on
the path).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hf_longmem.training import LongSequenceOptions

ConfigT = TypeVar("ConfigT")


@dataclass
class LongSequenceConfig:
    """Long-sequence memory options a recipe config inherits (YAML keys / ``--key value``; all off by default).

    ``activation_checkpointing``: recompute each layer in backward; ``activation_offload``: keep the activations saved
    for backward in host memory; ``chunked_ce``: positions per chunk of a cross entropy that never holds
    ``[batch, seq, vocab]`` logits (``0``: off). Gradients equal the plain path's
    (:mod:`hf_longmem.training.long_sequence`).
    """

    activation_checkpointing: bool = False
    activation_offload: bool = False
    chunked_ce: int = 0

    def long_sequence_options(self) -> LongSequenceOptions:
        """The validated options (``ValueError`` naming a bad one)."""
        return LongSequenceOptions(self.activation_checkpointing, self.activation_offload, self.chunked_ce)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {text!r}")


SCALAR_TYPES: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float, "bool": _parse_bool}


def _scalar_parser(annotation: Any) -> Callable[[str], Any] | None:
    """The command-line parser of a field annotated ``annotation`` (``int`` or ``"int"``), ``None`` if not scalar."""
    return SCALAR_TYPES.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))


def parse_recipe_config(
    config_cls: type[ConfigT],
    argv: list[str] | None,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    extra_overrides: tuple[str, ...] = (),
) -> tuple[ConfigT, argparse.Namespace]:
    """``config_cls`` from ``--config`` YAML with scalar ``--field value`` overrides, and the parsed arguments.

    Args:
        config_cls: the recipe's settings dataclass.
        argv: the arguments (``None``: ``sys.argv[1:]``).
        description: the ``--help`` text.
        add_arguments: adds the recipe's own run options (``--eval_only``, ``--publish``, ...) to the parser.
        extra_overrides: further fields that ``add_arguments`` exposes as options (e.g. list fields with
            ``nargs="+"``); a value given on the command line replaces the YAML's.

    Raises:
        ValueError: the YAML has keys that are not fields of ``config_cls``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, help=f"YAML file with {config_cls.__name__} keys")
    if add_arguments is not None:
        add_arguments(parser)
    scalars = [f.name for f in fields(config_cls) if _scalar_parser(f.type) is not None]
    for f in fields(config_cls):
        if f.name in scalars:
            parser.add_argument(f"--{f.name}", type=_scalar_parser(f.type), default=None)
    args = parser.parse_args(argv)
    values = yaml.safe_load(args.config.read_text()) if args.config else {}
    values = values or {}
    unknown = sorted(set(values) - {f.name for f in fields(config_cls)})
    if unknown:
        raise ValueError(f"unknown keys in --config {args.config}: {unknown}")
    for name in (*scalars, *extra_overrides):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return config_cls(**values), args
