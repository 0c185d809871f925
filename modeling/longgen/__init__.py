"""LongGen: sparse attention in most layers, full attention in a few; registered with the Auto classes on import."""

from hf_longmem.modeling.longgen.cache import LongGenCache, LongGenSparseLayer
from hf_longmem.modeling.longgen.configuration_longgen import LongGenConfig
from hf_longmem.modeling.longgen.modeling_longgen import (
    LongGenForCausalLM,
    LongGenModel,
    LongGenPreTrainedModel,
    longgen_sparse_attention,
)
from hf_longmem.modeling.remote_code import register_architecture

register_architecture(LongGenConfig, LongGenModel, LongGenForCausalLM)

__all__ = [
    "LongGenCache",
    "LongGenConfig",
    "LongGenForCausalLM",
    "LongGenModel",
    "LongGenPreTrainedModel",
    "LongGenSparseLayer",
    "longgen_sparse_attention",
]
