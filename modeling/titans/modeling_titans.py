"""Titans for transformers: ``TitansModel`` / ``TitansForCausalLM`` (HF boilerplate; the layers are in
:mod:`hf_longmem.modeling.titans.layers`, the memory math in :mod:`hf_longmem.kernels.titans_memory`)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from hf_longmem.modeling.causal_lm import (
    MemoryModelMixin,
    can_return_tuple,
    causal_lm_logits,
    last_hidden_state_last,
    shifted_cross_entropy,
)
from hf_longmem.modeling.remote_code import RemoteCodeMixin
from hf_longmem.modeling.titans.cache import TitansCache, TitansLayerState
from hf_longmem.modeling.titans.configuration_titans import TitansConfig
from hf_longmem.modeling.titans.layers import RMSNorm, TitansBlock, gather_time

logger = logging.get_logger(__name__)


class TitansPreTrainedModel(MemoryModelMixin, RemoteCodeMixin, PreTrainedModel):
    config_class = TitansConfig
    base_model_prefix = "model"
    _no_split_modules = ["TitansBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True  # the neural memory is a recurrent state: no assisted decoding, no cache cropping
    _unsupported_features = {
        "output_attentions": (
            "Titans attends per segment (MAC: over persistent tokens, memory read-outs and the segment) or over a "
            "sliding window with persistent tokens, through one fused SDPA call: there is no [batch, heads, T, T] "
            "matrix over the input tokens to return"
        ),
    }

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear) and not getattr(module, "_titans_keep_init", False):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None and module.out_features != 3 * self.config.memory_heads:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)


class TitansModel(TitansPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` :class:`TitansBlock` and a final RMSNorm.

    Padding: tokens whose ``attention_mask`` is 0 are moved to the end of their row before the layers (and the
    hidden states moved back after), so they never enter the memory, the attention or the positions: a padded row
    gives exactly what the same row gives unpadded.
    """

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(TitansBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @staticmethod
    def _layer_from_fresh_state(layer, h, positions, lengths):
        """``layer`` from an empty state (what gradient checkpointing replays: the recompute must start from the same
        state as the forward, so the state is made inside the checkpointed function)."""
        return layer(h, positions, lengths, TitansLayerState())

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TitansCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Args: ``input_ids [batch, T]`` (or ``inputs_embeds [batch, T, hidden]``); ``attention_mask`` ``[batch, T]``
        or ``[batch, past + T]`` (1 = real token); ``cache``: a :class:`TitansCache` to continue (a new one is made
        when ``use_cache`` and none is given). ``position_ids`` is accepted for API compatibility and ignored:
        positions are counted per row from the real tokens.

        Returns ``last_hidden_state [batch, T, hidden]``, ``cache`` and, with ``output_hidden_states``, the
        ``num_hidden_layers + 1`` states ``[batch, T, hidden]`` (embeddings, each block, the last one final-normed).
        ``output_attentions`` is refused (``_unsupported_features``). Under gradient checkpointing in training each
        block is recomputed in the backward from an empty state, so no cache is used (as transformers' layers)."""
        _, output_hidden_states = self.resolve_output_flags(output_attentions, output_hidden_states)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, T, _ = h.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and (use_cache or cache is not None):
            logger.warning_once("Titans: caching is incompatible with gradient checkpointing; using no cache.")
            use_cache, cache = False, None
        if cache is not None and not isinstance(cache, TitansCache):
            raise ValueError(f"cache must be a TitansCache (or None), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = TitansCache(self.config)
        if attention_mask is None:
            valid = torch.ones(b, T, dtype=torch.bool, device=h.device)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be [batch, >= {T}], got {tuple(attention_mask.shape)}")
            valid = attention_mask[:, -T:].bool()
        order = torch.argsort((~valid).int(), dim=1, stable=True)  # real tokens first, in order
        lengths = valid.sum(1)
        h = gather_time(h, order, 1)
        start = cache.row_positions if cache is not None and cache.row_positions is not None else lengths.new_zeros(b)
        positions = start[:, None] + torch.arange(T, device=h.device)
        states = cache.layers if cache is not None else [None] * len(self.layers)

        def unsort(x: torch.Tensor) -> torch.Tensor:  # back to the input order (padding where it was)
            return torch.empty_like(x).scatter_(1, order[..., None].expand_as(x), x)

        all_hidden = [h] if output_hidden_states else None
        for layer, state in zip(self.layers, states):
            if checkpointing:
                h = self._gradient_checkpointing_func(
                    partial(self._layer_from_fresh_state, layer), h, positions, lengths
                )
            else:
                h = layer(h, positions, lengths, state if state is not None else TitansLayerState())
            if output_hidden_states:
                all_hidden.append(h)
        h = unsort(self.norm(h))
        if cache is not None:
            cache.seen_tokens += T
            cache.row_positions = start + lengths
        hidden_states = None
        if output_hidden_states:
            hidden_states = last_hidden_state_last([unsort(x) for x in all_hidden], h)
        return BaseModelOutputWithPast(
            last_hidden_state=h, cache=cache if use_cache else None, hidden_states=hidden_states
        )


class TitansForCausalLM(TitansPreTrainedModel, GenerationMixin):
    """Titans language model. ``generate`` builds a :class:`TitansCache` by default and honours a given ``cache=``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    #: ``generate`` builds our own cache (memory state + bounded KV) unless the user passed one (MemoryModelMixin)
    memory_cache_class = TitansCache

    def make_cache(self) -> TitansCache:
        """A fresh, empty :class:`TitansCache` for this model."""
        return TitansCache(self.config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TitansCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``logits [batch, T, vocab]``; ``labels`` (``-100`` ignored) give the shifted next-token loss;
        ``hidden_states`` as :meth:`TitansModel.forward`. ``return_dict=False``: ``(loss?, logits, cache?, ...)``."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = causal_lm_logits(self.lm_head, out.last_hidden_state, logits_to_keep)
        loss = shifted_cross_entropy(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
