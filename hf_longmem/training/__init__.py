"""Training utilities shared by the recipes: long-sequence memory options (:mod:`.long_sequence`)."""

from hf_longmem.training.long_sequence import (
    ActivationOffload,
    LongSequenceOptions,
    SavedTensorBytes,
    chunked_causal_lm_loss,
    chunked_token_cross_entropy,
    enable_activation_checkpointing,
    lm_head_bypassed,
    next_token_cross_entropy,
)

__all__ = [
    "ActivationOffload",
    "LongSequenceOptions",
    "SavedTensorBytes",
    "chunked_causal_lm_loss",
    "chunked_token_cross_entropy",
    "enable_activation_checkpointing",
    "lm_head_bypassed",
    "next_token_cross_entropy",
]
