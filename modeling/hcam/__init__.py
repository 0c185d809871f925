"""HCAM (Lampinen et al., 2021): hierarchical chunk attention memory branches on a pretrained causal LM.

Importing this package registers ``HCAMConfig`` / ``HCAMModel`` / ``HCAMForCausalLM`` with the Auto classes
(``model_type="hcam"``). See ``docs/hcam.md``.
"""

from hf_longmem.modeling.hcam.attention import HCAMBranch
from hf_longmem.modeling.hcam.cache import HCAMCache
from hf_longmem.modeling.hcam.configuration_hcam import HCAMConfig
from hf_longmem.modeling.hcam.modeling_hcam import HCAMForCausalLM, HCAMModel, HCAMPreTrainedModel
from hf_longmem.modeling.remote_code import register_architecture

register_architecture(HCAMConfig, HCAMModel, HCAMForCausalLM)

__all__ = ["HCAMBranch", "HCAMCache", "HCAMConfig", "HCAMForCausalLM", "HCAMModel", "HCAMPreTrainedModel"]
