"""CMT (Compression Memory Training, Li et al., AAAI 2025) around a frozen causal LM.

Importing this package registers ``model_type="cmt"`` with ``AutoConfig`` / ``AutoModelForCausalLM`` (and for
``auto_map`` on ``save_pretrained``).
"""

from hf_longmem.modeling.cmt.cache_cmt import CMTCache
from hf_longmem.modeling.cmt.configuration_cmt import CMTConfig
from hf_longmem.modeling.cmt.document_bank import BankSignature, DocumentMemoryBank
from hf_longmem.modeling.cmt.modeling_cmt import CMTForCausalLM, CMTPreTrainedModel
from hf_longmem.modeling.remote_code import register_architecture

register_architecture(CMTConfig, causal_lm_class=CMTForCausalLM)

__all__ = ["BankSignature", "CMTCache", "CMTConfig", "CMTForCausalLM", "CMTPreTrainedModel", "DocumentMemoryBank"]
