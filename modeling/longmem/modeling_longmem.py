"""LongMem as transformers models: ``LongMemModel`` (SideNet features) and ``LongMemForCausalLM``.

Forward pass over an input of any length (official ``TransformerDecoderSideNetBase.extract_features``):

1. the input is cut at multiples of ``segment_length`` of the sequence position (a segment may be split across calls);
2. for each piece, the frozen backbone encodes it with the current segment's KV cache only, at segment-local
   positions; hidden states ``h_0 .. h_L`` are captured by hooks (``h_L`` before the final norm);
3. the SideNet runs from ``x_0 = h_0`` with the cross-network residuals; its memory layer retrieves the top-k chunks
   of the bank, which holds the EARLIER segments only;
4. the retrieval layer's un-rotated keys/values of the piece are recorded; when the segment is complete they are
   written to the bank (after the segment's forward, as in LongMem) and the local state is cleared.

Logits are the backbone's ``lm_head`` of the SideNet's normed output. All of it lives in a
:class:`LongMemBankCache`; ``generate`` builds one by default and honours a user-supplied one (e.g. from
:meth:`LongMemForCausalLM.memorize`).
"""

from __future__ import annotations

from collections.abc import Sequence
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
from hf_longmem.modeling.causal_lm import MemoryModelMixin, can_return_tuple, last_hidden_state_last
from hf_longmem.modeling.longmem.cache_longmem import LongMemBankCache
from hf_longmem.modeling.longmem.configuration_longmem import LongMemConfig
from hf_longmem.modeling.longmem.sidenet import SideNetLayer, SideNetRMSNorm, check_supported_backbone
from hf_longmem.modeling.padding import left_padding, scatter_rows
from hf_longmem.modeling.remote_code import RemoteCodeMixin


@contextmanager
def _capture_layer_outputs(backbone, retrieval_layer: int | None = None):
    """Collect the output of every decoder layer (``h_1 .. h_L``, before the final norm) during a forward, and the
    ``k_proj`` / ``v_proj`` outputs of decoder layer ``retrieval_layer`` (``{"k_proj": .., "v_proj": ..}``)."""
    states: list[torch.Tensor] = []
    projections: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    def projection(name: str):
        def hook(module, args, output):
            projections[name] = output

        return hook

    hooks = [layer.register_forward_hook(keep) for layer in backbone.model.layers]
    if retrieval_layer is not None:
        attention = backbone.model.layers[retrieval_layer].self_attn
        hooks += [getattr(attention, name).register_forward_hook(projection(name)) for name in ("k_proj", "v_proj")]
    try:
        yield states, projections
    finally:
        for hook in hooks:
            hook.remove()


def backbone_hidden_states(
    backbone, input_ids, inputs_embeds, retrieval_layer: int | None = None, head_dim: int = 0, **kwargs
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """``([h_0, h_1, ..., h_L], memory)``: the embeddings and every decoder layer's output, each ``[b, T, D]``, and
    with ``retrieval_layer`` its un-rotated keys and values ``[b, Hkv, T, head_dim]`` (the memory LongMem stores).

    The keys and values are the layer's own ``k_proj`` / ``v_proj`` outputs of this forward (captured, not
    recomputed: under FSDP a decoder layer's weights are whole only inside its forward). ``kwargs`` go to
    ``backbone.model`` (mask, positions, cache).
    """
    if inputs_embeds is None:
        inputs_embeds = backbone.get_input_embeddings()(input_ids)
    with _capture_layer_outputs(backbone, retrieval_layer) as (states, projections):
        backbone.model(inputs_embeds=inputs_embeds, **kwargs)
    if len(states) != len(backbone.model.layers):
        raise ValueError(f"captured {len(states)} layer outputs for {len(backbone.model.layers)} backbone layers")
    memory = None
    if retrieval_layer is not None:
        b, t, _ = inputs_embeds.shape
        memory = tuple(projections[name].view(b, t, -1, head_dim).transpose(1, 2) for name in ("k_proj", "v_proj"))
    return [inputs_embeds, *states], memory


class _RetrievedChunks:
    """A bank read taken ahead of a checkpointed SideNet layer: the layer's ``bank.retrieve(q, k)`` returns it.

    The bank is written in place after each segment, so a backward recompute that read the bank itself would see a
    different bank. The top-k selection is not differentiable and the bank holds constants, so reading it once, with
    the query the layer computes from the same input by the same operations, gives the layer exactly what it reads.
    """

    def __init__(self, retrieved: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        self.retrieved = retrieved

    @classmethod
    def read(cls, layer: SideNetLayer, x: torch.Tensor, bank, topk_chunks: int):
        """The bank read of ``layer`` for its input ``x [b, T, D]`` (``None`` when the layer reads nothing now)."""
        attention = layer.self_attn
        if not attention.memory or bank is None or bank.is_empty():
            return None
        b, t, _ = x.shape
        with torch.no_grad():
            q = attention.q_proj(layer.input_layernorm(x)).view(b, t, attention.num_heads, attention.head_dim)
            return cls(bank.retrieve(q.transpose(1, 2), topk_chunks))

    def is_empty(self) -> bool:
        return False

    def retrieve(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.retrieved


class LongMemPreTrainedModel(MemoryModelMixin, RemoteCodeMixin, PreTrainedModel):
    config_class = LongMemConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _is_stateful = True  # the memory bank and the segment state cannot be cropped (no assisted decoding)
    _unsupported_features = {
        "output_attentions": (
            "each SideNet layer attends per segment piece over the segment's local keys and (memory layer) the "
            "retrieved chunks of the bank, mixed by a learned gate: there is no single [batch, heads, T, T] matrix"
        ),
    }

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        """transformers' switch, then off again for the backbone's layers: they run with the segment's KV cache,
        which transformers' checkpointed layers drop (and the frozen backbone runs without gradients anyway).
        Checkpointed are the SideNet layers (see :meth:`LongMemModel.forward`)."""
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, LongMemModel):
                for inner in module.backbone.modules():
                    if hasattr(inner, "gradient_checkpointing"):
                        inner.gradient_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, SideNetRMSNorm):
            nn.init.ones_(module.weight)


class LongMemModel(BackboneEmbeddingsMixin, LongMemPreTrainedModel):
    """Frozen backbone + residual SideNet with a memory-augmented layer; returns the SideNet's normed features.

    Attributes:
        backbone: the wrapped causal LM (its ``lm_head`` is used by :class:`LongMemForCausalLM`).
        layers: the SideNet layers; ``layers[config.memory_layer_index]`` reads the memory bank.
        norm: the SideNet's final norm (initialised from the backbone's).
    """

    def __init__(self, config: LongMemConfig):
        super().__init__(config)
        self.backbone = build_backbone(config)
        check_supported_backbone(self.backbone)
        bc = config.backbone_config
        source = self.backbone.model.layers
        self.layers = nn.ModuleList(
            SideNetLayer(
                bc, source[config.sidenet_source_layer(i)], i == config.memory_layer_index, config.memory_gate_init
            )
            for i in range(config.num_sidenet_layers)
        )
        self.norm = SideNetRMSNorm(bc.hidden_size, getattr(bc, "rms_norm_eps", 1e-6))
        self.gradient_checkpointing = False
        self.post_init()
        self.init_sidenet_from_backbone()
        if config.freeze_backbone:
            freeze_backbone(self.backbone)

    @torch.no_grad()
    def init_sidenet_from_backbone(self) -> None:
        """Copy backbone layer ``r * i + r - 1`` into SideNet layer ``i`` and the final norm (``sidenet_init``).

        ``"zero_output"`` then zeroes ``o_proj`` and ``down_proj`` (weights and biases): every SideNet update is 0,
        the cross-network residuals telescope to ``h_L`` and the wrapper's logits equal the backbone's.
        """
        source_layers = self.backbone.model.layers
        for index, layer in enumerate(self.layers):
            source = source_layers[self.config.sidenet_source_layer(index)].state_dict()
            missing, unexpected = layer.load_state_dict(source, strict=False)
            if unexpected or [name for name in missing if not name.endswith("memory_gate")]:
                raise ValueError(f"backbone layer does not fit the SideNet: missing {missing}, unexpected {unexpected}")
            if self.config.sidenet_init == "zero_output":
                for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    linear.weight.zero_()
                    if linear.bias is not None:
                        linear.bias.zero_()
            if layer.self_attn.memory:
                layer.self_attn.memory_gate.fill_(self.config.memory_gate_init)
        self.norm.load_state_dict(self.backbone.model.norm.state_dict())

    def memory_gate_logits(self) -> torch.Tensor:
        """``[heads]`` gate logits ``g`` of the memory layer (detached); ``sigmoid(g)`` weighs the memory."""
        return self.layers[self.config.memory_layer_index].self_attn.memory_gate.detach()

    def make_cache(self) -> LongMemBankCache:
        """A fresh, empty :class:`LongMemBankCache` for this model."""
        return LongMemBankCache(self.config)

    # ------------------------------------------------------------------------------------------------ internals
    def _backbone_context(self):
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        return torch.no_grad() if frozen else nullcontext()

    def _forward_piece(self, input_ids, inputs_embeds, mask, cache: LongMemBankCache) -> list[torch.Tensor]:
        """One piece inside one segment: ``[b, T]`` -> SideNet states ``x_0 .. x_S``, each ``[b, T, D]`` (pre-norm;
        ``x_S`` is the output); updates ``cache``."""
        past_mask = cache.segment_mask
        full_mask = mask if past_mask is None else torch.cat((past_mask, mask), dim=1)  # [b, fill + T]
        # Segment-local positions count real tokens only (left padding starts at 0).
        before = 0 if past_mask is None else past_mask.long().sum(dim=1, keepdim=True)
        positions = (before + mask.long().cumsum(dim=1) - 1).clamp(min=0)
        with self._backbone_context():
            hidden, (mem_keys, mem_values) = backbone_hidden_states(
                self.backbone,
                input_ids,
                inputs_embeds,
                retrieval_layer=self.config.retrieval_layer_index,
                head_dim=self.layers[0].self_attn.head_dim,
                attention_mask=full_mask.long(),
                position_ids=positions,
                cache=cache.backbone_cache,
                use_cache=True,
            )
        r = self.config.layer_reduction_factor
        fill, t = full_mask.shape[1] - mask.shape[1], mask.shape[1]
        # Local causal mask over the segment so far; a query may always see itself (padding rows stay finite).
        causal = torch.ones(t, fill + t, dtype=torch.bool, device=mask.device).tril(diagonal=fill)
        local_mask = causal[None] & full_mask[:, None, :].bool()
        columns = torch.arange(fill + t, device=mask.device)
        local_mask |= (columns[None, :] == torch.arange(t, device=mask.device)[:, None] + fill)[None]
        local_mask = local_mask[:, None]  # [b, 1, T, fill + T]
        x = hidden[0]
        states = [x]
        position_embeddings = self.backbone.model.rotary_emb(x, positions)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            bank, run = cache.bank, layer
            if checkpointing:
                # A SideNet layer returns the segment's keys/values instead of writing them, so the backward can
                # recompute it; only its bank read must be taken now (the bank is written to later in the forward).
                bank = _RetrievedChunks.read(layer, x, bank, self.config.topk_chunks)
                run = partial(self._gradient_checkpointing_func, layer.__call__)
            update, cache.sidenet_kv[index] = run(
                x, position_embeddings, local_mask, cache.sidenet_kv[index], bank, self.config.topk_chunks
            )
            x = x + update + (hidden[r * (index + 1)] - hidden[r * index])
            states.append(x)
        cache.append_segment(mem_keys, mem_values, mask.bool())
        if cache.segment_fill == self.config.segment_length:
            cache.finish_segment()
        return states

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LongMemBankCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """SideNet features of ``input_ids`` ``[b, T]`` (any ``T``; segmented internally).

        Args:
            input_ids: ``[b, T]`` token ids (or ``inputs_embeds`` ``[b, T, D]``).
            attention_mask: ``[b, T]`` or ``[b, past + T]`` (its last ``T`` columns are used), 1 for real tokens.
            position_ids: ignored: positions are segment-local and derived from the mask.
            cache: a :class:`LongMemBankCache` to continue from (and update); ``None``: a fresh one.
            use_cache: return the cache (default ``config.use_cache``).
            output_hidden_states: also return the SideNet's states ``x_0 .. x_S`` (``num_sidenet_layers + 1``
                tensors ``[b, T, D]``; ``x_0`` is the backbone's embedding output, the last one is final-normed).
            output_attentions: refused (``_unsupported_features``).

        Returns:
            ``last_hidden_state`` ``[b, T, D]`` (after the SideNet's norm), ``cache`` and ``hidden_states``.
        """
        _, output_hidden_states = self.resolve_output_flags(output_attentions, output_hidden_states)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        if length == 0:
            raise ValueError("input_ids must hold at least one token")
        if cache is None:
            cache = self.make_cache()
        elif not isinstance(cache, LongMemBankCache):
            raise ValueError(f"cache must be a LongMemBankCache (model.make_cache()), got {type(cache).__name__}")
        if attention_mask is not None and (
            attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length
        ):
            raise ValueError(f"attention_mask must be [b, past + T] 2D, got {tuple(attention_mask.shape)}")
        if cache.batch_size not in (-1, batch):
            raise ValueError(f"cache holds batch {cache.batch_size}, input has batch {batch}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        pads = left_padding(attention_mask, length, cache.seen_tokens, cache.group_padding())
        if pads is not None:
            return self._forward_row_groups(input_ids, inputs_embeds, pads, cache, use_cache, output_hidden_states)
        if attention_mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=reference.device)
        else:  # no padding, or right padding (trailing pads never enter the bank)
            mask = attention_mask[:, -length:].bool()
        outputs, start = [], 0
        while start < length:
            stop = min(length, start + self.config.segment_length - cache.segment_fill)
            piece_ids = input_ids[:, start:stop] if input_ids is not None else None
            piece_embeds = inputs_embeds[:, start:stop] if inputs_embeds is not None else None
            outputs.append(self._forward_piece(piece_ids, piece_embeds, mask[:, start:stop], cache))
            start = stop
        states = [torch.cat(per_layer, dim=1) for per_layer in zip(*outputs)]  # x_0 .. x_S over the whole input
        hidden = self.norm(states[-1])
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            cache=cache if use_cache else None,
            hidden_states=last_hidden_state_last(states, hidden) if output_hidden_states else None,
        )

    def _forward_row_groups(self, input_ids, inputs_embeds, pads, cache, use_cache, output_hidden_states):
        """A left-padded batch (``pads [b]`` padding tokens per row): each group of rows with the same padding runs as
        an unpadded batch of its real tokens with its own cache (:mod:`hf_longmem.modeling.padding`), so every row is
        segmented from its first real token, exactly as alone. Outputs at padding positions are zeros."""
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        seen = cache.seen_tokens
        if cache.row_groups is None:  # first call: each group starts from its rows of the bank (e.g. memorize's)
            cache.make_row_groups(pads, lambda rows: LongMemBankCache(self.config, bank=cache.bank_rows(rows)))
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
            hidden = self.norm.weight.new_zeros(batch, length, self.norm.weight.shape[0])
            states = [hidden.clone() for _ in range(len(self.layers) + 1)] if output_hidden_states else None
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            cache=cache if use_cache else None,
            hidden_states=tuple(states) if states else None,
        )


class LongMemForCausalLM(BackboneWrapperMixin, LongMemPreTrainedModel, GenerationMixin):
    """LongMem language model: :class:`LongMemModel` + the backbone's ``lm_head``.

    Build one around a pretrained backbone with :meth:`from_backbone` (copies the backbone weights and initialises
    the SideNet from them), then train only the SideNet (the backbone is frozen by ``config.freeze_backbone``).
    """

    def __init__(self, config: LongMemConfig):
        super().__init__(config)
        self.model = LongMemModel(config)
        self.post_init()
        self.model.init_sidenet_from_backbone()  # post_init re-initialised every submodule

    @property
    def backbone(self):
        return self.model.backbone

    @classmethod
    def from_backbone(cls, backbone, **config_kwargs):
        """Wrap ``backbone`` (a model, path or repo id); the SideNet starts from its layers (``sidenet_init``)."""
        model = super().from_backbone(backbone, **config_kwargs)
        model.model.init_sidenet_from_backbone()
        return model

    memory_cache_class = LongMemBankCache

    def make_cache(self) -> LongMemBankCache:
        """A fresh, empty :class:`LongMemBankCache` (what ``generate`` uses when no cache is passed)."""
        return self.model.make_cache()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: LongMemBankCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``[b, T, V]`` (see :meth:`LongMemModel.forward`); ``labels`` ``[b, T]`` give the shifted LM loss."""
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
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.backbone.get_output_embeddings()(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.backbone_config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    # ------------------------------------------------------------------------------------------------ memorize
    @torch.no_grad()
    def memorize(
        self,
        texts: Sequence[str] | Sequence[Sequence[int]] | Sequence[torch.Tensor],
        tokenizer=None,
        cache: LongMemBankCache | None = None,
        batch_size: int = 1,
        add_special_tokens: bool = True,
    ) -> LongMemBankCache:
        """Fill a cache's memory bank with documents ahead of time (e.g. many-shot demonstrations).

        Each document is encoded by the backbone alone, segment by segment (``segment_length`` tokens, positions
        restarting per segment as during generation), and the retrieval layer's keys/values of all its tokens are
        written to the bank (a final partial chunk is stored too). Documents go in the given order, oldest first, so
        the FIFO evicts the earliest documents first when the bank is full.

        Args:
            texts: documents as strings (``tokenizer`` required) or token id lists/1-D tensors.
            tokenizer: tokenizes string documents.
            cache: a cache to add to (it must not be in the middle of a sequence); ``None``: a fresh one.
            batch_size: rows of the returned cache (every row holds the same memory), the batch ``generate`` gets.
            add_special_tokens: passed to the tokenizer.

        Returns:
            the cache, ready for ``generate(..., cache=cache)``.
        """
        if isinstance(texts, (str, torch.Tensor)) or not isinstance(texts, Sequence) or len(texts) == 0:
            raise ValueError("texts must be a non-empty list of documents (strings or token id lists)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        cache = self.make_cache() if cache is None else cache
        if not isinstance(cache, LongMemBankCache):
            raise ValueError(f"cache must be a LongMemBankCache, got {type(cache).__name__}")
        if cache.seen_tokens:
            raise ValueError("cache is in the middle of a sequence; memorize into a fresh cache (model.make_cache())")
        bank = cache.bank
        if bank.batch_size > 1:
            raise ValueError("memorize adds to a one-row bank; this cache's bank holds several rows")
        device = self.backbone.device
        for number, text in enumerate(texts):
            if isinstance(text, str):
                if tokenizer is None:
                    raise ValueError("texts holds strings: pass the tokenizer")
                ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            else:
                ids = text.tolist() if isinstance(text, torch.Tensor) else list(text)
            if len(ids) == 0:
                raise ValueError(f"texts[{number}] is an empty document")
            ids = torch.tensor([ids], dtype=torch.long, device=device)
            for start in range(0, ids.shape[1], self.config.segment_length):
                piece = ids[:, start : start + self.config.segment_length]
                positions = torch.arange(piece.shape[1], device=device)[None]
                _, (keys, values) = backbone_hidden_states(
                    self.backbone,
                    piece,
                    None,
                    retrieval_layer=self.config.retrieval_layer_index,
                    head_dim=self.model.layers[0].self_attn.head_dim,
                    position_ids=positions,
                    use_cache=False,
                )
                bank.write(keys, values)
        bank.flush()
        if batch_size > 1:
            bank.repeat_rows(batch_size)
        return cache
