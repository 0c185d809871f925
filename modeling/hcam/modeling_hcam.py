"""HCAM as transformers models: ``HCAMModel`` (backbone + HCAM branches) and ``HCAMForCausalLM``.

Forward pass over an input of any length:

1. the input is cut at multiples of ``segment_length`` of the sequence position (a segment may span several calls);
2. for each piece the backbone runs with the current segment's KV cache only, at segment-local positions;
3. at each memory layer ``l`` a forward hook adds ``tanh(g_l) * HCAM_l(x)`` to the layer's output, where
   ``x = rms(h_l)`` is the layer's input normalised without a learned weight, and HCAM reads the chunks of earlier
   ``x`` of that layer (:mod:`hf_longmem.modeling.hcam.memory` says which; :mod:`hf_longmem.modeling.hcam.attention`
   computes the attention). The hook finds the piece's state in a keyword argument the backbone passes down to its
   decoder layers, so a gradient-checkpointing recompute sees the same state;
4. after the piece, each layer's ``x`` goes into that layer's chunk store (:class:`HCAMCache`).

Deviations from the paper and the official ``htm_attention.py`` (reasons in ``docs/hcam.md``):

- the memory holds the layer's inputs normalised by their RMS (no learned weight); officially the raw layer inputs
  (the agent's layer-normed transformer keeps them on one scale; a pre-norm LM's residual stream grows with depth);
- a query that sees fewer than ``k`` chunks gives weight 0 to the missing ones and the branch adds 0 when it sees
  none (officially masked logits are ``-1e6``, so with no visible chunk the weights are uniform over masked chunks);
- the branch enters the residual stream through a zero-initialised ``tanh`` gate, parallel to its decoder layer, so a
  pretrained backbone is unchanged until the branch is trained (the agent is trained from scratch);
- the backbone attends locally within segments of ``segment_length`` tokens (the agent's TrXL memory is a window of
  recent steps).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from hf_longmem.modeling.backbone import (
    BackboneEmbeddingsMixin,
    BackboneWrapperMixin,
    build_backbone,
    freeze_backbone,
)
from hf_longmem.modeling.causal_lm import (
    MemoryModelMixin,
    can_return_tuple,
    causal_lm_logits,
    last_hidden_state_last,
    shifted_cross_entropy,
)
from hf_longmem.modeling.hcam.attention import HCAMBranch, rms_normalize
from hf_longmem.modeling.hcam.cache import HCAMCache
from hf_longmem.modeling.hcam.configuration_hcam import HCAMConfig
from hf_longmem.modeling.hcam.memory import read_set, visible_chunks
from hf_longmem.modeling.padding import left_padding, scatter_rows
from hf_longmem.modeling.remote_code import RemoteCodeMixin

#: Keyword argument carrying a piece's :class:`_PieceState` from the backbone's forward to its decoder layers.
STATE_KWARG = "hcam_state"


class _PieceState:
    """What the HCAM branches of one backbone call read (the cache, the mask and query positions) and what they leave
    for the store (each memory layer's normalised inputs)."""

    def __init__(self, model: HCAMModel, cache: HCAMCache, mask: torch.Tensor, positions: torch.Tensor):
        self.model, self.cache, self.mask, self.positions = model, cache, mask, positions
        self.inputs: dict[int, torch.Tensor] = {}

    def update(self, index: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """The gated branch output ``[b, T, D]`` of memory layer ``index`` for its input ``hidden``, or ``None`` while
        no query can read a chunk."""
        config = self.model.config
        x = rms_normalize(hidden, getattr(config.backbone_config, "rms_norm_eps", 1e-6))
        self.inputs[index] = x.detach()  # the memory is a constant (stop-gradient, as officially)
        memory = read_set(self.cache.stores[index], self.inputs[index], self.mask, self.cache.summaries[index])
        if memory is None:
            return None
        contents, summaries, chunk_index = memory
        visible = visible_chunks(chunk_index, self.positions, config.chunk_size, config.max_chunks)
        if not bool(visible.any()):
            return None
        branch = self.model.branches[index]
        return branch.gated(branch(x, contents, summaries, visible))


def _branch_hook(index: int, module: nn.Module, args, kwargs, output):
    """Forward hook of memory layer ``index``: adds the HCAM branch to the layer's output (only in HCAM's calls)."""
    state = kwargs.get(STATE_KWARG)
    if state is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    update = state.update(index, hidden)
    if update is None:
        return None
    if isinstance(output, tuple):
        return (output[0] + update, *output[1:])
    return output + update


@contextmanager
def _capture_layer_outputs(layers):
    """Collect every decoder layer's output (after the HCAM branch) during a forward."""
    states: list[torch.Tensor] = []

    def keep(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield states
    finally:
        for hook in hooks:
            hook.remove()


def check_supported_backbone(backbone: PreTrainedModel) -> None:
    """``ValueError`` unless ``backbone`` has its decoder layers at ``backbone.model.layers`` (Llama-family layout)."""
    layers = getattr(getattr(backbone, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"backbone {type(backbone).__name__} is not a Llama-family decoder (Llama, Mistral, Qwen2 shapes): it has "
            "no decoder layers at backbone.model.layers"
        )


class HCAMPreTrainedModel(MemoryModelMixin, RemoteCodeMixin, PreTrainedModel):
    config_class = HCAMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # the backbone's decoder layers; such a forward runs without a cache
    _supports_sdpa = True
    _is_stateful = True  # the chunk stores cannot be cropped (no assisted decoding)
    _unsupported_features = {
        "output_attentions": (
            "the backbone attends per segment and each HCAM branch attends over the summaries of its layer's memory "
            "chunks and within k chosen chunks per query: there is no single [batch, heads, T, T] matrix"
        ),
    }

    def _init_weights(self, module):
        if isinstance(module, HCAMBranch):
            module.reset_parameters()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then the backbone frozen again when ``config.freeze_backbone`` (loading
        resets ``requires_grad``); returns ``(model, loading_info)`` with ``output_loading_info=True``."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.freeze_backbone:
            freeze_backbone(model.backbone)
        return loaded


class HCAMModel(BackboneEmbeddingsMixin, HCAMPreTrainedModel):
    """The backbone with HCAM branches at ``config.memory_layers``; returns the backbone's final-normed features.

    Attributes:
        backbone: the wrapped causal LM (its ``lm_head`` is used by :class:`HCAMForCausalLM`).
        branches: one :class:`~hf_longmem.modeling.hcam.attention.HCAMBranch` per memory layer.
    """

    def __init__(self, config: HCAMConfig):
        super().__init__(config)
        self.backbone = build_backbone(config)
        check_supported_backbone(self.backbone)
        hidden = config.backbone_config.hidden_size
        self.branches = nn.ModuleList(
            HCAMBranch(
                hidden,
                config.memory_hidden_size,
                config.num_memory_heads,
                config.topk_chunks,
                config.memory_position_encoding,
                config.gate_init,
                config.init_scale,
            )
            for _ in config.memory_layers
        )
        layers = self.backbone.model.layers
        for index, layer_index in enumerate(config.memory_layers):
            layers[layer_index].register_forward_hook(partial(_branch_hook, index), with_kwargs=True)
        self.post_init()
        if config.freeze_backbone:
            freeze_backbone(self.backbone)

    @torch.no_grad()
    def init_branches_from_backbone(self) -> None:
        """``branch_init="attention"``: each branch starts from its decoder layer's attention projections (see
        :meth:`HCAMBranch.init_from_attention`); ``"random"``: nothing to do."""
        if self.config.branch_init != "attention":
            return
        layers = self.backbone.model.layers
        for branch, layer_index in zip(self.branches, self.config.memory_layers):
            layer = layers[layer_index]
            norm = getattr(layer, "input_layernorm", None)
            if getattr(layer, "self_attn", None) is None or getattr(norm, "weight", None) is None:
                raise ValueError(
                    "branch_init='attention' needs Llama-family decoder layers (self_attn with q/k/v/o_proj and an "
                    "input_layernorm with a weight)"
                )
            branch.init_from_attention(layer.self_attn, norm.weight)

    def make_cache(self) -> HCAMCache:
        """A fresh, empty :class:`HCAMCache`."""
        return HCAMCache(self.config)

    def _checkpointing(self) -> bool:
        """Whether the backbone's layers are being gradient-checkpointed in this forward."""
        return (
            self.training
            and torch.is_grad_enabled()
            and any(getattr(layer, "gradient_checkpointing", False) for layer in self.backbone.model.layers)
        )

    def _forward_piece(self, input_ids, inputs_embeds, mask, cache: HCAMCache, checkpointing: bool, keep_states):
        """One piece within a segment: ``(last_hidden [b, T, D], states or None)``; the cache advances."""
        if inputs_embeds is None:
            inputs_embeds = self.backbone.get_input_embeddings()(input_ids)
        b, t = mask.shape
        fill = cache.segment_fill
        segment_mask = mask if fill == 0 else torch.cat((cache.segment_mask.to(mask.device), mask), dim=1)
        attention_mask = None if bool(segment_mask.all()) else segment_mask.long()
        positions = torch.arange(fill, fill + t, device=mask.device)[None].expand(b, t)
        state = _PieceState(self, cache, mask, cache.query_positions(mask))
        layers = self.backbone.model.layers
        with _capture_layer_outputs(layers) if keep_states else nullcontext() as states:
            out = self.backbone.model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=positions,
                cache=None if checkpointing else cache.backbone_cache,
                use_cache=not checkpointing,
                **{STATE_KWARG: state},
            )
        if len(state.inputs) != len(self.branches):
            raise ValueError(
                f"unsupported backbone {type(self.backbone).__name__}: its model does not pass keyword arguments down "
                "to its decoder layers, where the HCAM branches read their state"
            )
        for index in range(len(cache.stores)):
            cache.write(index, state.inputs[index], mask)
        cache.advance(mask)
        states = [inputs_embeds, *states] if keep_states else None
        return out.last_hidden_state, states

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HCAMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Features of ``input_ids`` ``[b, T]`` (any ``T``; segmented internally).

        Args:
            input_ids: ``[b, T]`` token ids (or ``inputs_embeds`` ``[b, T, D]``).
            attention_mask: ``[b, T]`` or ``[b, past + T]`` (its last ``T`` columns are used), 1 for real tokens;
                left padding (``generate``'s) or right padding (training batches).
            position_ids: ignored: positions are segment-local.
            cache: an :class:`HCAMCache` to continue from (and update); ``None``: a fresh one.
            use_cache: return the cache (default ``config.use_cache``; off while gradient checkpointing).
            output_hidden_states: also return the embeddings and every decoder layer's output (HCAM branch included),
                the last one final-normed (``num_hidden_layers + 1`` tensors ``[b, T, D]``).
            output_attentions: refused (``_unsupported_features``).

        Returns:
            ``last_hidden_state`` ``[b, T, D]`` (after the backbone's final norm), ``cache`` and ``hidden_states``.
        """
        _, output_hidden_states = self.resolve_output_flags(output_attentions, output_hidden_states)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        if length == 0:
            raise ValueError("input_ids must hold at least one token")
        checkpointing = self._checkpointing()
        if checkpointing and cache is not None and cache.get_seq_length():
            raise ValueError(
                "gradient checkpointing runs each segment without the backbone's KV cache: start from an empty cache "
                "(or none) and give the whole sequence in one call"
            )
        if cache is None:
            cache = self.make_cache()
        elif not isinstance(cache, HCAMCache):
            raise ValueError(f"cache must be an HCAMCache (model.make_cache()), got {type(cache).__name__}")
        elif cache.missing_segment_kv:
            raise ValueError(
                "this HCAMCache was filled under gradient checkpointing, which runs without the backbone's KV cache: "
                "its last segment cannot be continued; start from a new cache (model.make_cache())"
            )
        if attention_mask is not None and (
            attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length
        ):
            raise ValueError(f"attention_mask must be [b, past + T] 2D, got {tuple(attention_mask.shape)}")
        if cache.batch_size not in (-1, batch):
            raise ValueError(f"cache holds batch {cache.batch_size}, input has batch {batch}")
        use_cache = (self.config.use_cache if use_cache is None else use_cache) and not checkpointing
        pads = left_padding(attention_mask, length, cache.seen_tokens, cache.group_padding())
        if pads is not None:
            return self._forward_row_groups(input_ids, inputs_embeds, pads, cache, use_cache, output_hidden_states)
        if attention_mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=reference.device)
        else:  # no padding, or right padding (trailing pads never enter the memory)
            mask = attention_mask[:, -length:].bool()
        hidden, states, start = [], [], 0
        while start < length:
            stop = min(length, start + self.config.segment_length - cache.segment_fill)
            piece_ids = input_ids[:, start:stop] if input_ids is not None else None
            piece_embeds = inputs_embeds[:, start:stop] if inputs_embeds is not None else None
            last, piece_states = self._forward_piece(
                piece_ids, piece_embeds, mask[:, start:stop], cache, checkpointing, output_hidden_states
            )
            hidden.append(last)
            states.append(piece_states)
            start = stop
        if checkpointing and cache.segment_fill:
            cache.missing_segment_kv = True  # the unfinished segment's backbone keys/values were not kept
        hidden = torch.cat(hidden, dim=1)
        all_states = None
        if output_hidden_states:
            all_states = last_hidden_state_last([torch.cat(layer, dim=1) for layer in zip(*states)], hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, cache=cache if use_cache else None, hidden_states=all_states
        )

    def _forward_row_groups(self, input_ids, inputs_embeds, pads, cache, use_cache, output_hidden_states):
        """A left-padded batch (``pads [b]`` padding tokens per row): each group of rows with the same padding runs as
        an unpadded batch of its real tokens with its own cache (:mod:`hf_longmem.modeling.padding`), so every row is
        segmented and chunked from its first real token, exactly as alone. Outputs at padding positions are zeros."""
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        seen = cache.seen_tokens
        if cache.row_groups is None:
            cache.make_row_groups(pads, lambda rows: HCAMCache(self.config, offload=cache.offload))
        hidden = states = None
        for rows, pad, group in cache.row_groups:
            skip = min(length, max(0, pad - seen))  # padding columns of this call for these rows
            if skip == length:
                continue
            rows = rows.to(reference.device)
            out = self(
                input_ids=None if input_ids is None else input_ids[rows, skip:],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[rows, skip:],
                cache=group,
                use_cache=True,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            hidden = scatter_rows(hidden, rows, skip, out.last_hidden_state, (batch, length))
            if output_hidden_states:
                states = [
                    scatter_rows(None if states is None else states[layer], rows, skip, part, (batch, length))
                    for layer, part in enumerate(out.hidden_states)
                ]
        cache.seen_tokens += length
        if hidden is None:  # only padding in this call
            width = self.config.backbone_config.hidden_size
            hidden = self.backbone.get_input_embeddings().weight.new_zeros(batch, length, width)
            layers = self.config.backbone_config.num_hidden_layers
            states = [hidden.clone() for _ in range(layers + 1)] if output_hidden_states else None
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            cache=cache if use_cache else None,
            hidden_states=tuple(states) if states else None,
        )


class HCAMForCausalLM(BackboneWrapperMixin, HCAMPreTrainedModel, GenerationMixin):
    """HCAM language model: :class:`HCAMModel` + the backbone's ``lm_head``.

    Build one around a pretrained backbone with :meth:`from_backbone` (copies its weights; the branches start with a
    zero gate, so the model computes what the backbone computes on each segment), then train the branches (the
    backbone is frozen by ``config.freeze_backbone``).
    """

    def __init__(self, config: HCAMConfig):
        super().__init__(config)
        self.model = HCAMModel(config)
        self.post_init()

    @property
    def backbone(self):
        return self.model.backbone

    @classmethod
    def from_backbone(cls, backbone, **config_kwargs):
        """Wrap ``backbone`` (a model, path or repo id); with ``branch_init="attention"`` the branches start from
        their layers' attention."""
        model = super().from_backbone(backbone, **config_kwargs)
        model.model.init_branches_from_backbone()
        return model

    memory_cache_class = HCAMCache

    def make_cache(self) -> HCAMCache:
        """A fresh, empty :class:`HCAMCache` (what ``generate`` uses when no cache is passed)."""
        return self.model.make_cache()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HCAMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``[b, T, V]`` (see :meth:`HCAMModel.forward`); ``labels`` ``[b, T]`` (``-100`` ignored) give the
        shifted next-token loss."""
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
        logits = causal_lm_logits(self.backbone.get_output_embeddings(), out.last_hidden_state, logits_to_keep)
        loss = shifted_cross_entropy(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)


__all__ = ["HCAMForCausalLM", "HCAMModel", "HCAMPreTrainedModel"]
