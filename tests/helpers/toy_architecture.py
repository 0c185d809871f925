"""A toy hf_longmem-style architecture for the remote-code tests: a Llama whose logits are shifted by a constant.

It uses :mod:`hf_longmem.modeling.remote_code` exactly as the real architectures do.
"""

from transformers import GenerationMixin, LlamaConfig, LlamaForCausalLM

from hf_longmem.modeling.remote_code import RemoteCodeMixin, register_architecture


class ToyMemoryConfig(RemoteCodeMixin, LlamaConfig):
    model_type = "hf_longmem_toy_memory"

    def __init__(self, logit_shift: float = 1.5, **kwargs):
        self.logit_shift = logit_shift
        super().__init__(**kwargs)


class ToyMemoryForCausalLM(RemoteCodeMixin, LlamaForCausalLM, GenerationMixin):
    config_class = ToyMemoryConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + self.config.logit_shift
        return out


register_architecture(ToyMemoryConfig, causal_lm_class=ToyMemoryForCausalLM)
