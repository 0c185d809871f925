"""LongMem (Wang et al., 2023): a frozen causal LM + a residual SideNet reading a chunked K/V memory bank.

Importing this package registers ``LongMemConfig`` / ``LongMemModel`` / ``LongMemForCausalLM`` with the Auto classes
(``model_type="longmem"``). See ``docs/longmem.md``.
"""

from hf_longmem.modeling.longmem.cache_longmem import LongMemBankCache
from hf_longmem.modeling.longmem.configuration_longmem import LongMemConfig
from hf_longmem.modeling.longmem.modeling_longmem import LongMemForCausalLM, LongMemModel, LongMemPreTrainedModel
from hf_longmem.modeling.remote_code import register_architecture

register_architecture(LongMemConfig, LongMemModel, LongMemForCausalLM)

__all__ = ["LongMemBankCache", "LongMemConfig", "LongMemForCausalLM", "LongMemModel", "LongMemPreTrainedModel"]
