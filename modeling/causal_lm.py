"""Pieces the five memory architectures (Titans, MoM, LongMem, HMT, CMT) share on top of ``PreTrainedModel``.

- :class:`MemoryModelMixin`: what a model cannot do is *declared* (``_unsupported_features``: feature -> reason) and
  refused with a ``ValueError`` naming the feature, never silently ignored; ``output_attentions`` /
  ``output_hidden_states`` resolve against the config as in transformers.
- :func:`can_return_tuple` (transformers' own decorator) turns a ``ModelOutput`` into a tuple for
  ``return_dict=False``; every ``forward`` of the five is wrapped with it.
- :func:`causal_lm_logits` / :func:`shifted_cross_entropy`: the logits slice and the shifted next-token loss.

The embedding accessors of Titans/MoM are transformers' defaults (``self.model.embed_tokens``, ``self.lm_head``); the
wrappers delegate them to their backbone (:class:`hf_longmem.modeling.backbone.BackboneEmbeddingsMixin`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.generic import can_return_tuple

__all__ = [
    "MemoryModelMixin",
    "can_return_tuple",
    "causal_lm_logits",
    "last_hidden_state_last",
    "shifted_cross_entropy",
]

#: Features a model may declare in ``_unsupported_features`` (what the conformance suite checks as refusals).
KNOWN_FEATURES = ("output_attentions", "inputs_embeds", "padded_batches", "gradient_checkpointing")


class MemoryModelMixin:
    """Declared capabilities of a memory architecture (mix in before ``PreTrainedModel``).

    ``_unsupported_features`` maps a feature of :data:`KNOWN_FEATURES` to the reason the architecture cannot have it;
    :meth:`refuse` raises the ``ValueError`` that names it. ``supports_gradient_checkpointing`` and ``_supports_sdpa``
    keep their transformers meaning.
    """

    _unsupported_features: ClassVar[dict[str, str]] = {}

    @classmethod
    def supports_feature(cls, feature: str) -> bool:
        """Whether ``feature`` (one of :data:`KNOWN_FEATURES`) is supported."""
        if feature not in KNOWN_FEATURES:
            raise ValueError(f"unknown feature {feature!r}; known: {KNOWN_FEATURES}")
        if feature == "gradient_checkpointing":
            return bool(getattr(cls, "supports_gradient_checkpointing", False))
        return feature not in cls._unsupported_features

    def refuse(self, feature: str) -> None:
        """Raise the ``ValueError`` that names ``feature`` and why this architecture cannot have it."""
        reason = self._unsupported_features.get(feature, "declared unsupported")
        raise ValueError(f"{feature} is not supported by {type(self).__name__}: {reason}")

    def resolve_output_flags(
        self, output_attentions: bool | None, output_hidden_states: bool | None
    ) -> tuple[bool, bool]:
        """``(output_attentions, output_hidden_states)`` with the config's defaults; refuses declared-unsupported ones."""
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if output_attentions and "output_attentions" in self._unsupported_features:
            self.refuse("output_attentions")
        return bool(output_attentions), bool(output_hidden_states)

    #: The memory cache class ``generate`` builds (with ``make_cache()``) and accepts from the user; ``None``: the
    #: model prepares its caches itself (or as transformers does).
    memory_cache_class: ClassVar[type | None] = None

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """With :attr:`memory_cache_class` set: honour a user-supplied cache of that class (another one is refused
        with a ``ValueError``), else build ``self.make_cache()`` unless ``use_cache=False``."""
        if self.memory_cache_class is None:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        user_cache = model_kwargs.get("cache")
        if user_cache is not None:
            if not isinstance(user_cache, self.memory_cache_class):
                raise ValueError(
                    f"cache must be a {self.memory_cache_class.__name__} for {type(self).__name__}, "
                    f"got {type(user_cache).__name__}"
                )
            user_cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = self.make_cache()

    def _assisted_decoding(self, *args, **kwargs):
        """Refused for stateful models (``_is_stateful``): assisted decoding rolls rejected candidate tokens back out
        of the cache, and a recurrent memory cannot be rolled back."""
        if getattr(self, "_is_stateful", False):
            raise ValueError(
                f"assisted decoding (assistant_model / prompt_lookup_num_tokens) is not supported by "
                f"{type(self).__name__}: the model is stateful (_is_stateful) and rejected candidate tokens cannot be "
                "rolled back out of its recurrent memory"
            )
        return super()._assisted_decoding(*args, **kwargs)


def last_hidden_state_last(states: list[torch.Tensor] | tuple, last: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``hidden_states`` as transformers returns them: the embeddings, every layer's output, and in place of the last
    layer's raw output the final-norm output ``last`` (what the LM head reads), i.e. ``num_layers + 1`` tensors."""
    return (*tuple(states)[:-1], last)


def causal_lm_logits(lm_head: nn.Module, hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """``lm_head`` over the positions ``logits_to_keep`` selects (``0``: all; an int ``k``: the last ``k``; a tensor:
    those indices), as transformers' models do.

    Args:
        hidden: ``[batch, seq, hidden]``.

    Returns:
        ``[batch, kept, vocab]``.
    """
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return lm_head(hidden[:, keep, :])


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: position ``t`` predicts ``labels[t + 1]``; ``-100`` labels are ignored.

    Args:
        logits: ``[batch, seq, vocab]`` (all positions: ``logits_to_keep=0``).
        labels: ``[batch, seq]``.
    """
    if logits.shape[1] != labels.shape[1]:
        raise ValueError(
            f"`labels` ({labels.shape[1]} positions) need logits for every position (got {logits.shape[1]}: "
            "pass logits_to_keep=0 with labels)"
        )
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
    )
