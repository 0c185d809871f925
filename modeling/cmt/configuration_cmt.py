"""Configuration of CMT (Compression Memory Training, Li et al., AAAI 2025, arXiv 2412.07393) around a frozen LM."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from hf_longmem.modeling.backbone import BackboneWrapperConfig
from hf_longmem.validation import check_int, check_real


def _int(name: str, value: Any, low: int) -> int:
    return check_int(name, value, low=low)


class CMTConfig(BackboneWrapperConfig):
    """CMT: compress documents into memory slots with the frozen LM plus a trained compressor, store them in a bank,
    retrieve the top memories for a question by self-matching and let the frozen LM attend to them as a KV prefix.

    Args:
        backbone_config: the frozen causal LM's config (Llama / Mistral / Qwen2 shapes: RoPE, ``q/k/v/o_proj``).
        backbone_name_or_path: where the backbone weights came from (model cards).
        freeze_backbone: keep the LM's own weights frozen (CMT never changes them; ``True``).
        num_memory_tokens: ``m``, memory slots per document: learned token embeddings appended to a document whose
            per-layer keys/values (computed by the LoRA-adapted LM) are its compressed memory.
        lora_rank: rank of the compressor's LoRA adapters (active only while compressing).
        lora_alpha: LoRA scaling numerator (the update is ``alpha / rank * B A x``).
        lora_target_modules: names of the backbone's linear layers that get a compressor adapter.
        retrieval_dim: width of the self-matching key (a projection of the memory slots' mean last hidden state).
        retrieval_temperature: softmax temperature of the self-matching scores (cosine similarities).
        memory_top_k: memories aggregated into the prefix for a question (``0``: never read memory).
        max_memories: capacity of the model's memory bank; the oldest memories are evicted beyond it.
        max_document_tokens: documents longer than this are split (at sentence ends) into several memories.
    """

    model_type = "cmt"

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        backbone_name_or_path: str | None = None,
        freeze_backbone: bool = True,
        num_memory_tokens: int = 16,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_target_modules: list[str] | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        retrieval_dim: int | None = None,
        retrieval_temperature: float = 0.05,
        memory_top_k: int = 2,
        max_memories: int = 4096,
        max_document_tokens: int = 256,
        **kwargs,
    ):
        if not freeze_backbone:
            raise ValueError("freeze_backbone must be True for CMT: the LLM's own weights never change")
        self.num_memory_tokens = _int("num_memory_tokens", num_memory_tokens, 1)
        self.lora_rank = _int("lora_rank", lora_rank, 1)
        self.lora_alpha = check_real("lora_alpha", lora_alpha, low=0.0, strict_low=True)
        targets = [lora_target_modules] if isinstance(lora_target_modules, str) else list(lora_target_modules)
        if not targets or not all(isinstance(name, str) and name for name in targets):
            raise ValueError(
                f"lora_target_modules must be a non-empty list of module names, got {lora_target_modules!r}"
            )
        self.lora_target_modules = targets
        self.retrieval_temperature = check_real(
            "retrieval_temperature", retrieval_temperature, low=0.0, strict_low=True
        )
        self.memory_top_k = _int("memory_top_k", memory_top_k, 0)
        self.max_memories = _int("max_memories", max_memories, 1)
        self.max_document_tokens = _int("max_document_tokens", max_document_tokens, 1)
        super().__init__(
            backbone_config=backbone_config,
            backbone_name_or_path=backbone_name_or_path,
            freeze_backbone=freeze_backbone,
            **kwargs,
        )
        if retrieval_dim is None and self.backbone_config is not None:
            retrieval_dim = self.backbone_config.hidden_size
        self.retrieval_dim = None if retrieval_dim is None else _int("retrieval_dim", retrieval_dim, 1)
