"""hf_longmem: memory methods for LLMs as Hugging Face transformers components.

Importing the package registers the ``hf_longmem`` attention functions with transformers (cheap, idempotent), the
caches with :func:`make_cache`, and the memory architectures (Titans, MoM, LongMem, HMT, CMT, LongGen) with the
transformers Auto classes.

One exception keeps the command line fast: inside the ``hf-longmem`` command the package defers these imports to
the first use of one of its names (PEP 562), so that ``hf-longmem --help`` and argument errors answer without
loading torch and transformers.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hf_longmem.version import __version__

#: The public names: those of :mod:`hf_longmem.api` and the version (a test keeps the two lists equal).
_PUBLIC = (
    "CompressedLayer",
    "D2OCache",
    "DuoAttentionCache",
    "EMLLMCache",
    "FullCache",
    "H2OCache",
    "InfLLMCache",
    "KVMergerCache",
    "LongMemCache",
    "PyramidKVCache",
    "SirLLMCache",
    "SnapKVCache",
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
)
__all__ = [*_PUBLIC, "__version__"]


def _invoked_as_command() -> bool:
    """Whether this process is the ``hf-longmem`` console script."""
    return bool(sys.argv) and os.path.basename(sys.argv[0]).removesuffix(".exe") == "hf-longmem"


if _invoked_as_command():

    def __getattr__(name: str) -> Any:
        if name not in _PUBLIC:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from hf_longmem import api

        return getattr(api, name)

else:
    from hf_longmem import api as _api  # registers the attention functions, caches and architectures

    globals().update({name: getattr(_api, name) for name in _PUBLIC})
