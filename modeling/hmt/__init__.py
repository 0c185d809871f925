"""HMT (Hierarchical Memory Transformer, He et al., NAACL 2025) around a pretrained causal LM.

Importing this package registers ``model_type="hmt"`` with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``.
"""

from hf_longmem.modeling.hmt.cache import HMTCache
from hf_longmem.modeling.hmt.configuration_hmt import HMTConfig
from hf_longmem.modeling.hmt.memory import HMTMemory, append_to_bank, recall
from hf_longmem.modeling.hmt.modeling_hmt import HMTForCausalLM, HMTModel, HMTPreTrainedModel
from hf_longmem.modeling.remote_code import register_architecture

register_architecture(HMTConfig, HMTModel, HMTForCausalLM)

__all__ = [
    "HMTCache",
    "HMTConfig",
    "HMTForCausalLM",
    "HMTMemory",
    "HMTModel",
    "HMTPreTrainedModel",
    "append_to_bank",
    "recall",
]
