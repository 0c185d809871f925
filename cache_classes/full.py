"""The uncompressed baseline: transformers' ``DynamicCache`` plus byte accounting."""

from __future__ import annotations

from transformers import DynamicCache

from hf_longmem.registry import register_cache

from .base import layer_memory_bytes


class FullCache(DynamicCache):
    """``DynamicCache`` that reports ``memory_bytes()`` like every hf_longmem cache (keys + values held).

    Args:
        config: the model config (optional; sliding-window layers then stay bounded as in ``DynamicCache``).
    """

    def __init__(self, config=None):
        super().__init__(config=config)

    @classmethod
    def from_model(cls, model, **kwargs) -> FullCache:
        return cls(config=model.config, **kwargs)

    def memory_bytes(self) -> int:
        return sum(layer_memory_bytes(layer) for layer in self.layers)


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache("full", FullCache, summary="no compression (transformers DynamicCache)")
