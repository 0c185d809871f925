"""LongGen (Ge et al., 2024): a Llama decoder with sparse attention in most layers and full attention in a few.

:meth:`LongGenForCausalLM.from_pretrained_base` converts a pretrained Llama-family model (same weights, no new
parameters); the length-extension fine-tune then runs at the long length (``recipes/train_longgen.py``). The sparse
layers call the attention function registered with transformers' ``AttentionInterface`` as ``"longgen_sparse"``
(:func:`longgen_sparse_attention`: Triton block-sparse kernel on CUDA, the torch mask-based reference elsewhere); the
full layers use the model's ``attn_implementation`` (SDPA or eager) unchanged. The sparse mask is a function of each
token's *position among its row's real tokens*, computed from the 2-D ``attention_mask``, so left padding and a cache
that evicted keys both keep the pattern exact.

Deviations from the official code (github.com/suyuchen/LongGen, built on Phi-3-small's block-sparse Triton kernel):

- ``block_sparse`` uses one pattern for every head (Phi-3-small's ``homo_head=True``); the heterogeneous variant, which
  shifts the vertical stride per head, is not implemented.
- LongGen's KV cache for block-sparse layers is not described in detail; ours keeps exactly the blocks a later query
  can read (the local blocks and every vertical-stride block), so a long generation still grows by
  ``1 / vertical_stride`` of its tokens in those layers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from hf_longmem.kernels.sparse_attention import naive_sparse_attention, sparse_attention
from hf_longmem.modeling.causal_lm import (
    MemoryModelMixin,
    can_return_tuple,
    causal_lm_logits,
    shifted_cross_entropy,
)
from hf_longmem.modeling.longgen.cache import LongGenCache
from hf_longmem.modeling.longgen.configuration_longgen import LongGenConfig
from hf_longmem.modeling.remote_code import RemoteCodeMixin

#: Name of the sparse attention function in transformers' ``AttentionInterface``.
SPARSE_ATTENTION_NAME = "longgen_sparse"
#: Attention kwarg carrying each new token's position among its row's real tokens ``[batch, q]`` (``-1``: pad).
POSITIONS_KWARG = "longgen_positions"
#: Model types whose checkpoints are LlamaForCausalLM-shaped and compute what Llama computes.
LLAMA_FAMILY = ("llama", "longgen", "mistral")


def longgen_sparse_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    longgen_query_positions: torch.Tensor | None = None,
    longgen_key_positions: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sparse layers' attention (registered as ``"longgen_sparse"``).

    query ``[b, Hq, q, d]``, key/value ``[b, Hkv, n, d]``; the mask comes from the positions (``attention_mask`` is
    not read). Returns ``([b, q, Hq, dv], weights [b, Hq, q, n] under eager attention, else None)``.
    """
    if longgen_query_positions is None or longgen_key_positions is None:
        raise ValueError("longgen_sparse attention needs longgen_query_positions and longgen_key_positions")
    if dropout:
        raise ValueError("attention_dropout is not supported by LongGen's sparse layers (set it to 0)")
    config = module.config
    pattern = config.sparse_pattern()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if config._attn_implementation == "eager":  # eager returns the weights, as transformers' eager attention does
        out, _, weights = naive_sparse_attention(
            query, key, value, longgen_query_positions, longgen_key_positions, scaling, pattern
        )
        return out.transpose(1, 2).contiguous(), weights.to(query.dtype)
    out, _ = sparse_attention(
        query, key, value, longgen_query_positions, longgen_key_positions, scaling, pattern, config.sparse_backend
    )
    return out.transpose(1, 2).contiguous(), None


def register_sparse_attention() -> None:
    """Registers :func:`longgen_sparse_attention` with ``AttentionInterface`` (idempotent)."""
    AttentionInterface.register(SPARSE_ATTENTION_NAME, longgen_sparse_attention)


register_sparse_attention()


class LongGenAttention(LlamaAttention):
    """Llama attention; in a sparse layer the keys are those the layer's cache holds, masked by the sparse pattern."""

    def __init__(self, config: LongGenConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_full = config.is_full_layer(layer_idx)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        positions = kwargs.pop(POSITIONS_KWARG, None)
        if self.is_full:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        if positions is None:
            raise ValueError(f"LongGen's sparse layers need `{POSITIONS_KWARG}` (LongGenModel.forward passes them)")
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key_positions = positions
        if cache is not None:
            key, value, key_positions = cache.sparse_update(key, value, positions, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS[SPARSE_ATTENTION_NAME]
        out, weights = attention(
            self,
            query,
            key,
            value,
            None,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            longgen_query_positions=positions,
            longgen_key_positions=key_positions,
        )
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights


def real_positions(
    attention_mask: torch.Tensor | None, past: int, length: int, batch: int, device: torch.device
) -> torch.Tensor:
    """``[batch, length]`` positions of the new tokens among their row's real tokens (``-1`` for pads).

    ``attention_mask`` is the 2-D ``[batch, past + length]`` mask of every token seen so far (what ``generate``
    passes), or ``None`` (no padding).
    """
    if attention_mask is None:
        return torch.arange(past, past + length, device=device).expand(batch, length)
    if attention_mask.dim() != 2:
        raise ValueError(
            f"LongGen needs a 2-D attention_mask [batch, seen + new tokens], got {attention_mask.dim()}-D: "
            "the sparse layers derive token positions from it"
        )
    if attention_mask.shape != (batch, past + length):
        raise ValueError(
            f"attention_mask must cover every token seen so far: [batch, {past} + {length}], "
            f"got {tuple(attention_mask.shape)}"
        )
    real = attention_mask[:, -length:] != 0
    counts = (attention_mask != 0).long().cumsum(-1)[:, -length:] - 1
    return counts.masked_fill(~real, -1)


class LongGenPreTrainedModel(MemoryModelMixin, RemoteCodeMixin, LlamaPreTrainedModel):
    config_class = LongGenConfig
    _is_stateful = True  # sparse layers evict tokens: no cache cropping, no assisted decoding
    _supports_flash_attn = False  # full layers' varlen paths are untested with LongGen's cache
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _unsupported_features = {}


class LongGenModel(LongGenPreTrainedModel, LlamaModel):
    """The decoder (``AutoModel`` class of ``model_type="longgen"``): Llama layers with :class:`LongGenAttention`."""

    def __init__(self, config: LongGenConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers = []
        for layer_idx in range(config.num_hidden_layers):
            layer = LlamaDecoderLayer(config, layer_idx)
            layer.self_attn = LongGenAttention(config, layer_idx)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """As ``LlamaModel.forward``; builds a :class:`LongGenCache` when a cache is wanted and none is given, and
        passes each token's position among its row's real tokens to the sparse layers."""
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if cache is not None and not isinstance(cache, LongGenCache):
            raise ValueError(
                f"LongGen needs its own LongGenCache (sparse layers store only what they can read), got "
                f"{type(cache).__name__}: pass cache=LongGenCache(model.config) or none"
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        output_attentions = kwargs.get("output_attentions")
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions needs attn_implementation='eager' (the model runs "
                f"{self.config._attn_implementation!r}, which computes no attention weights): "
                "call model.set_attn_implementation('eager')"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = LongGenCache(self.config)
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        kwargs[POSITIONS_KWARG] = real_positions(attention_mask, past, length, batch, reference.device)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )


class LongGenForCausalLM(LongGenPreTrainedModel, LlamaForCausalLM):
    """LongGen language model (``AutoModelForCausalLM`` class of ``model_type="longgen"``). ``generate`` builds a
    :class:`LongGenCache` by default and honours a given ``cache=``."""

    def __init__(self, config: LongGenConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LongGenModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    memory_cache_class = LongGenCache  # generate builds make_cache() by default and honours a user-supplied one

    def make_cache(self) -> LongGenCache:
        """A fresh, empty :class:`LongGenCache` (what ``generate`` uses when no cache is passed)."""
        return LongGenCache(self.config)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``logits [batch, T, vocab]``; ``labels`` (``-100`` ignored) give the shifted next-token loss;
        ``return_dict=False`` (or ``config.return_dict=False``): ``(loss?, logits, cache?, ...)``."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = causal_lm_logits(self.lm_head, out.last_hidden_state, logits_to_keep)
        loss = shifted_cross_entropy(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    @classmethod
    def from_pretrained_base(
        cls,
        model_or_path: PreTrainedModel | str,
        full_layers: list[int] | None = None,
        sparse: str = "sink_window",
        sink_size: int = 4,
        window: int = 256,
        block_size: int = 64,
        local_blocks: int = 4,
        vertical_stride: int = 8,
        **config_kwargs,
    ) -> LongGenForCausalLM:
        """Convert a pretrained Llama-family causal LM (a model, a local path or a repo id) into LongGen.

        The weights are copied unchanged (LongGen adds no parameters); ``full_layers`` keep full attention and every
        other layer gets the ``sparse`` pattern (see :class:`LongGenConfig`). Before the length-extension fine-tune
        the converted model answers what the base model answers wherever the sparse layers see every key they need.

        Example::

            model = LongGenForCausalLM.from_pretrained_base("path/to/llama", full_layers=[1, 2], window=256)
        """
        if isinstance(model_or_path, str):
            model_or_path = AutoModelForCausalLM.from_pretrained(model_or_path)
        if not isinstance(model_or_path, PreTrainedModel):
            raise ValueError(f"model_or_path must be a PreTrainedModel or a path, got {type(model_or_path).__name__}")
        base = model_or_path
        fields = base.config.to_dict()
        model_type = fields.pop("model_type", None)
        if model_type not in LLAMA_FAMILY:
            raise ValueError(
                f"unsupported model: LongGen converts Llama-family models {LLAMA_FAMILY}, got model_type={model_type!r}"
            )
        if fields.get("sliding_window") is not None:
            raise ValueError("unsupported model: the base model uses sliding-window attention, which Llama lacks")
        for name in ("architectures", "auto_map", "transformers_version", "hf_longmem_version", "_name_or_path"):
            fields.pop(name, None)
        fields.update(
            full_layers=full_layers,
            sparse=sparse,
            sink_size=sink_size,
            window=window,
            block_size=block_size,
            local_blocks=local_blocks,
            vertical_stride=vertical_stride,
        )
        fields.update(config_kwargs)
        config = LongGenConfig(**fields)
        model = cls(config)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        missing = [name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings]
        if missing or unexpected:
            raise ValueError(
                f"unsupported model: its weights are not Llama-shaped (missing {missing}, unexpected {unexpected})"
            )
        parameter = next(base.parameters())
        model.set_attn_implementation(base.config._attn_implementation or "sdpa")
        return model.to(dtype=parameter.dtype, device=parameter.device).eval()
