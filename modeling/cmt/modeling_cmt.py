"""CMT around a frozen causal LM (Li et al., "CMT: A Memory Compression Method for Continual Knowledge Learning of
Large Language Models", AAAI 2025, arXiv 2412.07393).

    model = CMTForCausalLM.from_backbone(llm, num_memory_tokens=16, memory_top_k=2)   # or from_pretrained(path)
    model.memorize(documents, tokenizer=tokenizer)      # compress -> memory bank (the LLM never changes)
    model.generate(**tokenizer(question, return_tensors="pt"), max_new_tokens=8)

Three stages (see ``docs/cmt.md`` for what is from the paper and what is ours):

1. **Memory compression.** :class:`~hf_longmem.modeling.cmt.compressor.CMTCompressor` runs a document followed by
   ``m`` learned memory tokens through the frozen LM with LoRA adapters on; the memory tokens' per-layer keys/values
   are the document's memory, stored in a bounded :class:`~hf_longmem.modeling.cmt.document_bank.DocumentMemoryBank`.
2. **Self-matching retrieval.** The question is compressed by the same compressor; its key is matched (cosine) against
   the memory keys, and the ``top_k`` memories are selected.
3. **Top-k aggregation.** The selected memories become one KV prefix (best match nearest the question) that the frozen
   LM attends to; its own attention mixes them per query. The prefix lives in the :class:`CMTCache` that ``generate``
   builds by default.

With an empty bank (or ``memory_top_k=0``) no prefix is written and the model is exactly its backbone.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_longmem.modeling.backbone import BackboneWrapperMixin, build_backbone, freeze_backbone
from hf_longmem.modeling.causal_lm import MemoryModelMixin, can_return_tuple
from hf_longmem.modeling.cmt.cache_cmt import CMTCache, ReplayPrefixCache
from hf_longmem.modeling.cmt.compressor import CMTCompressor, LoRADelta, assemble_prefix
from hf_longmem.modeling.cmt.configuration_cmt import CMTConfig
from hf_longmem.modeling.cmt.document_bank import BANK_FILE, BankSignature, DocumentMemoryBank
from hf_longmem.modeling.cmt.documents import as_token_pieces, left_pad
from hf_longmem.modeling.remote_code import RemoteCodeMixin


class CMTPreTrainedModel(MemoryModelMixin, RemoteCodeMixin, BackboneWrapperMixin, PreTrainedModel):
    config_class = CMTConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True  # the backbone's decoder layers (see _set_gradient_checkpointing)
    _supports_sdpa = True

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func=checkpoint, every_n_layers: int = 1
    ):
        """Checkpoint the backbone's decoder layers, keeping two things the recompute in the backward needs:

        - the cache: every training pass of CMT reads keys/values through a :class:`ReplayPrefixCache` (a fixed
          prefix; the pass's own states replaced, never appended), so the layers may keep it
          (``_can_checkpoint_with_cache``) and the recompute reads what the forward read;
        - the LoRA adapters' state: they are on only while compressing (a flag read by forward hooks), so the
          checkpointed function restores the flag it was called with before it is recomputed.
        """
        compressor = self.compressor

        def with_adapter_state(function, *args, **kwargs):
            active = compressor._active

            def run(*inner_args, **inner_kwargs):
                previous, compressor._active = compressor._active, active
                try:
                    return function(*inner_args, **inner_kwargs)
                finally:
                    compressor._active = previous

            return gradient_checkpointing_func(run, *args, **kwargs)

        super()._set_gradient_checkpointing(
            enable=enable, gradient_checkpointing_func=with_adapter_state, every_n_layers=every_n_layers
        )
        for module in self.backbone.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = enable

    def _init_weights(self, module):
        if isinstance(module, LoRADelta):
            init.kaiming_uniform_(module.lora_A, a=5**0.5)
            init.zeros_(module.lora_B)
        elif isinstance(module, CMTCompressor):
            init.normal_(module.memory_embeddings, mean=0.0, std=0.02)
            init.normal_(module.key_proj.weight, mean=0.0, std=0.02)
            init.zeros_(module.key_proj.bias)


class CMTForCausalLM(CMTPreTrainedModel, GenerationMixin):
    """A frozen causal LM that answers from compressed document memories.

    Attributes:
        backbone: the wrapped LM (frozen; its weights and state-dict keys are those of the pretrained model).
        compressor: memory tokens, LoRA adapters (active only while compressing) and the self-matching key projection.
        memory_bank: the compressed memories (not a parameter; saved next to the weights by ``save_pretrained`` when
            not empty, and loaded back by ``from_pretrained``).
    """

    def __init__(self, config: CMTConfig):
        super().__init__(config)
        backbone_config = config.require_backbone_config()
        self.backbone = build_backbone(config)
        self.compressor = CMTCompressor(config, self.backbone)
        freeze_backbone(self.backbone)
        head_dim = getattr(backbone_config, "head_dim", None) or (
            backbone_config.hidden_size // backbone_config.num_attention_heads
        )
        self.bank_signature = BankSignature(
            num_layers=backbone_config.num_hidden_layers,
            num_kv_heads=getattr(backbone_config, "num_key_value_heads", None) or backbone_config.num_attention_heads,
            head_dim=head_dim,
            num_memory_tokens=config.num_memory_tokens,
            retrieval_dim=config.retrieval_dim,
        )
        self.memory_bank = DocumentMemoryBank(self.bank_signature, config.max_memories)
        self.post_init()

    # ------------------------------------------------------------------------------------------------------------------
    # HF plumbing
    # ------------------------------------------------------------------------------------------------------------------

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        bank = self.__dict__.get("memory_bank")
        if bank is not None:  # follow the model's device/dtype (.to, .cuda, .half)
            probe = fn(torch.zeros((), device=bank.device, dtype=bank.dtype))
            bank.to(device=probe.device, dtype=probe.dtype if probe.is_floating_point() else None)
        return result

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, plus the memory bank (:data:`BANK_FILE`) when it is not empty."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if len(self.memory_bank) and not kwargs.get("push_to_hub", False):
            self.memory_bank.save(os.path.join(save_directory, BANK_FILE))
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, plus the memory bank saved next to the weights, if any; returns
        ``(model, loading_info)`` with ``output_loading_info=True``, as transformers does."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        from transformers.utils import cached_file

        bank_path = cached_file(
            pretrained_model_name_or_path,
            BANK_FILE,
            _raise_exceptions_for_missing_entries=False,
            **{k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs},
        )
        if bank_path is not None:
            model.load_memory(bank_path)
        return loaded

    def _assisted_decoding(self, input_ids, *args, **kwargs):
        """Retrieve for the prompt first: assisted decoding's first forward runs the prompt together with the first
        draft tokens, and CMT retrieves for the tokens of the first call on a fresh cache (the question)."""
        cache = kwargs.get("cache")
        if isinstance(cache, CMTCache) and not cache.primed and input_ids.shape[1] > 0:
            self.prime_cache(cache, input_ids, kwargs.get("attention_mask"))
        return super()._assisted_decoding(input_ids, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, cache=None, inputs_embeds=None, is_first_iteration=False, **kwargs
    ):
        """transformers' preparation; when ``generate`` continues from a primed :class:`CMTCache` it slices off the
        tokens the cache holds by ``cache.get_seq_length()``, which counts the memory prefix too: add it back."""
        if is_first_iteration and next_sequence_length is not None and isinstance(cache, CMTCache):
            next_sequence_length += cache.prefix_length
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """``generate`` builds a :class:`CMTCache` by default (and keeps a user's ``cache=``)."""
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = CMTCache(config=self.config.backbone_config)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------------
    # Memory
    # ------------------------------------------------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        pad = self.config.pad_token_id
        return 0 if pad is None else int(pad)

    def compress(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ):
        """Compress left-padded ``[n, T]`` ids (or ``[n, T, hidden]`` ``inputs_embeds``):
        ``(memories [n, layers, 2, kv_heads, m, head_dim], keys [n, r])``."""
        return self.compressor(self.backbone, input_ids, attention_mask, inputs_embeds)

    @torch.no_grad()
    def memorize(
        self,
        documents: str | list[str] | list[list[int]] | torch.Tensor,
        tokenizer: Any | None = None,
        doc_ids: list[str] | None = None,
        batch_size: int = 16,
    ) -> list[str]:
        """Compress documents into the memory bank (oldest memories are evicted beyond ``config.max_memories``).

        Args:
            documents: a text, texts (need ``tokenizer``), token-id lists, or a ``[n, T]`` id tensor. A document longer
                than ``config.max_document_tokens`` is split (texts at sentence ends) into several memories.
            tokenizer: the backbone's tokenizer, for texts.
            doc_ids: one id per document (``None``: ``"doc-<n>"``); pieces of a split document get ``"<id>#<i>"``.
            batch_size: documents compressed per forward pass.

        Returns:
            the ids of the memories added, one per piece.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        pieces, owners = as_token_pieces(documents, tokenizer, self.config.max_document_tokens)
        num_documents = owners[-1] + 1
        if doc_ids is not None and (len(doc_ids) != num_documents or not all(isinstance(d, str) for d in doc_ids)):
            raise ValueError(f"doc_ids must be {num_documents} strings (one per document), got {doc_ids!r}")
        base = doc_ids or [f"doc-{self.memory_bank.num_added + i}" for i in range(num_documents)]
        counts = [owners.count(i) for i in range(num_documents)]
        seen = [0] * num_documents
        names = []
        for owner in owners:
            names.append(base[owner] if counts[owner] == 1 else f"{base[owner]}#{seen[owner]}")
            seen[owner] += 1
        was_training = self.training
        self.eval()
        device = self.device
        try:
            for begin in range(0, len(pieces), batch_size):
                ids, mask = left_pad(pieces[begin : begin + batch_size], self.pad_token_id)
                memories, keys = self.compress(ids.to(device), mask.to(device))
                self.memory_bank.add(memories, keys, names[begin : begin + batch_size])
        finally:
            self.train(was_training)
        return names

    def forget(self) -> None:
        """Empty the memory bank."""
        self.memory_bank.clear()

    def load_memory(self, path: str | os.PathLike) -> DocumentMemoryBank:
        """Replace the memory bank by the one saved at ``path`` (checked against this model's shapes)."""
        self.memory_bank = DocumentMemoryBank.load(
            path, self.bank_signature, capacity=self.config.max_memories, device=self.device, dtype=self.dtype
        )
        return self.memory_bank

    def save_memory(self, path: str | os.PathLike):
        """Write the memory bank to ``path`` (a file or a folder) atomically."""
        return self.memory_bank.save(path)

    @torch.no_grad()
    def retrieve(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        top_k: int | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Self-matching: the bank rows of the ``top_k`` memories for each question, best LAST (prefix order).

        Args:
            input_ids: ``[batch, T]`` questions, left-padded.
            attention_mask: ``[batch, T]``.
            top_k: memories per question (``None``: ``config.memory_top_k``).
            inputs_embeds: ``[batch, T, hidden]`` questions in place of ``input_ids``.

        Returns:
            ``(indices, scores)`` ``[batch, k]`` (``k = min(top_k, bank size)``), or ``None`` when nothing is read.
        """
        top_k = self.config.memory_top_k if top_k is None else top_k
        if top_k == 0 or len(self.memory_bank) == 0:
            return None
        _, keys = self.compress(input_ids, attention_mask, inputs_embeds)
        indices, scores = self.memory_bank.search(keys, top_k)
        return indices.flip(1), scores.flip(1)

    def prime_cache(
        self,
        cache: CMTCache,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> CMTCache:
        """Retrieve the memories for the question (``input_ids`` ``[batch, T]`` or ``inputs_embeds``
        ``[batch, T, hidden]``) and write them into ``cache`` as its prefix."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2-D [batch, T] on the first (question) call of a CMT model")
        found = None
        if input_ids is not None or inputs_embeds is not None:
            found = self.retrieve(input_ids, attention_mask, cache.top_k, inputs_embeds=inputs_embeds)
        if found is None:
            cache.prime(None, None)
            return cache
        indices, scores = found
        memories = self.memory_bank.gather(indices).to(self.dtype)
        keys, values = assemble_prefix(self.compressor.rotary, memories)
        cache.prime(keys, values)
        cache.retrieved_indices, cache.retrieval_scores = indices, scores
        cache.retrieved_doc_ids = [[self.memory_bank.doc_ids[i] for i in row] for row in indices.tolist()]
        return cache

    # ------------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The backbone's forward after the memory prefix.

        On a fresh (or absent) cache the input is the question: the top-k memories are retrieved for it and written
        into a :class:`CMTCache` first. ``position_ids`` and a 2-D ``attention_mask`` count the caller's tokens only;
        the prefix is added to both here. A user cache that is not a ``CMTCache`` is used as is, without memory.
        ``output_hidden_states`` / ``output_attentions`` are the backbone's (attention keys include the prefix:
        ``[batch, heads, T, prefix + past + T]``). ``return_dict=False``: ``(loss?, logits, cache?, ...)``.
        """
        output_attentions, output_hidden_states = self.resolve_output_flags(
            kwargs.pop("output_attentions", None), kwargs.pop("output_hidden_states", None)
        )
        if output_attentions and self.backbone.config._attn_implementation != "eager":
            raise ValueError(
                "output_attentions needs the eager attention (SDPA computes no weights): load the model with "
                "attn_implementation='eager' or call model.set_attn_implementation('eager')"
            )
        use_cache = getattr(self.config.backbone_config, "use_cache", True) if use_cache is None else use_cache
        if cache is None:
            cache = CMTCache(config=self.config.backbone_config)
        prefix = 0
        if isinstance(cache, CMTCache):
            if not cache.primed:
                self.prime_cache(cache, input_ids, attention_mask, inputs_embeds)
            prefix = cache.prefix_length
        if self.training and torch.is_grad_enabled() and self.is_activation_checkpointing:
            # checkpointed layers recompute in the backward: read what the cache holds through a replay cache (the
            # given cache is not updated, as transformers drops a cache under gradient checkpointing)
            use_cache, cache = False, ReplayPrefixCache.holding(cache, self.config.backbone_config.num_hidden_layers)
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # positions count the caller's real tokens (left padding takes none), as generate computes them
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        if prefix:
            if attention_mask is not None:
                if attention_mask.dim() != 2:
                    raise ValueError("attention_mask must be 2-D [batch, T] when a memory prefix is present")
                attention_mask = torch.cat(
                    [attention_mask.new_ones(attention_mask.shape[0], prefix), attention_mask], 1
                )
            if position_ids is not None:
                position_ids = position_ids + prefix
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        return CausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits,
            cache=cache if use_cache else None,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Training objective
    # ------------------------------------------------------------------------------------------------------------------

    def memory_training_loss(
        self,
        document_ids: torch.Tensor,
        document_mask: torch.Tensor,
        document_owner: torch.Tensor,
        gold_document: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        qa_ids: torch.Tensor,
        qa_mask: torch.Tensor,
        qa_labels: torch.Tensor,
        top_k: int | None = None,
        retrieval_weight: float = 1.0,
        document_weight: float = 0.0,
        distill_weight: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """CMT's training objective on a batch of (documents, question, answer) samples; only memory parts learn.

        Each sample owns some documents (its memory bank during training). The loss is

        - **QA**: cross entropy of the answer given the question after the top-k aggregated prefix of the sample's
          memories (the gold memory and the ``k-1`` best-scoring other memories of the sample, in a random order);
          gradients reach the compressor through the memory keys/values;
        - **self-matching**: ``retrieval_weight`` times the cross entropy of the question key's cosine scores
          (over the temperature) against the sample's memory keys, the gold memory being the target;
        - **memory-aware document loss** (our reading of the paper's memory-aware objective, see ``docs/cmt.md``):
          ``document_weight`` times the frozen LM's next-token loss on each gold document given only that document's
          memory as prefix. Every token of the document is a target, so the memory is pushed to hold what the LM
          cannot predict on its own (a pass key, a needle's value) long before the sparse QA loss finds it;
        - **memory-aware distillation** (ours as well): ``distill_weight`` times the normalised squared distance
          between the frozen LM's hidden states (every layer) on the question + answer after the memory prefix and
          its hidden states when the gold document itself precedes them in context: reading the memory should act
          on the LM as reading the document does. The teacher is the same frozen LM (no extra model).

        Args:
            document_ids: ``[n, T]`` left-padded documents; ``document_mask`` ``[n, T]``.
            document_owner: ``[n]`` sample index of each document.
            gold_document: ``[batch]`` index (into the ``n`` documents) of each sample's answer-bearing document.
            question_ids: ``[batch, Tq]`` left-padded questions (what retrieval sees); ``question_mask`` likewise.
            qa_ids: ``[batch, Ta]`` right-padded question + answer + EOS; ``qa_mask`` its attention mask;
                ``qa_labels`` the ids on answer tokens and ``-100`` elsewhere (unshifted, as HF labels).
            top_k: memories in the prefix (``None``: ``config.memory_top_k``), capped by the smallest sample's documents.
            retrieval_weight: weight of the self-matching loss.
            document_weight: weight of the memory-aware document loss (``0``: not computed).
            distill_weight: weight of the memory-aware distillation loss (``0``: not computed).
            generator: RNG for the order of the memories in the prefix.

        Returns:
            ``{"loss", "qa_loss", "retrieval_loss", "document_loss", "distill_loss", "retrieval_accuracy"}`` (the last is the top-1
            hit rate).
        """
        batch = question_ids.shape[0]
        if gold_document.shape != (batch,) or document_owner.shape != (document_ids.shape[0],):
            raise ValueError("gold_document must be [batch] and document_owner [n]")
        if bool((document_owner[gold_document] != torch.arange(batch, device=gold_document.device)).any()):
            raise ValueError("gold_document must point at a document owned by the same sample")
        top_k = self.config.memory_top_k if top_k is None else top_k
        memories, doc_keys = self.compress(document_ids, document_mask)
        _, question_keys = self.compress(question_ids, question_mask)
        scores = F.normalize(question_keys, dim=-1) @ F.normalize(doc_keys, dim=-1).t()  # [batch, n]
        owned = document_owner.view(1, -1) == torch.arange(batch, device=scores.device).view(-1, 1)
        logits = (scores / self.config.retrieval_temperature).masked_fill(~owned, float("-inf"))
        retrieval_loss = F.cross_entropy(logits, gold_document)
        accuracy = (logits.argmax(-1) == gold_document).float().mean()
        k = max(1, min(top_k, int(owned.sum(-1).min())))
        # gold + the (k-1) best other memories of the sample, in a random order
        others = logits.detach().scatter(1, gold_document.view(-1, 1), float("-inf"))
        chosen = (
            torch.cat([gold_document.view(-1, 1), others.topk(k - 1, dim=-1).indices], dim=1)
            if k > 1
            else (gold_document.view(-1, 1))
        )
        order = torch.rand(batch, k, generator=generator).argsort(-1).to(chosen.device)
        chosen = chosen.gather(1, order)
        keys, values = assemble_prefix(self.compressor.rotary, memories[chosen])
        cache = ReplayPrefixCache(self.config.backbone_config.num_hidden_layers, keys, values)  # one pass
        mask = torch.cat([qa_mask.new_ones(batch, keys.shape[-2]), qa_mask], dim=1)
        out = self.backbone(
            input_ids=qa_ids,
            attention_mask=mask,
            cache=cache,
            labels=qa_labels,
            use_cache=True,
            output_hidden_states=bool(distill_weight),
        )
        qa_loss = out.loss
        loss = qa_loss + retrieval_weight * retrieval_loss
        document_loss = torch.zeros((), device=loss.device)
        if document_weight:
            document_loss = self._document_loss(
                memories[gold_document], document_ids[gold_document], document_mask[gold_document]
            )
            loss = loss + document_weight * document_loss
        distill_loss = torch.zeros((), device=loss.device)
        if distill_weight:
            teacher = self._teacher_hidden_states(
                document_ids[gold_document], document_mask[gold_document], qa_ids, qa_mask
            )
            student = torch.stack(out.hidden_states[1:])  # [layers, batch, Ta, hidden]
            weight = qa_mask.to(student.dtype).view(1, batch, -1, 1)
            error = ((student - teacher) ** 2 * weight).sum() / (teacher**2 * weight).sum().clamp_min(1e-6)
            distill_loss = error
            loss = loss + distill_weight * distill_loss
        return {
            "loss": loss,
            "qa_loss": qa_loss.detach(),
            "retrieval_loss": retrieval_loss.detach(),
            "document_loss": document_loss.detach(),
            "distill_loss": distill_loss.detach(),
            "retrieval_accuracy": accuracy.detach(),
        }

    @torch.no_grad()
    def _teacher_hidden_states(
        self, doc_ids: torch.Tensor, doc_mask: torch.Tensor, qa_ids: torch.Tensor, qa_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[layers, batch, Ta, hidden]`` hidden states of the frozen LM on ``qa_ids`` right after the documents."""
        ids = torch.cat([doc_ids, qa_ids], dim=1)
        mask = torch.cat([doc_mask, qa_mask], dim=1).to(torch.long)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        return torch.stack(out.hidden_states[1:])[:, :, doc_ids.shape[1] :]

    def _document_loss(self, memories: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-token loss of left-padded documents ``[b, T]`` after their own memories ``[b, layers, 2, H, m, d]``."""
        keys, values = assemble_prefix(self.compressor.rotary, memories.unsqueeze(1))
        cache = ReplayPrefixCache(self.config.backbone_config.num_hidden_layers, keys, values)  # one pass
        prefix = keys.shape[-2]
        mask = mask.to(torch.long)
        position_ids = prefix + (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([mask.new_ones(mask.shape[0], prefix), mask], dim=1)
        labels = ids.masked_fill(mask == 0, -100)
        out = self.backbone(
            input_ids=ids,
            attention_mask=full_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=True,
        )
        return out.loss


__all__ = ["CMTForCausalLM", "CMTPreTrainedModel"]
