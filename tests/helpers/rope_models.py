"""Tiny random models of the RoPE layouts transformers ships, built from configs (never downloaded).

Each entry is a ``model_type`` plus the config overrides that make its RoPE feature matter: interleaved pairs
(Cohere, GLM, GLM-4, ERNIE-4.5, GPT-J), partial rotary (Phi, StableLM, GPT-NeoX, GLM, GPT-J), per-layer-type
frequencies (Gemma-3: different ``rope_theta`` for sliding and full layers), NoPE layers (SmolLM3, EXAONE-4),
YaRN magnitude scaling (GPT-OSS).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers.tiny_models import TINY_DECODER

BASE = dict(TINY_DECODER, intermediate_size=128)

GEMMA3_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
}

#: name -> (model_type, overrides). ``num_hidden_layers`` is set by the caller where it matters.
ARCHS = {
    "llama": ("llama", {}),
    "cohere": ("cohere", {}),  # interleaved
    "glm": ("glm", {"partial_rotary_factor": 0.5}),  # interleaved, partial
    "glm4": ("glm4", {"partial_rotary_factor": 0.5}),
    "ernie4_5": ("ernie4_5", {}),  # interleaved
    "gptj": ("gptj", {"n_embd": 64, "n_head": 4, "rotary_dim": 8, "n_positions": 256}),  # (x, sin, cos), partial
    "phi": ("phi", {"partial_rotary_factor": 0.5}),  # partial, sliced by the attention
    "stablelm": ("stablelm", {"partial_rotary_factor": 0.25}),
    "gpt_neox": ("gpt_neox", {"rotary_pct": 0.5, "partial_rotary_factor": 0.5}),  # partial inside apply
    "gemma3": ("gemma3_text", {"sliding_window": 8, "rope_parameters": GEMMA3_ROPE}),  # per-layer-type inv_freq
    "smollm3": ("smollm3", {}),  # NoPE layers (``no_rope_layers``)
    "exaone4": ("exaone4", {"sliding_window": 8, "sliding_window_pattern": 2}),  # NoPE global layers
    "gpt_oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2}),  # YaRN attention_scaling
}


#: (arch, config overrides) of one-layer models: one layer makes "the model run on the kept tokens" exact (a deeper
#: layer's keys depend on the evicted tokens through the layers below).
SHIFT_ARCHS = {
    "llama": {},  # rotate-half
    "cohere": {},  # interleaved
    "glm": {},  # interleaved + partial
    "gptj": {},  # (x, sin, cos), interleaved + partial sliced by the attention
    "phi": {},  # partial sliced by the attention
    "gemma3": {"layer_types": ["full_attention"]},  # the full layers' frequencies, not the sliding ones'
    "smollm3": {"no_rope_layers": [0]},  # a NoPE layer: no rotation
    "exaone4": {"layer_types": ["full_attention"]},  # EXAONE-4's NoPE global layer
    "gpt_oss": {"layer_types": ["full_attention"]},  # YaRN: attention_scaling folded into cos/sin; sinks
}


def arch_config(name: str, num_layers: int = 2, **overrides):
    """The tiny config of ``ARCHS[name]`` with ``num_layers`` decoder layers."""
    model_type, arch_overrides = ARCHS[name]
    kwargs = dict(BASE, num_hidden_layers=num_layers, n_layer=num_layers)
    kwargs.update(arch_overrides)
    kwargs.update(overrides)
    if model_type != "gptj":
        kwargs.pop("n_layer")
    return AutoConfig.for_model(model_type, **kwargs)


def arch_model(name: str, num_layers: int = 2, seed: int = 0, **overrides):
    """A float32 tiny random model of ``ARCHS[name]`` (weights scaled up so attention is peaked)."""
    config = arch_config(name, num_layers, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None
    return model.eval()
