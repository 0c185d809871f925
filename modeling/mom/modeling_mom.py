"""MoM (Mixture-of-Memories) language model for transformers: ``MomModel`` / ``MomForCausalLM``.

Each block is ``x + MomMixer(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))`` (fla's MoM block). The memory math lives in
``hf_longmem.modeling.mom.layer`` and ``hf_longmem.kernels.gated_delta``; this file is the Hugging Face boilerplate.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from hf_longmem.modeling.causal_lm import MemoryModelMixin, can_return_tuple, causal_lm_logits, shifted_cross_entropy
from hf_longmem.modeling.mom.cache import MomCache
from hf_longmem.modeling.mom.configuration_mom import MomConfig
from hf_longmem.modeling.mom.layer import MomMixer
from hf_longmem.modeling.mom.router import load_balancing_loss
from hf_longmem.modeling.remote_code import RemoteCodeMixin


class MomRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class MomMLP(nn.Module):
    def __init__(self, config: MomConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MomBlock(GradientCheckpointingLayer):
    def __init__(self, config: MomConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = MomRMSNorm(config.hidden_size, config.norm_eps)
        self.attn = MomMixer(config, layer_idx)
        self.mlp_norm = MomRMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MomMLP(config)

    def forward(self, hidden_states, valid=None, cache=None):
        mixed, router_logits = self.attn(self.attn_norm(hidden_states), valid=valid, cache=cache)
        hidden_states = hidden_states + mixed
        hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, router_logits


class MomPreTrainedModel(MemoryModelMixin, RemoteCodeMixin, PreTrainedModel):
    config_class = MomConfig
    config: MomConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MomBlock"]
    _is_stateful = True
    _unsupported_features = {
        "output_attentions": (
            "MoM has no softmax attention: its token mixers are gated delta-rule memories (linear recurrences), "
            "so there are no attention weights to return"
        ),
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MomMixer):
            std = self.config.initializer_range
            init.normal_(module.memory_proj, mean=0.0, std=std)
            init.copy_(module.A_log, torch.empty(module.num_heads).uniform_(1.0, 16.0).log())
            dt = torch.exp(
                torch.rand(module.num_heads) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(0.001)))
                + torch.log(torch.tensor(0.001))
            ).clamp_min(1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            bound = module.conv_size**-0.5
            init.uniform_(module.conv_weight, -bound, bound)
            init.ones_(module.o_norm_weight)
        elif isinstance(module, MomRMSNorm):
            init.ones_(module.weight)


def _valid_tokens(attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor | None:
    """``[batch, seq]`` bool for the current tokens from a 2-D ``[batch, past + seq]`` padding mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(
            "`attention_mask` must be a 2-D [batch, seq] padding mask (1 = token, 0 = pad) for MoM; got "
            f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}"
        )
    if attention_mask.shape[1] < seq:
        raise ValueError(f"`attention_mask` covers {attention_mask.shape[1]} tokens, the input has {seq}")
    valid = attention_mask[:, -seq:].bool()
    return None if bool(valid.all()) else valid


class MomModel(MomPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` MoM blocks, final RMSNorm."""

    def __init__(self, config: MomConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([MomBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MomRMSNorm(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        """``position_ids`` is accepted and ignored: MoM has no positional encoding (order lives in the states).

        Returns ``last_hidden_state [batch, T, hidden]``, ``cache``, ``router_logits`` (per layer) and, with
        ``output_hidden_states``, ``num_hidden_layers + 1`` states ``[batch, T, hidden]`` (the last final-normed).
        ``output_attentions`` is refused (``_unsupported_features``: no softmax attention).
        """
        _, output_hidden_states = self.resolve_output_flags(output_attentions, output_hidden_states)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.gradient_checkpointing:
            use_cache = False
        if use_cache and cache is None:
            cache = MomCache(self.config)
        valid = _valid_tokens(attention_mask, inputs_embeds.shape[1])
        hidden_states = inputs_embeds
        all_hidden = (hidden_states,) if output_hidden_states else None
        router_logits = []
        for layer in self.layers:
            hidden_states, logits = layer(hidden_states, valid, cache)
            router_logits.append(logits)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)
        if cache is not None and hasattr(cache, "advance"):
            cache.advance(inputs_embeds.shape[1])
        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache or cache is not None else None,
            hidden_states=all_hidden,
            router_logits=tuple(router_logits),
        )


class MomForCausalLM(MomPreTrainedModel, GenerationMixin):
    """MoM language model with an LM head, the load-balancing aux loss, and a ``MomCache`` built by ``generate``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MomConfig):
        super().__init__(config)
        self.model = MomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """``generate`` without ``cache=`` builds a :class:`MomCache`; a user-supplied cache is used as given."""
        if (
            model_kwargs.get("cache") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")
        ):
            model_kwargs["cache"] = MomCache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Causal LM forward.

        ``aux_loss`` (with ``labels`` or in training mode) is the load-balancing loss already times
        ``aux_loss_scale``; with ``labels``, ``loss = next-token CE + aux_loss``.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        logits = causal_lm_logits(self.lm_head, hidden, logits_to_keep)
        loss = aux_loss = None
        if labels is not None or self.training:
            valid = _valid_tokens(attention_mask, hidden.shape[1])
            balance = load_balancing_loss(outputs.router_logits, self.config.topk, valid)
            aux_loss = self.config.aux_loss_scale * balance
        if labels is not None:
            loss = shifted_cross_entropy(logits, labels) + aux_loss
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
        )


__all__ = ["MomForCausalLM", "MomModel", "MomPreTrainedModel"]
