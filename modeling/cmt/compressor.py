"""CMT's memory encoder: the frozen LM plus LoRA adapters and learned memory tokens.

A document ``x_1 .. x_T`` is followed by ``m`` learned memory-token embeddings and run through the backbone with the
compressor's LoRA adapters switched on. The memory of the document is what the frozen LM needs to attend to it later:
the memory tokens' per-layer keys and values (``[layers, 2, kv_heads, m, head_dim]``). Their keys are rotated back from
positions ``T .. T+m-1`` to ``0 .. m-1`` (RoPE rotations compose), so a memory is independent of its document's length
and can be placed anywhere in a prefix. The self-matching key is a projection of the memory tokens' mean last hidden
state; questions are encoded by the very same compressor (self-matching: question and documents are matched in the
space the compressor writes memories in).

The adapters are forward hooks on the backbone's linear layers that add ``alpha / r * B(A(x))`` while compression
runs, and nothing otherwise: the backbone's own weights and its state-dict keys never change, so the LM answers
questions exactly as the pretrained model does (the LoRA-free path is the backbone itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from hf_longmem.memory.rope import RotaryShift
from hf_longmem.modeling.cmt.cache_cmt import ReplayPrefixCache


class LoRADelta(nn.Module):
    """The low-rank update ``alpha / r * B A x`` of one linear layer (``B`` starts at zero: no change at init).

    Args:
        in_features, out_features: the adapted layer's shape.
        rank: ``r``.
        alpha: scaling numerator.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features]`` -> ``[..., out_features]``."""
        return (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scaling


class CMTCompressor(nn.Module):
    """Memory tokens, LoRA adapters and the self-matching key projection.

    Args:
        config: a :class:`CMTConfig`.
        backbone: the wrapped causal LM (hooks are attached to its ``lora_target_modules``).
    """

    def __init__(self, config, backbone: PreTrainedModel):
        super().__init__()
        bb = config.require_backbone_config()
        self.num_memory_tokens = config.num_memory_tokens
        self.memory_embeddings = nn.Parameter(torch.randn(config.num_memory_tokens, bb.hidden_size) * 0.02)
        adapters: dict[str, LoRADelta] = {}
        targets = set(config.lora_target_modules)
        self._adapted: list[tuple[str, nn.Linear]] = []
        for name, module in backbone.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                key = name.replace(".", "__")
                adapters[key] = LoRADelta(module.in_features, module.out_features, config.lora_rank, config.lora_alpha)
                self._adapted.append((key, module))
        if not adapters:
            raise ValueError(
                f"lora_target_modules {config.lora_target_modules} match no linear layer of the backbone "
                f"({type(backbone).__name__})"
            )
        self.lora = nn.ModuleDict(adapters)
        self.key_proj = nn.Linear(bb.hidden_size, config.retrieval_dim)
        self._backbone_config = bb
        self._rotary: RotaryShift | None = None  # built on first use (models are first built on the meta device)
        self._active = False
        for key, module in self._adapted:
            module.register_forward_hook(self._make_hook(key))

    @property
    def rotary(self) -> RotaryShift:
        """The backbone's RoPE, for moving memory keys between positions."""
        if self._rotary is None:
            with torch.device("cpu"):
                self._rotary = RotaryShift.from_config(self._backbone_config)
        return self._rotary

    def _make_hook(self, key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self._active:
                return None
            return output + self.lora[key](args[0])

        return hook

    @contextmanager
    def adapters_enabled(self) -> Iterator[None]:
        """Switch the LoRA adapters on for the duration of the block."""
        previous, self._active = self._active, True
        try:
            yield
        finally:
            self._active = previous

    def forward(
        self,
        backbone: PreTrainedModel,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress a batch of documents (or questions).

        Args:
            backbone: the wrapped causal LM.
            input_ids: ``[n, T]`` token ids, LEFT-padded (the memory tokens follow the last real token).
            attention_mask: ``[n, T]`` 1 on real tokens (``None``: all real).
            inputs_embeds: ``[n, T, hidden]`` in place of ``input_ids`` (the backbone's input embeddings).

        Returns:
            ``(memories, keys)``: ``[n, layers, 2, kv_heads, m, head_dim]`` memory keys/values (keys rotated to
            positions ``0 .. m-1``) and ``[n, retrieval_dim]`` self-matching keys (not normalised).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds to the compressor")
        shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:2])
        if len(shape) != 2 or shape[1] == 0 or (inputs_embeds is not None and inputs_embeds.dim() != 3):
            raise ValueError(f"input_ids must be [n, T] (inputs_embeds [n, T, hidden]) with T >= 1, got {shape}")
        n, m = shape[0], self.num_memory_tokens
        if attention_mask is None:
            attention_mask = torch.ones(
                shape, dtype=torch.long, device=(inputs_embeds if input_ids is None else input_ids).device
            )
        attention_mask = attention_mask.to(torch.long)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("input_ids must be left-padded: the last position of every row must be a real token")
        embeds = backbone.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        memory = self.memory_embeddings.to(embeds.dtype).unsqueeze(0).expand(n, -1, -1)
        inputs_embeds = torch.cat([embeds, memory], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(n, m)], dim=1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        # a replay cache: the pass's own keys/values are read from it, and the backbone's layers may be checkpointed
        cache = ReplayPrefixCache(backbone.config.num_hidden_layers)
        decoder = getattr(backbone, backbone.base_model_prefix)
        with self.adapters_enabled():
            out = decoder(
                inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
            )
        hidden = out.last_hidden_state[:, -m:]  # [n, m, hidden]
        keys = self.key_proj(hidden.mean(dim=1))
        layer_keys = torch.stack([layer.written[0][:, :, -m:] for layer in cache.layers])  # [L, n, H, m, d]
        layer_values = torch.stack([layer.written[1][:, :, -m:] for layer in cache.layers])
        num_layers, _, heads, _, head_dim = layer_keys.shape
        lengths = attention_mask.sum(-1)  # [n]: the memory tokens sat at lengths .. lengths + m - 1
        delta = (-lengths).view(1, n, 1).expand(num_layers, n, m).reshape(num_layers * n, m)
        layer_keys = self.rotary.rotate(layer_keys.reshape(num_layers * n, heads, m, head_dim), delta)
        layer_keys = layer_keys.view(num_layers, n, heads, m, head_dim)
        memories = torch.stack([layer_keys, layer_values], dim=2)  # [L, n, 2, H, m, d]
        return memories.transpose(0, 1), keys


def assemble_prefix(rotary: RotaryShift, memories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k aggregation into one KV prefix: memory ``j`` of a row takes positions ``j*m .. j*m+m-1``.

    Args:
        rotary: the backbone's RoPE (to move the canonical keys to their prefix positions).
        memories: ``[batch, k, layers, 2, kv_heads, m, head_dim]`` retrieved memories, in prefix order.

    Returns:
        ``(keys, values)``: ``[layers, batch, kv_heads, k*m, head_dim]`` each.
    """
    batch, k, layers, _, heads, m, head_dim = memories.shape
    flat = memories.permute(2, 3, 0, 4, 1, 5, 6).reshape(layers, 2, batch, heads, k * m, head_dim)
    keys, values = flat[:, 0], flat[:, 1]
    delta = (torch.arange(k, device=memories.device) * m).repeat_interleave(m)  # [k*m]
    delta = delta.view(1, -1).expand(layers * batch, -1)
    keys = rotary.rotate(keys.reshape(layers * batch, heads, k * m, head_dim), delta)
    return keys.view(layers, batch, heads, k * m, head_dim), values
