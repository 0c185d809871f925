"""Tiny random causal LMs of the shapes users run: Llama (MHA and GQA), Mistral, Qwen2."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

VOCAB = 97

#: Sizes of a tiny decoder built from any transformers config (GQA: 4 query heads over 2 KV heads of width 16); the
#: helpers that build other architectures start from these and set ``intermediate_size`` themselves.
TINY_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

MODEL_SHAPES = {
    "llama_mha": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": (Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
}


def tiny_config(shape: str, attn_impl: str = "sdpa", **overrides):
    config_cls, shape_kwargs = MODEL_SHAPES[shape]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(shape_kwargs)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config._attn_implementation = attn_impl
    return config


def tiny_model(shape: str = "llama_gqa", attn_impl: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(shape, attn_impl, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_impl, dtype=torch.float32)
    # Larger-than-default init so attention is peaked and greedy decoding is sensitive to every kept token.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None  # fixed-length generations compare step by step
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
