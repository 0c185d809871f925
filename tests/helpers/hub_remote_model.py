"""A tiny remote-code architecture for the hub tests: a Llama whose logits are multiplied by ``config.logit_scale``.

Both classes are registered with ``register_for_auto_class``, so ``save_pretrained`` copies this file next to the
weights and writes ``auto_map``. The file imports only torch/transformers, so it loads with ``trust_remote_code=True``
in a process where neither ``hf_longmem`` nor ``tests`` is importable. The logit scale makes the remote class
observable: loading it as a plain Llama would give different logits.
"""

from transformers import LlamaConfig, LlamaForCausalLM


class HubTestConfig(LlamaConfig):
    model_type = "hf_longmem_hub_test"

    def __init__(self, logit_scale: float = 2.0, **kwargs):
        self.logit_scale = logit_scale
        super().__init__(**kwargs)


class HubTestForCausalLM(LlamaForCausalLM):
    config_class = HubTestConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.config.logit_scale
        return out


HubTestConfig.register_for_auto_class()
HubTestForCausalLM.register_for_auto_class("AutoModelForCausalLM")
