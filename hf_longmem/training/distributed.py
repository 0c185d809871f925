"""Distributed engines for the recipes: accelerate's FSDP plugin (also on CPU with gloo), full state dicts, and the
strategies that must refuse sharded parameters.

``accelerate launch --config_file recipes/configs/accelerate/fsdp2.yaml --num_processes N recipe.py`` sets
``ACCELERATE_USE_FSDP=true`` and starts N processes through torchrun. On a machine without a GPU, accelerate 1.16's
``Accelerator()`` then silently builds a *non-distributed* state in every process (``DistributedType.NO``, each one
rank 0 of 1) and ``Accelerator(cpu=True)`` builds DDP over gloo and ignores the plugin. :func:`build_accelerator`
closes both gaps: on CPU it starts the gloo process group (``cpu=True``) and switches the state to FSDP with the
plugin read from the launcher's environment, so ``accelerator.prepare`` shards the model with FSDP2's
``fully_shard`` exactly as on GPUs (torch supports ``fully_shard`` on CPU meshes with gloo); and it refuses a
multi-process launch that would otherwise train N unsynchronised copies.

FSDP1 (``fsdp_version: 1``) cannot run on CPU: torch's ``FullyShardedDataParallel`` raises
``ValueError: Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0`` for the device accelerate
passes, and accelerate's plugin raises ``FSDP parameter initialization with `sync_module_states=True` is not
supported on cpu``; :func:`build_accelerator` says so up front. On GPUs both versions go through accelerate unchanged.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

__all__ = [
    "any_process",
    "build_accelerator",
    "full_state_dict",
    "full_tensor",
    "global_share",
    "global_weight_total",
    "is_sharded",
    "refuse_sharded",
    "unsharded_model",
]


T = TypeVar("T")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def build_accelerator(**kwargs: Any) -> Accelerator:
    """An ``Accelerator`` for the current launch (``kwargs`` go to ``Accelerator``).

    - GPU machines: ``Accelerator(**kwargs)`` (accelerate picks DDP / FSDP / DeepSpeed from the launch).
    - CPU, launched with the FSDP plugin and several processes: gloo process group, FSDP2 state (see module doc).
    - CPU, several processes otherwise: DDP over gloo (``cpu=True``).

    Raises:
        ValueError: FSDP1 requested on CPU; or several processes were launched but accelerate built a single-process
            state (each process would train its own copy and write the same files).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_fsdp = _env_flag("ACCELERATE_USE_FSDP")
    on_cpu = not torch.cuda.is_available()
    if on_cpu and world > 1:
        plugin = None
        if use_fsdp:
            version = int(os.environ.get("FSDP_VERSION", "1"))
            if version != 2:
                raise ValueError(
                    f"FSDP version {version} cannot run on CPU (torch's FullyShardedDataParallel rejects the CPU "
                    "device accelerate passes); set `fsdp_version: 2` (recipes/configs/accelerate/fsdp2.yaml) or use "
                    "a GPU"
                )
            # sync_module_states broadcasts rank 0's weights, which accelerate only allows on GPUs; every recipe
            # builds its model from a seeded config or a checkpoint, so all ranks hold the same weights anyway.
            os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
            plugin = FullyShardedDataParallelPlugin()
        kwargs.setdefault("cpu", True)
        accelerator = Accelerator(**kwargs)
        if plugin is not None:
            # what AcceleratorState.__init__ does for FSDP on GPUs (the partial state too: every later
            # AcceleratorState() call copies the partial state's distributed_type back)
            accelerator.state.distributed_type = DistributedType.FSDP
            accelerator.state.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    else:
        accelerator = Accelerator(**kwargs)
    if world > 1 and accelerator.num_processes != world:
        raise ValueError(
            f"{world} processes were launched but accelerate built a {accelerator.num_processes}-process state "
            f"({accelerator.distributed_type}); every process would train alone. Launch with a config from "
            "recipes/configs/accelerate/ (ddp.yaml or fsdp2.yaml)"
        )
    return accelerator


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether ``accelerator.prepare`` shards parameters (FSDP or DeepSpeed ZeRO)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def refuse_sharded(accelerator: Accelerator, what: str, why: str) -> None:
    """``ValueError`` (before any training) when ``what`` cannot run on sharded parameters, saying ``why``."""
    if is_sharded(accelerator):
        raise ValueError(
            f"{what} cannot run under {accelerator.distributed_type.value}: {why}. Use DDP "
            "(accelerate launch --config_file recipes/configs/accelerate/ddp.yaml ...) or one process"
        )


def global_share(samples: Sequence[T], accelerator: Accelerator) -> list[T]:
    """This process's contiguous share of a global batch that every process drew alike (the same seed).

    Drawing the whole global batch everywhere and splitting it makes ``N`` processes with ``B / N`` samples each see
    exactly what one process with ``B`` samples sees, so a sharded run can be checked against a single-process one.
    """
    count, index = accelerator.num_processes, accelerator.process_index
    if len(samples) % count:
        raise ValueError(f"a global batch of {len(samples)} samples does not split over {count} processes")
    share = len(samples) // count
    return list(samples[index * share : (index + 1) * share])


def global_weight_total(total: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """The denominator of a per-process weighted loss that makes DDP's / FSDP's gradient *mean* over processes the
    gradient of the whole global batch's weighted mean: the processes' weight totals summed, divided by their count.
    (Every process must call it.)"""
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total.detach(), reduction="sum") / accelerator.num_processes
    return total


def any_process(flag: bool, accelerator: Accelerator) -> bool:
    """Whether ``flag`` holds on any process: a decision every process must take alike, e.g. stopping on a clock
    (each process reads its own). Every process must call it."""
    if accelerator.num_processes == 1:
        return flag
    votes = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(votes, reduction="sum") > 0)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded parameter (FSDP2's ``DTensor``) gathered whole, for logging; any other tensor as it is. Under FSDP
    every process must call it."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict as CPU tensors (``{}`` on processes other than the main one).

    Under FSDP every process must call this (it all-gathers the shards); otherwise it is the unwrapped model's
    ``state_dict()`` moved to CPU.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(accelerator.unwrap_model(model), options=options)
        return state if accelerator.is_main_process else {}
    if not accelerator.is_main_process:
        return {}
    return {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def unsharded_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module | None:
    """The trained model as a plain module on the main process (``None`` elsewhere), ready for ``save_pretrained``.

    Without FSDP this is the unwrapped model itself. Under FSDP (every process must call it) the shards are gathered
    into a new instance of the model's class built from its ``config`` on CPU: transformers' ``save_pretrained``
    cannot save the sharded module (its tied-weight check reads the DTensor parameters' storage).
    """
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type != DistributedType.FSDP:
        return unwrapped if accelerator.is_main_process else None
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    if not hasattr(unwrapped, "config"):
        raise ValueError(f"{type(unwrapped).__name__} has no `config`; cannot rebuild it unsharded")
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swaps the class for a subclass `FSDP<Name>(FSDPModule, Name)`: rebuild the original class
    cls = next(c for c in type(unwrapped).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("cpu"):
        plain = cls(copy.deepcopy(unwrapped.config))
    plain.load_state_dict(state, strict=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    return plain.train(unwrapped.training)
