"""Configuration of HMT (Hierarchical Memory Transformer, He et al., NAACL 2025) around a pretrained causal LM."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from hf_longmem.modeling.backbone import BackboneWrapperConfig
from hf_longmem.validation import check_int, check_real

#: LoRA targets of the official recipe (``hmt_src/main.py``) minus ``embed_tokens`` (see :class:`HMTConfig`).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _int(name: str, value: Any, low: int) -> int:
    return check_int(name, value, low=low)


class HMTConfig(BackboneWrapperConfig):
    """HMT: segment-level recurrence with one memory token per segment, sensory memory and memory recall.

    A long input is cut into segments of ``segment_length`` tokens ``H_n``. For segment ``n > 0``:

    1. summary: the backbone reads ``[T ‖ H_n[:j] ‖ T]`` (``T`` a learned summary embedding,
       ``j = summary_length``); its last output ``S_n`` is the query;
    2. recall: ``P_n = softmax((S_n W_q)(M W_k)ᵀ / √h) M`` over the bank ``M`` of the last ``num_memories`` memory
       embeddings (no value projection);
    3. the backbone reads ``[P_n ‖ H_{n-1}[-k:] ‖ H_n ‖ P_n]`` (``k = sensory_length``, the sensory memory); the
       logits of ``H_n`` are the outputs, and the last output ``m_n`` is appended to the bank.

    Segment 0 uses the learned initial memory embedding as ``P_0`` and has no sensory memory, as in the official code.
    Positions restart at 0 in every backbone call, so the backbone never sees positions beyond
    ``segment_length + sensory_length + 2`` however long the input is.

    Args:
        backbone_config, backbone_name_or_path, freeze_backbone: see ``BackboneWrapperConfig``.
        segment_length: tokens per segment ``L`` (official default 256).
        summary_fraction: ``j = round(L · summary_fraction)`` tokens of each segment enter the summary pass
            (official default 0.5).
        sensory_length: ``k``, tokens of the previous segment prepended to the next one (official default 0).
        num_memories: ``N``, memory embeddings kept in the bank for recall; the oldest is evicted (official 100).
        num_memory_tokens: ``M``, memory embeddings read and written per segment (official HMT: 1; the official
            ``MemoryCell`` of RMT, which HMT builds on, takes any number). With ``M > 1`` segment ``n`` reads the ``M``
            embeddings ``P_n`` at its start and writes the last ``M`` outputs ``m_n`` at its end; recall weights whole
            segments: keys are ``W_k`` of the mean of a segment's ``M`` memories, and ``P_n`` is the weighted sum of
            the segments' memories (exactly HMT's recall for ``M = 1``).
        recall_hidden_size: width ``h`` of the recall projections ``W_q``, ``W_k`` (default: the backbone's hidden
            size, as the official recipe's 4096 for 4096-wide backbones).
        use_recall: ``False`` is the official stage 1 (plain memory-token recurrence, ``P_n = m_{n-1}``, no summary
            pass); ``True`` is HMT.
        lora_rank: rank of LoRA adapters injected with peft into the backbone (0: none). LoRA parameters train even
            when ``freeze_backbone`` is set (official recipe: r=8, alpha=32, dropout 0.1).
        lora_alpha, lora_dropout: LoRA scaling and dropout.
        lora_target_modules: backbone module names that get LoRA adapters. The official recipe also adapts
            ``embed_tokens``; we leave it out by default because most small backbones tie it to the LM head.
        memory_scale: factor on a recalled memory ``P_n`` (``n > 0``) where the backbone reads it (official: 1.0; the
            bank and the recall keep the unscaled ``m_n``). ``m_n`` is a final-norm output (rms ≈ the final norm's
            weight, e.g. 1.4 for the embedded model) fed back as an input embedding (rms ≈ 0.12 there); a factor of
            about their ratio puts recalled memories on the scale of the token embeddings and of the learned ``P_0``.
            A deviation when not 1.0.
        memory_init_std: std of the learned memory and summary embeddings at initialisation (``None``: the
            backbone's ``initializer_range``); :meth:`HMTForCausalLM.from_backbone` uses the std of the pretrained
            input embeddings instead, as the official code does.
    """

    model_type = "hmt"

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        backbone_name_or_path: str | None = None,
        freeze_backbone: bool = True,
        segment_length: int = 256,
        summary_fraction: float = 0.5,
        sensory_length: int = 0,
        num_memories: int = 100,
        num_memory_tokens: int = 1,
        recall_hidden_size: int | None = None,
        use_recall: bool = True,
        lora_rank: int = 0,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | tuple[str, ...] | None = None,
        memory_scale: float = 1.0,
        memory_init_std: float | None = None,
        **kwargs,
    ):
        self.segment_length = _int("segment_length", segment_length, 1)
        self.summary_fraction = check_real("summary_fraction", summary_fraction, low=0.0, high=1.0, strict_low=True)
        self.sensory_length = _int("sensory_length", sensory_length, 0)
        if self.sensory_length > self.segment_length:
            raise ValueError(
                f"sensory_length ({sensory_length}) must not exceed segment_length ({segment_length}): the sensory "
                "memory is the tail of one previous segment"
            )
        self.num_memories = _int("num_memories", num_memories, 1)
        self.num_memory_tokens = _int("num_memory_tokens", num_memory_tokens, 1)
        self.recall_hidden_size = (
            None if recall_hidden_size is None else _int("recall_hidden_size", recall_hidden_size, 1)
        )
        self.use_recall = bool(use_recall)
        self.lora_rank = _int("lora_rank", lora_rank, 0)
        self.lora_alpha = check_real("lora_alpha", lora_alpha, low=0.0, strict_low=True)
        self.lora_dropout = check_real("lora_dropout", lora_dropout, low=0.0, high=1.0, strict_high=True)
        targets = list(DEFAULT_LORA_TARGETS if lora_target_modules is None else lora_target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"lora_target_modules must be a non-empty list of module names, got {lora_target_modules!r}"
            )
        self.lora_target_modules = targets
        self.memory_scale = check_real("memory_scale", memory_scale, low=0.0, strict_low=True)
        if memory_init_std is not None:
            check_real("memory_init_std", memory_init_std, low=0.0, strict_low=True, hint="or None")
        self.memory_init_std = memory_init_std
        super().__init__(
            backbone_config=backbone_config,
            backbone_name_or_path=backbone_name_or_path,
            freeze_backbone=freeze_backbone,
            **kwargs,
        )

    @property
    def summary_length(self) -> int:
        """``j``: tokens of a segment that the summary pass reads (at least 1)."""
        return max(1, min(self.segment_length, int(round(self.segment_length * self.summary_fraction))))


__all__ = ["HMTConfig", "DEFAULT_LORA_TARGETS"]
