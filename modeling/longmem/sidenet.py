"""LongMem's residual SideNet: decoder layers mirroring the backbone's, one of them memory-augmented.

Layer ``l`` of the SideNet computes (official ``TransformerDecoderSideNetLayer``)::

    x_{l+1} = x_l + Attn_l(x_l) + MLP_l(x_l) + (h_{r(l+1)} - h_{rl})        # cross-network residual

with ``h_i`` the backbone's hidden state after ``i`` layers (``h_0``: its embeddings, also the SideNet's input).
Deviation: the official layer is a parallel (GPT-J/PaLM style) block; ours is sequential like the Llama-family layers
it is copied from (``a = x + o(attn(norm1 x))``, ``y = a + down(mlp(norm2 a))``), so that a copied layer computes what
the backbone layer computed.

The memory layer's attention is LongMem's joint attention (official ``JointMultiheadAttentionWeightedSum``)::

    H = sigmoid(g) * softmax(q K_mem^T / sqrt(d)) V_mem + (1 - sigmoid(g)) * softmax(q K_loc^T / sqrt(d) + mask) V_loc

one softmax over the retrieved memory tokens of each query, one over the local segment, a gate per head. The local
part uses RoPE at segment-local positions; memory keys are stored before RoPE and the memory part uses the un-rotated
query (the official memory part has no positional term either: ALiBi is added to the local scores only). Where a query
retrieved nothing (empty bank) the output is the local attention alone, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hf_longmem.memory.memory_bank import ChunkMemoryBank


class SideNetRMSNorm(nn.Module):
    """Llama RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)`` computed in float32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def joint_memory_attention(
    query: torch.Tensor,
    local_output: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    memory_mask: torch.Tensor,
    gate_logits: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Blend local attention with attention over retrieved memory tokens, per head (LongMem's joint attention).

    Args:
        query: ``[b, Hq, T, d]`` un-rotated queries.
        local_output: ``[b, Hq, T, dv]`` attention output over the local segment.
        memory_keys: ``[b, Hq, T, M, d]`` retrieved keys per query (``M = topk_chunks * chunk_size``).
        memory_values: ``[b, Hq, T, M, dv]``.
        memory_mask: ``[b, Hq, T, M]`` bool, real retrieved tokens.
        gate_logits: ``[Hq]`` gate logits ``g``.
        scale: score scale (``d ** -0.5``).

    Returns:
        ``[b, Hq, T, dv]``: ``sigmoid(g) * memory + (1 - sigmoid(g)) * local`` where a query retrieved a token, else
        ``local``.
    """
    scores = torch.einsum("bhtd,bhtmd->bhtm", query.float(), memory_keys.float()) * scale
    scores = scores.masked_fill(~memory_mask, float("-inf"))
    found = memory_mask.any(dim=-1, keepdim=True)  # [b, Hq, T, 1]
    probs = torch.softmax(scores.masked_fill(~found, 0.0), dim=-1).masked_fill(~memory_mask, 0.0)
    memory_output = torch.einsum("bhtm,bhtmd->bhtd", probs, memory_values.float())
    gate = torch.sigmoid(gate_logits.float())[None, :, None, None]
    blended = gate * memory_output + (1 - gate) * local_output.float()
    return torch.where(found, blended, local_output.float()).to(local_output.dtype)


class SideNetAttention(nn.Module):
    """GQA self-attention with RoPE over the local segment (KV cache of the segment), optionally memory-augmented.

    Projections mirror the backbone layer (``q/k/v/o_proj`` with the same shapes and biases).
    """

    def __init__(self, config, source_attention: nn.Module, memory: bool, gate_init: float):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            source = getattr(source_attention, name)
            setattr(self, name, nn.Linear(source.in_features, source.out_features, bias=source.bias is not None))
        self.memory = memory
        if memory:
            self.memory_gate = nn.Parameter(torch.full((self.num_heads,), float(gate_init)))

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        local_mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        bank: ChunkMemoryBank | None,
        topk_chunks: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [b, T, D]`` -> ``(output [b, T, D], (keys, values) [b, Hkv, past + T, d] of the segment so far)``.

        ``local_mask``: ``[b, 1, T, past + T]`` bool, True where a query may attend.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        if past is not None:
            k_rot = torch.cat((past[0], k_rot), dim=2)
            v = torch.cat((past[1], v), dim=2)
        groups = self.num_heads // self.num_kv_heads
        local = F.scaled_dot_product_attention(
            q_rot, k_rot.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), attn_mask=local_mask
        )
        if self.memory and bank is not None and not bank.is_empty():
            mem_k, mem_v, mem_mask = bank.retrieve(q, topk_chunks)
            local = joint_memory_attention(q, local, mem_k, mem_v, mem_mask, self.memory_gate, self.scale)
        out = self.o_proj(local.transpose(1, 2).reshape(b, t, -1))
        return out, (k_rot, v)


class SideNetMLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))`` mirroring the backbone layer's."""

    def __init__(self, config, source_mlp: nn.Module):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            source = getattr(source_mlp, name)
            setattr(self, name, nn.Linear(source.in_features, source.out_features, bias=source.bias is not None))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SideNetLayer(nn.Module):
    """One SideNet decoder layer; returns its update ``Attn + MLP`` (the caller adds ``x`` and the cross residual)."""

    def __init__(self, config, source_layer: nn.Module, memory: bool, gate_init: float):
        super().__init__()
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.input_layernorm = SideNetRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = SideNetRMSNorm(config.hidden_size, eps)
        self.self_attn = SideNetAttention(config, source_layer.self_attn, memory, gate_init)
        self.mlp = SideNetMLP(config, source_layer.mlp)

    def forward(self, x, position_embeddings, local_mask, past, bank, topk_chunks):
        attn, present = self.self_attn(
            self.input_layernorm(x), position_embeddings, local_mask, past, bank, topk_chunks
        )
        mid = x + attn
        update = attn + self.mlp(self.post_attention_layernorm(mid))
        return update, present


def check_supported_backbone(backbone) -> None:
    """``ValueError`` naming ``backbone`` unless its decoder layers have the Llama-family structure we mirror."""
    layers = getattr(getattr(backbone, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(
            f"backbone {type(backbone).__name__} is not a Llama-family decoder (Llama, Mistral, Qwen2 shapes): "
            "it has no decoder layers at backbone.model.layers"
        )
    layer = layers[0]
    needed = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    )
    missing = [name for name in needed if not _has(layer, name)]
    extra = [name for name in ("self_attn.q_norm", "self_attn.k_norm") if _has(layer, name)]
    if missing or extra:
        raise ValueError(
            f"backbone {type(backbone).__name__} is not a Llama-family decoder (Llama, Mistral, Qwen2 shapes): "
            f"missing {missing}, unsupported {extra}"
        )


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
