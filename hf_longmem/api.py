"""The public API of :mod:`hf_longmem`: importing this module registers the attention functions, the caches and the
architectures (``import hf_longmem`` imports it; see the package docstring)."""

from hf_longmem import hub, modeling  # noqa: F401  (hub: publish(); modeling: registers the architectures)
from hf_longmem.attention import enable_longmem_attention, register_attention
from hf_longmem.cache_classes.base import CompressedLayer, LongMemCache, cache_memory_bytes
from hf_longmem.cache_classes.d2o import D2OCache
from hf_longmem.cache_classes.duo_attention import DuoAttentionCache
from hf_longmem.cache_classes.emllm import EMLLMCache
from hf_longmem.cache_classes.full import FullCache
from hf_longmem.cache_classes.h2o import H2OCache
from hf_longmem.cache_classes.infllm import InfLLMCache
from hf_longmem.cache_classes.kvmerger import KVMergerCache
from hf_longmem.cache_classes.sirllm import SirLLMCache
from hf_longmem.cache_classes.snapkv import PyramidKVCache, SnapKVCache
from hf_longmem.cache_classes.streaming import StreamingCache
from hf_longmem.cache_classes.think import ThinKCache
from hf_longmem.registry import available_caches, get_cache_spec, import_cache_modules, make_cache, register_cache

register_attention()
import_cache_modules()  # each cache module registers its method where it is defined (full first, then by name)


def load_default_model(*args, **kwargs):
    """The embedded tiny long-context model and its tokenizer: ``(model, tokenizer)``."""
    from hf_longmem.default_model import load_default_model as _load

    return _load(*args, **kwargs)


__all__ = [
    "CompressedLayer",
    "D2OCache",
    "DuoAttentionCache",
    "EMLLMCache",
    "FullCache",
    "H2OCache",
    "InfLLMCache",
    "KVMergerCache",
    "PyramidKVCache",
    "SirLLMCache",
    "SnapKVCache",
    "LongMemCache",
    "StreamingCache",
    "ThinKCache",
    "available_caches",
    "cache_memory_bytes",
    "enable_longmem_attention",
    "get_cache_spec",
    "hub",
    "load_default_model",
    "make_cache",
    "register_attention",
    "register_cache",
]
