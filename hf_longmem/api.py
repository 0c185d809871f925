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
from hf_longmem.registry import available_caches, get_cache_spec, make_cache, register_cache

register_attention()
register_cache("full", FullCache, summary="no compression (transformers DynamicCache)")
register_cache("streaming", StreamingCache, summary="StreamingLLM: attention sinks + recent window")
register_cache("h2o", H2OCache, needs_attention=True, summary="H2O: heavy hitters by accumulated attention + recent window")
register_cache("snapkv", SnapKVCache, needs_attention=True, summary="SnapKV: prompt tokens voted by an observation window")
register_cache("pyramidkv", PyramidKVCache, needs_attention=True, summary="PyramidKV: SnapKV with budgets decreasing by layer")
register_cache("sirllm", SirLLMCache, summary="SirLLM: start + high token-entropy + recent tokens, decaying per turn")
register_cache("think", ThinKCache, needs_attention=True, summary="ThinK: query-driven key-channel pruning over SnapKV")
register_cache("duo_attention", DuoAttentionCache, needs_attention=True, summary="DuoAttention: retrieval heads keep every token, streaming heads sinks + recent window")
register_cache("d2o", D2OCache, needs_attention=True, summary="D2O: layer budgets from attention density, H2O eviction, evicted KVs merged into similar kept ones")
register_cache("kvmerger", KVMergerCache, needs_attention=True, summary="KVMerger: runs of consecutive similar prompt KVs merged with Gaussian-kernel weights")
register_cache("infllm", InfLLMCache, needs_attention=True, summary="InfLLM: initial tokens + top-k memory blocks by representative keys (constant distance) + local window, CPU offload")
register_cache("emllm", EMLLMCache, needs_attention=True, summary="EM-LLM: InfLLM memory with surprise-segmented, graph-refined events, similarity + contiguity retrieval")


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
