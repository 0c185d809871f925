"""The uncompressed baseline: transformers' ``DynamicCache`` plus byte accounting."""

from __future__ import annotations

from transformers import DynamicCache

from hf_longmem.memory.accounting import RESIDENT, MemoryParts, MemoryReport, tensor_bytes
from hf_longmem.registry import register_cache


class FullCache(MemoryReport, DynamicCache):
    """``DynamicCache`` that reports its memory like every hf_longmem cache (``memory_parts`` -> ``memory_breakdown``
    -> ``memory_bytes``; the keys and values held).

    Args:
        config: the model config (optional; sliding-window layers then stay bounded as in ``DynamicCache``).
    """

    def __init__(self, config=None):
        super().__init__(config=config)
        #: Arguments ``generate`` needs with this cache (none), as every hf_longmem cache has.
        self.generate_kwargs: dict = {}

    @classmethod
    def from_model(cls, model, **kwargs) -> FullCache:
        return cls(config=model.config, **kwargs)

    def memory_parts(self) -> MemoryParts:
        """``{"kv": ("resident", bytes of every layer's keys and values)}``."""
        held = (
            getattr(layer, name, None) for layer in self.layers if layer.is_initialized for name in ("keys", "values")
        )
        return {"kv": (RESIDENT, tensor_bytes(*held))}


# The method registers itself where it is defined (make_cache, the CLI, the bench and the tests enumerate the registry).
register_cache("full", FullCache, summary="no compression (transformers DynamicCache)")
