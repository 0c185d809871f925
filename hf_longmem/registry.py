"""Name -> cache class registry: ``make_cache("streaming", model, budget=256)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from transformers import Cache, PretrainedConfig, PreTrainedModel

from hf_longmem.attention import enable_longmem_attention
from hf_longmem.cache_classes.base import LongMemCache, check_cache_layout, check_model_attention, check_options
from hf_longmem.memory.step_inputs import track_step_inputs


@dataclass(frozen=True)
class CacheSpec:
    """A registered cache method.

    Attributes:
        name: registry name.
        cls: the ``Cache`` subclass; takes its options plus ``config=`` and may define ``from_model(model, **opts)``.
        needs_attention: the method reads queries/scores in hf_longmem's attention function.
        summary: one line for ``--help`` and tables.
        budget_options: maps a token budget to this method's options (``None``: the class's own
            ``options_for_budget`` classmethod if it has one, else ``{"budget": b}`` when it takes a ``budget``, else
            the method has no budget).
    """

    name: str
    cls: type
    needs_attention: bool = False
    summary: str = ""
    budget_options: Callable[[int], dict] | None = None

    def options_for_budget(self, budget: int) -> dict:
        """The options that make this method hold about ``budget`` tokens per layer (``{}`` if it has no budget)."""
        if self.budget_options is not None:
            return self.budget_options(budget)
        if hasattr(self.cls, "options_for_budget"):
            return self.cls.options_for_budget(budget)
        return {"budget": budget} if "budget" in inspect.signature(self.cls.__init__).parameters else {}


_REGISTRY: dict[str, CacheSpec] = {}


def register_cache(
    name: str,
    cls: type,
    *,
    needs_attention: bool = False,
    summary: str = "",
    budget_options: Callable[[int], dict] | None = None,
) -> None:
    """Adds a cache method under ``name`` (replacing any previous one of that name).

    ``budget_options(budget) -> dict`` tells harnesses how a token budget maps onto the method's own options (for
    methods whose size is not a ``budget`` argument, e.g. SirLLM's ``entropy_size``).
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"`name` must be a non-empty identifier, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Cache)):
        raise ValueError(f"`cls` must be a transformers Cache subclass, got {cls!r}")
    _REGISTRY[name] = CacheSpec(name, cls, needs_attention, summary, budget_options)


def available_caches() -> list[str]:
    """Names of the registered cache methods: the uncompressed baseline ``full`` first, then the package's methods by
    module name (a module's methods in registration order), then methods registered by the user, in that order. The
    order does not depend on which module was imported first."""
    rank = {name: index for index, name in enumerate(_REGISTRY)}

    def key(name: str):
        module = _REGISTRY[name].cls.__module__
        builtin = module.startswith("hf_longmem.cache_classes.")
        return (name != "full", not builtin, module if builtin else "", rank[name])

    return sorted(_REGISTRY, key=key)


def get_cache_spec(name: str) -> CacheSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown cache {name!r}; available: {', '.join(available_caches())}") from None


def make_cache(name: str, model_or_config: PreTrainedModel | PretrainedConfig | None = None, **options) -> Cache:
    """Builds a fresh cache of method ``name`` for a model.

    Args:
        name: a name from :func:`available_caches`.
        model_or_config: the model (preferred: its layer layout and RoPE are read, and methods that need queries
            get hf_longmem attention switched on) or just its config.
        **options: the method's options (e.g. ``budget=256``); unknown options raise ``ValueError``.

    Returns:
        A ``transformers.Cache`` to pass as ``model.generate(..., cache=cache)``. Build a new one per generation.
    """
    spec = get_cache_spec(name)
    check_options(spec.cls, options)
    if "config" in options:
        raise ValueError("pass the model or config as `model_or_config`, not as `config=`")
    config = model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config
    if config is not None and issubclass(spec.cls, LongMemCache):  # before any method-specific requirement
        check_cache_layout(config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config)
    if isinstance(model_or_config, PreTrainedModel):
        if issubclass(spec.cls, LongMemCache):
            check_model_attention(model_or_config, spec.needs_attention)
        # Build (and so validate) first; change the model only once the cache exists: a refused option leaves the
        # model as it was.
        if hasattr(spec.cls, "from_model"):
            cache = spec.cls.from_model(model_or_config, **options)
        else:
            cache = spec.cls(config=model_or_config.config, **options)
        windowed = any(getattr(layer, "sliding_window", None) is not None for layer in getattr(cache, "layers", ()))
        # windowed: compressed sliding-window layers apply the window themselves; static layers mask their own slots
        if spec.needs_attention or windowed or getattr(cache, "static", False):
            enable_longmem_attention(model_or_config)
        track_step_inputs(model_or_config)  # position ids / mask for models whose attention keeps them from the cache
        return cache
    if model_or_config is not None and not isinstance(model_or_config, PretrainedConfig):
        raise ValueError(
            f"`model_or_config` must be a transformers PreTrainedModel or PretrainedConfig, got {type(model_or_config).__name__}"
        )
    return spec.cls(config=model_or_config, **options)


#: Modules of ``hf_longmem.cache_classes`` that hold shared machinery, not a method.
SHARED_CACHE_MODULES = ("base", "hooked", "rotation", "scored", "static")


def import_cache_modules() -> None:
    """Imports every method module of ``hf_longmem.cache_classes`` (each registers itself), the uncompressed baseline
    first and then by module name: that is the order of :func:`available_caches`."""
    import importlib

    from hf_longmem import cache_classes
    from hf_longmem.registration import import_submodules

    importlib.import_module(f"{cache_classes.__name__}.full")
    import_submodules(cache_classes.__name__, cache_classes.__path__, skip=SHARED_CACHE_MODULES)
