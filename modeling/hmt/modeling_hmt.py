"""HMT (Hierarchical Memory Transformer, He et al., NAACL 2025) around any Hugging Face causal LM.

The math follows the paper and the official code (OswaldHe/HMT-pytorch, ``modeling_rmt/language_modeling.py`` and
``long_mem_cross_attn.py``); :class:`~hf_longmem.modeling.hmt.configuration_hmt.HMTConfig` states the recurrence.
One forward over a long input and the same input fed in pieces (``cache=`` / ``generate``) compute the same thing:

- every finished segment ``n`` contributes its memory embedding ``m_n`` (the last output of the backbone pass over
  ``[P_n ‖ sensory ‖ H_n ‖ P_n]``) to the bank, whatever the pieces were;
- a position ``t`` of the current segment is computed from ``P_n`` recalled with the summary of the first
  ``min(r, j)`` tokens of the segment, where ``r`` is the number of segment tokens given so far. While ``r < j`` a
  new piece therefore changes ``P_n``: we recompute the summary and re-encode the segment's tokens (at most
  ``sensory_length + j`` of them), so token-by-token decoding equals the last-position logits of one forward over
  the same prefix. Once ``r >= j`` pieces just extend the segment's key/value cache.

Deviations from the official code (each a bug or an inconsistency there):

- the official ``generate`` freezes ``P_n`` of the last segment at the prompt's summary although its training
  forward recomputes it from the segment's first ``j`` tokens; we recompute as above, so ``generate`` continues
  exactly what the forward computes;
- the recall scale is always ``1/√h`` (the official training path uses ``1/h`` for ``h, d >= 4096``);
- ``manage_gradients`` (truncated BPTT) is a no-op in the official code, so its gradients flow through every
  segment; so do ours (full BPTT);
- the official code feeds the final-norm output ``m_n`` back as an input embedding; we do the same (faithful).

Note the summary pass of the paper looks ahead: ``P_n`` at the first positions of segment ``n`` depends on tokens up
to ``j - 1`` of it (through which memory is recalled, a softmax over at most ``N`` stored embeddings). We keep
this, as both the paper and the code define it; the forward above makes it exact for incremental decoding.

Left-padded batches: every row is segmented from its own first real token, as it is alone. Rows with the same number
of padding tokens form a group that runs as one unpadded batch with its own state (``HMTCache.row_groups``), so a row
of a padded batch gives, row by row, exactly what it gives alone; outputs at padding positions are zeros. Only left
padding is accepted (``generate``'s). The state keeps input *embeddings* (sensory memory, the unfinished segment), so
``inputs_embeds`` work as ``input_ids`` do.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from hf_longmem.modeling.backbone import (
    BackboneWrapperMixin,
    build_backbone,
    check_backbone_matches,
)
from hf_longmem.modeling.causal_lm import MemoryModelMixin, can_return_tuple, causal_lm_logits, shifted_cross_entropy
from hf_longmem.modeling.hmt.cache import HMTCache
from hf_longmem.modeling.hmt.configuration_hmt import HMTConfig
from hf_longmem.modeling.hmt.memory import HMTMemory, append_to_bank
from hf_longmem.modeling.padding import left_padding, scatter_rows
from hf_longmem.modeling.remote_code import RemoteCodeMixin


def _plan_pieces(length: int, segment_position: int, segment_length: int) -> list[tuple[int, int, int]]:
    """Split ``length`` new tokens at segment boundaries: ``(start, size, segment_position_before)`` per piece."""
    pieces, start, position = [], 0, segment_position
    while start < length:
        size = min(length - start, segment_length - position)
        pieces.append((start, size, position))
        start, position = start + size, (position + size) % segment_length
    return pieces


class HMTPreTrainedModel(MemoryModelMixin, RemoteCodeMixin, BackboneWrapperMixin, PreTrainedModel):
    """Shared parts of :class:`HMTModel` and :class:`HMTForCausalLM`: the backbone, HMT's memory and the recurrence.

    Attributes:
        backbone: the wrapped causal LM (with LoRA adapters when ``config.lora_rank > 0``).
        memory: :class:`~hf_longmem.modeling.hmt.memory.HMTMemory`, the parameters HMT adds.
    """

    config_class = HMTConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # the backbone's layers; HMT then runs without a cache (see forward)
    _is_stateful = True  # the memory bank is a recurrent state: no assisted decoding, no cache cropping
    _unsupported_features = {
        "output_attentions": (
            "every segment is one backbone pass over [memory ‖ sensory ‖ segment ‖ memory] (and summary passes over "
            "[summary ‖ prefix ‖ summary]): there is no single [batch, heads, T, T] matrix over the input tokens"
        ),
    }

    def __init__(self, config: HMTConfig):
        super().__init__(config)
        self.backbone = build_backbone(config)
        hidden_size = self.backbone.get_input_embeddings().embedding_dim
        if getattr(config.backbone_config, "hidden_size", hidden_size) != hidden_size:
            raise ValueError(
                "backbone_config: HMT feeds output hidden states back as input embeddings, so the backbone's "
                f"embedding size ({hidden_size}) must equal its hidden_size ({config.backbone_config.hidden_size})"
            )
        self.memory = HMTMemory(
            hidden_size, config.recall_hidden_size or hidden_size, config.use_recall, config.num_memory_tokens
        )
        self.post_init()
        if config.lora_rank:
            self._inject_lora()
        self.apply_trainability()

    # ---- parameters ------------------------------------------------------------------------------------------------

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, HMTMemory):
            std = self.config.memory_init_std or getattr(self.config.backbone_config, "initializer_range", 0.02)
            module.reset_parameters(std)

    def _inject_lora(self) -> None:
        """Insert peft LoRA adapters into the backbone (in place: parameter names gain ``base_layer``/``lora_*``)."""
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(self.config.lora_target_modules),
        )
        try:
            inject_adapter_in_model(lora, self.backbone)
        except ValueError as error:
            raise ValueError(
                f"lora_target_modules {self.config.lora_target_modules} do not fit the backbone: {error}"
            ) from error
        for name, module in self.backbone.named_modules():
            if "lora_" in name:  # peft initialised them (B = 0): keep transformers' init passes off them
                module._is_hf_initialized = True
                for parameter in module.parameters(recurse=False):
                    parameter._is_hf_initialized = True

    def apply_trainability(self) -> None:
        """``requires_grad`` from the config: HMT's memory and LoRA adapters train; the backbone's own weights only
        when ``freeze_backbone`` is off."""
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad_(not self.config.freeze_backbone or "lora_" in name)
        for parameter in self.memory.parameters():
            parameter.requires_grad_(True)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then ``requires_grad`` from the config (loading resets it); returns
        ``(model, loading_info)`` with ``output_loading_info=True``, as transformers does."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).apply_trainability()
        return loaded

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel | str, **config_kwargs):
        """Wrap a pretrained causal LM (a model, a local path or a repo id): copy its weights in, initialise the
        memory and summary embeddings with the std of its input embeddings (official init), inject LoRA if asked.

        Raises:
            ValueError: ``backbone`` is not a model, its weights do not fit, or a config field is invalid.
        """
        name_or_path = None
        if isinstance(backbone, str):
            name_or_path = backbone
            backbone = AutoModelForCausalLM.from_pretrained(backbone)
        if not isinstance(backbone, PreTrainedModel):
            raise ValueError(f"backbone must be a PreTrainedModel or a path/repo id, got {type(backbone).__name__}")
        config_kwargs.setdefault("backbone_name_or_path", name_or_path or getattr(backbone, "name_or_path", None))
        config = cls.config_class(backbone_config=backbone.config.to_dict(), **config_kwargs)
        check_backbone_matches(config.backbone_config, backbone)
        model = cls(config)
        source = backbone.state_dict()
        target = model.backbone.state_dict()
        mapped = {
            key: source[key.replace(".base_layer.", ".")]
            for key in target
            if "lora_" not in key and key.replace(".base_layer.", ".") in source
        }
        missing = [k for k in target if "lora_" not in k and k not in mapped and not k.endswith("lm_head.weight")]
        unexpected = sorted(set(source) - {k.replace(".base_layer.", ".") for k in target})
        if missing or unexpected:
            raise ValueError(f"backbone weights do not fit: missing {missing}, unexpected {unexpected}")
        model.backbone.load_state_dict(mapped, strict=False)
        parameter = next(backbone.parameters())
        model.to(dtype=parameter.dtype, device=parameter.device)
        std = config.memory_init_std or float(backbone.get_input_embeddings().weight.detach().float().std())
        model.memory.reset_parameters(std)
        model.apply_trainability()
        return model

    # ---- the recurrence --------------------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(ids)

    def _backbone_pass(self, embeds: torch.Tensor, kv=None, output_hidden_states: bool = False):
        """Backbone decoder over ``embeds`` ``[B, S, d]`` at positions ``past..past+S-1`` -> final hidden ``[B, S, d]``
        (and, with ``output_hidden_states``, the decoder's ``num_hidden_layers + 1`` states ``[B, S, d]``)."""
        past = 0 if kv is None else kv.get_seq_length()
        positions = torch.arange(past, past + embeds.shape[1], device=embeds.device).unsqueeze(0)
        out = self.backbone.get_decoder()(
            inputs_embeds=embeds,
            position_ids=positions.expand(embeds.shape[0], -1),
            cache=kv,
            use_cache=kv is not None,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        if output_hidden_states:
            return out.last_hidden_state, out.hidden_states
        return out.last_hidden_state

    def _summaries(self, prefixes: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Summary pass ``S = backbone([T ‖ x ‖ T])[-1]`` for each ``[B, s, d]`` embedding prefix ``x``; equal-length
        prefixes run as one batch (the passes do not depend on the memory, so all segments summarise at once).

        Returns:
            the same keys -> ``[B, 1, d]``.
        """
        out: dict[int, torch.Tensor] = {}
        by_length: dict[int, list[int]] = {}
        for key, ids in prefixes.items():
            by_length.setdefault(ids.shape[1], []).append(key)
        for keys in by_length.values():
            embeds = torch.cat([prefixes[key] for key in keys], dim=0)  # [G*B, s, d]
            token = self.memory.summary_embedding.to(embeds.dtype).expand(embeds.shape[0], 1, -1)
            hidden = self._backbone_pass(torch.cat([token, embeds, token], dim=1))[:, -1:]
            for key, part in zip(keys, hidden.split(prefixes[keys[0]].shape[0], dim=0)):
                out[key] = part
        return out

    def _input_embeddings(self, input_ids, attention_mask, inputs_embeds, cache) -> torch.Tensor:
        """Checked inputs as embeddings ``[B, T, d]``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError("input_ids must be a [batch, seq] tensor of token ids")
        if inputs_embeds is not None and inputs_embeds.ndim != 3:
            raise ValueError("inputs_embeds must be a [batch, seq, hidden] tensor")
        if (input_ids if input_ids is not None else inputs_embeds).shape[1] == 0:
            raise ValueError("input_ids must hold at least one token")
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                f"attention_mask must be a 2-D [batch, seen + T] padding mask, got {attention_mask.ndim}-D"
            )
        if cache is not None:
            if not isinstance(cache, HMTCache):
                raise ValueError(
                    f"cache must be an HMTCache (the model's own memory state), got {type(cache).__name__}"
                )
            cache_hidden = getattr(cache.backbone_config, "hidden_size", None)
            if cache_hidden != self.config.backbone_config.hidden_size or cache.hmt_config.segment_length != (
                self.config.segment_length
            ):
                raise ValueError("cache was built for a different HMT config (hidden_size or segment_length differ)")
        return self._embed(input_ids) if inputs_embeds is None else inputs_embeds

    def hmt_forward(
        self, embeds: torch.Tensor, cache: HMTCache | None, keep_state: bool, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the HMT recurrence over new tokens, continuing ``cache`` when given (it is updated in place).

        Args:
            embeds: ``[B, T, d]`` input embeddings of the tokens following those ``cache`` has seen.
            cache: the state to continue and update, or ``None`` (start from an empty memory).
            keep_state: keep the unfinished segment's key/values in ``cache`` (for later pieces).
            output_hidden_states: also return the backbone's states at the new tokens.

        Returns:
            the backbone's final hidden states at the new tokens ``[B, T, d]``, and (``output_hidden_states``) its
            ``num_hidden_layers + 1`` states at them, each ``[B, T, d]`` (from the segment passes, the last normed).
        """
        config = self.config
        state = cache if cache is not None else HMTCache(config)
        batch = embeds.shape[0]
        state.check_batch(batch)
        L, j, k = config.segment_length, config.summary_length, config.sensory_length
        pieces = _plan_pieces(embeds.shape[1], state.segment_position, L)

        # Summary passes needed by the pieces (those of segments that recall and whose summary grows).
        prefixes: dict[int, torch.Tensor] = {}
        finished = state.num_segments
        for index, (start, size, position) in enumerate(pieces):
            covered = state.summary_tokens if position > 0 else 0
            wanted = min(position + size, j)
            if config.use_recall and finished > 0 and wanted > covered:
                piece = embeds[:, start : start + size]
                if position > 0:
                    piece = torch.cat([state.segment_embeds, piece], dim=1)
                prefixes[index] = piece[:, :wanted]
            finished += position + size == L
        summaries = self._summaries(prefixes) if prefixes else {}

        outputs, states = [], []
        for index, (start, size, position) in enumerate(pieces):
            piece = embeds[:, start : start + size]
            completes = position + size == L
            memory, fresh = state.segment_memory, state.segment_cache is None or position == 0
            if position == 0:
                memory, state.summary_tokens = None, 0
            if state.num_segments == 0:
                memory = (
                    memory if memory is not None else self.memory.memory_init.to(embeds.dtype).expand(batch, -1, -1)
                )
            elif not config.use_recall:
                memory = memory if memory is not None else state.bank[:, -1] * config.memory_scale
            elif index in summaries:
                memory = self.memory.recall(summaries[index], state.bank) * config.memory_scale
                state.summary_tokens = prefixes[index].shape[1]
                fresh = True
            tail = [memory] if completes else []
            if fresh:
                prefix = [memory]
                if state.num_segments > 0 and state.sensory_embeds is not None:
                    prefix.append(state.sensory_embeds)
                if position > 0:
                    prefix.append(state.segment_embeds)
                offset = sum(part.shape[1] for part in prefix)
                kv = state.new_segment_cache() if keep_state and not completes else None
                passed = self._backbone_pass(torch.cat([*prefix, piece, *tail], dim=1), kv, output_hidden_states)
            else:
                offset, kv = 0, state.segment_cache
                passed = self._backbone_pass(torch.cat([piece, *tail], dim=1), kv, output_hidden_states)
            hidden, layer_states = passed if output_hidden_states else (passed, ())
            outputs.append(hidden[:, offset : offset + size])
            states.append([layer[:, offset : offset + size] for layer in layer_states])
            segment = piece if position == 0 else torch.cat([state.segment_embeds, piece], dim=1)
            if completes:
                written = hidden[:, -config.num_memory_tokens :]
                state.bank = append_to_bank(state.bank, written, state.capacity if config.use_recall else 1)
                state.sensory_embeds = segment[:, L - k :] if k > 0 else None
                state.num_segments += 1
                state.segment_embeds = state.segment_memory = state.segment_cache = None
                state.summary_tokens = 0
            else:
                state.segment_embeds, state.segment_memory = segment, memory
                state.segment_cache = kv if keep_state else None
            state.seen_tokens += size
        all_states = tuple(torch.cat(layer, dim=1) for layer in zip(*states)) if output_hidden_states else None
        return torch.cat(outputs, dim=1), all_states

    memory_cache_class = HMTCache  # generate builds make_cache() by default and honours a user-supplied one

    def _run(self, input_ids, attention_mask, cache, inputs_embeds, use_cache, output_attentions, output_hidden_states):
        """The shared body of both forwards: ``(hidden [B, T, d], hidden_states or None, cache or None)``."""
        _, output_hidden_states = self.resolve_output_flags(output_attentions, output_hidden_states)
        embeds = self._input_embeddings(input_ids, attention_mask, inputs_embeds, cache)
        keep = bool(use_cache) or cache is not None
        if self.is_activation_checkpointing and self.training and torch.is_grad_enabled():
            # transformers' checkpointed layers drop a layer cache; the segment passes then run without one
            keep, cache = False, None
        if keep and cache is None:
            cache = HMTCache(self.config)
        seen = 0 if cache is None else cache.seen_tokens
        pads = left_padding(attention_mask, embeds.shape[1], seen, None if cache is None else cache.group_padding())
        if pads is None:
            hidden, states = self.hmt_forward(embeds, cache, keep, output_hidden_states)
        else:
            hidden, states = self._padded_forward(embeds, pads, cache, keep, output_hidden_states)
        return hidden, states, cache if keep else None

    def _padded_forward(
        self, embeds: torch.Tensor, pads: torch.Tensor, cache: HMTCache | None, keep: bool, output_hidden_states: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """A left-padded batch ``[B, T, d]``: each group of rows with the same padding runs :meth:`hmt_forward` on its
        real tokens only (its own state in ``cache.row_groups``), so every row is segmented as it is alone.

        Returns:
            as :meth:`hmt_forward`, with zeros at padding positions.
        """
        state = cache if cache is not None else HMTCache(self.config)
        batch, length, _ = embeds.shape
        seen = state.seen_tokens
        if state.row_groups is None:
            state.check_batch(batch)
            state.make_row_groups(pads, lambda rows: HMTCache(self.config, num_memories=state.capacity))
        hidden = embeds.new_zeros(embeds.shape)
        states = None
        for rows, pad, group in state.row_groups:
            skip = min(length, max(0, pad - seen))  # padding columns of this call for these rows
            if skip == length:
                continue
            rows = rows.to(embeds.device)
            group_hidden, group_states = self.hmt_forward(embeds[rows, skip:], group, keep, output_hidden_states)
            hidden[rows, skip:] = group_hidden
            if output_hidden_states:
                states = [
                    scatter_rows(None if states is None else states[layer], rows, skip, part, embeds.shape)
                    for layer, part in enumerate(group_states)
                ]
        state.seen_tokens += length
        if output_hidden_states and states is None:  # only padding in this call
            states = [embeds.new_zeros(embeds.shape) for _ in range(self.config.backbone_config.num_hidden_layers + 1)]
        return hidden, tuple(states) if output_hidden_states else None

    def make_cache(self, num_memories: int | None = None) -> HMTCache:
        """An empty :class:`HMTCache` for this model (``num_memories`` overrides the bank capacity)."""
        return HMTCache(self.config, num_memories=num_memories)


class HMTModel(HMTPreTrainedModel):
    """HMT returning the backbone's final hidden states (no LM head applied)."""

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HMTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Args as :meth:`HMTForCausalLM.forward`. Returns ``last_hidden_state`` ``[B, T, d]``, ``cache`` and
        ``hidden_states``."""
        hidden, states, cache = self._run(
            input_ids, attention_mask, cache, inputs_embeds, use_cache, output_attentions, output_hidden_states
        )
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache, hidden_states=states)


class HMTForCausalLM(HMTPreTrainedModel, GenerationMixin):
    """HMT with the backbone's LM head: ``AutoModelForCausalLM`` class of ``model_type="hmt"``."""

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HMTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Process ``input_ids`` with HMT, continuing ``cache`` when given.

        Args:
            input_ids: ``[B, T]`` token ids (rows of equal length; they follow the tokens ``cache`` has seen).
            attention_mask: ``[B, T + seen]`` or ``None``; must be all ones (no padding).
            position_ids: ignored: HMT restarts positions in every segment.
            cache: an :class:`HMTCache` to continue (updated in place); ``generate`` makes one by default.
            inputs_embeds: ``[B, T, d]`` instead of ``input_ids`` (the state keeps embeddings either way).
            labels: ``[B, T]`` next-token targets (shifted inside; ``-100`` ignored).
            use_cache: return the state as ``cache`` (always when a cache was given).
            output_hidden_states: the backbone's ``num_hidden_layers + 1`` states at the input tokens, ``[B, T, d]``
                each (from the segment passes; the last is final-normed, what the LM head reads).
            output_attentions: refused (``_unsupported_features``).
            logits_to_keep: as in transformers (``0``: all positions).

        Returns:
            ``logits`` ``[B, T or logits_to_keep, vocab]``, ``loss`` when ``labels``, ``cache``, ``hidden_states``.
        """
        hidden, states, cache = self._run(
            input_ids, attention_mask, cache, inputs_embeds, use_cache, output_attentions, output_hidden_states
        )
        logits = causal_lm_logits(self.backbone.get_output_embeddings(), hidden, logits_to_keep)
        loss = shifted_cross_entropy(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, hidden_states=states)


__all__ = ["HMTForCausalLM", "HMTModel", "HMTPreTrainedModel"]
