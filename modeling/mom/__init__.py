"""MoM (Mixture-of-Memories, Du et al. 2025): routed gated-delta-rule memories, AutoModel-registered.

Importing this package registers ``MomConfig`` / ``MomModel`` / ``MomForCausalLM`` (``model_type="mom_gdn"``) with
the Auto classes; ``save_pretrained`` writes an ``auto_map`` so ``trust_remote_code=True`` loads work anywhere
``hf_longmem`` is installed. See ``docs/mom.md``.
"""

from hf_longmem.modeling.mom.cache import MomCache, MomCacheLayer
from hf_longmem.modeling.mom.configuration_mom import MomConfig
from hf_longmem.modeling.mom.modeling_mom import MomForCausalLM, MomModel, MomPreTrainedModel
from hf_longmem.modeling.remote_code import register_architecture

register_architecture(MomConfig, MomModel, MomForCausalLM)

__all__ = ["MomCache", "MomCacheLayer", "MomConfig", "MomForCausalLM", "MomModel", "MomPreTrainedModel"]
