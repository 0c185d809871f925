"""Auto-class registration and thin remote-code shims shared by every hf_longmem architecture.

Each architecture registers its classes with :func:`register_architecture` on import, so that
``AutoModelForCausalLM.from_config(config)`` works in the process that imported ``hf_longmem``, and
``save_pretrained`` writes an ``auto_map`` so that a fresh process can load the checkpoint with
``AutoModelForCausalLM.from_pretrained(path_or_repo, trust_remote_code=True)``.

transformers copies the *whole* source file of a class registered with ``register_for_auto_class`` (plus its
relative imports) next to the weights. We keep the implementation in the installed package instead: classes
that mix in :class:`RemoteCodeMixin` replace those copies with thin shims that import the real classes from
``hf_longmem``. The loaded classes are then the package's own (one implementation, the installed version's
bug fixes and kernels), and a checkpoint never carries a stale fork of the code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

SHIM_HEADER = '''"""Remote-code shim written by hf_longmem {version}.

The implementation lives in the installed ``hf_longmem`` package; this file only re-exports its classes so that
``from_pretrained(..., trust_remote_code=True)`` finds them.
"""

'''

#: Where users are sent when the package is missing.
INSTALL_URL = "https://github.com/hf-longmem/hf_longmem#install"


def shim_source(module_name: str, class_names: Iterable[str]) -> str:
    """The text of a shim module that re-exports ``class_names`` from ``module_name``.

    Without ``hf_longmem`` installed the shim raises an ``ImportError`` naming the version that wrote the checkpoint
    and where the install instructions are.
    """
    from hf_longmem.version import __version__

    names = sorted(set(class_names))
    if not names:
        raise ValueError("class_names must name at least one class")
    return SHIM_HEADER.format(version=__version__) + (
        "try:\n"
        f"    from {module_name} import {', '.join(names)}  # noqa: F401\n"
        "except ImportError as error:\n"
        "    raise ImportError(\n"
        f'        "this checkpoint was written with hf_longmem {__version__} and needs that package: "\n'
        f"        \"pip install 'hf-longmem>={__version__}' (CPU or CUDA torch first: see {INSTALL_URL})\"\n"
        "    ) from error\n"
    )


def _registered_classes(module_name: str) -> list[str]:
    """Names of the classes of ``module_name`` that carry an ``_auto_class`` (i.e. appear in an ``auto_map``)."""
    module = sys.modules[module_name]
    return [
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and value.__module__ == module_name and getattr(value, "_auto_class", None)
    ]


def write_shims(save_directory: str | os.PathLike, classes: Iterable[type]) -> list[Path]:
    """Overwrite the source files transformers copied for ``classes`` with shims importing them from the package.

    Args:
        save_directory: the folder ``save_pretrained`` wrote.
        classes: the classes whose defining modules were copied (a config class and/or model classes).

    Returns:
        the shim files written (one per defining module).
    """
    written = []
    modules = {cls.__module__ for cls in classes}
    for module_name in sorted(modules):
        if module_name == "__main__" or module_name not in sys.modules:
            continue
        target = Path(save_directory) / f"{module_name.rsplit('.', 1)[-1]}.py"
        names = _registered_classes(module_name) or [cls.__name__ for cls in classes if cls.__module__ == module_name]
        temporary = target.with_suffix(".py.tmp")
        temporary.write_text(shim_source(module_name, names))
        os.replace(temporary, target)
        written.append(target)
    return written


class RemoteCodeMixin:
    """Mix into a ``PretrainedConfig`` or ``PreTrainedModel`` subclass: ``save_pretrained`` writes thin shims.

    Keep the defining modules free of *relative* imports (import ``hf_longmem.…`` absolutely): transformers
    copies relatively imported files too, and only the defining module of each class is replaced by a shim.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        from hf_longmem.version import __version__

        config = self if isinstance(self, PretrainedConfig) else getattr(self, "config", None)
        if isinstance(config, PretrainedConfig):  # recorded in config.json, as transformers records its own version
            config.hf_longmem_version = __version__
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(type(self), "_auto_class", None) is not None:
            classes: list[type] = [type(self)]
            config = getattr(self, "config", None)
            if isinstance(config, PretrainedConfig) and getattr(type(config), "_auto_class", None) is not None:
                classes.append(type(config))
            write_shims(save_directory, classes)
        return result


@dataclass(frozen=True)
class ArchitectureSpec:
    """A registered architecture: its ``model_type`` and the classes the Auto classes build."""

    model_type: str
    config_class: type[PretrainedConfig]
    base_model_class: type[PreTrainedModel] | None = None
    causal_lm_class: type[PreTrainedModel] | None = None


_ARCHITECTURES: dict[str, ArchitectureSpec] = {}


def register_architecture(
    config_class: type[PretrainedConfig],
    base_model_class: type[PreTrainedModel] | None = None,
    causal_lm_class: type[PreTrainedModel] | None = None,
) -> None:
    """Register an architecture with the Auto classes, and for ``auto_map`` on ``save_pretrained``.

    Called in the architecture package's ``__init__`` (``hf_longmem.modeling`` imports every package of its folder).

    Args:
        config_class: the config, with a unique ``model_type``.
        base_model_class: registered with ``AutoModel`` (optional).
        causal_lm_class: registered with ``AutoModelForCausalLM`` (optional).
    """
    model_type = getattr(config_class, "model_type", "")
    if not model_type:
        raise ValueError(f"config_class {config_class.__name__} must set a model_type")
    AutoConfig.register(model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    if base_model_class is not None:
        AutoModel.register(config_class, base_model_class, exist_ok=True)
        base_model_class.register_for_auto_class("AutoModel")
    if causal_lm_class is not None:
        AutoModelForCausalLM.register(config_class, causal_lm_class, exist_ok=True)
        causal_lm_class.register_for_auto_class("AutoModelForCausalLM")
    _ARCHITECTURES[model_type] = ArchitectureSpec(model_type, config_class, base_model_class, causal_lm_class)


def available_architectures() -> list[str]:
    """``model_type`` of every registered architecture: hf_longmem's own by name, then those registered by the user."""
    return sorted(_ARCHITECTURES, key=lambda t: (not _is_builtin(_ARCHITECTURES[t]), t))


def get_architecture_spec(model_type: str) -> ArchitectureSpec:
    """The registered architecture of ``model_type`` (``ValueError`` naming the available ones otherwise)."""
    try:
        return _ARCHITECTURES[model_type]
    except KeyError:
        available = ", ".join(available_architectures())
        raise ValueError(f"unknown architecture {model_type!r}; available: {available}") from None


def _is_builtin(spec: ArchitectureSpec) -> bool:
    return spec.config_class.__module__.startswith("hf_longmem.modeling.")
