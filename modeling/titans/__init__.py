"""Titans (MAC, MAG, MAL): neural long-term memory architectures, registered with the Auto classes on import."""

from hf_longmem.modeling.remote_code import register_architecture
from hf_longmem.modeling.titans.cache import TitansCache
from hf_longmem.modeling.titans.configuration_titans import TitansConfig
from hf_longmem.modeling.titans.modeling_titans import TitansForCausalLM, TitansModel, TitansPreTrainedModel

register_architecture(TitansConfig, TitansModel, TitansForCausalLM)

__all__ = ["TitansCache", "TitansConfig", "TitansForCausalLM", "TitansModel", "TitansPreTrainedModel"]
