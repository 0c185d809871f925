"""The attention function hf_longmem registers with transformers.

Methods that need the queries or the attention scores (H2O, SnapKV, ThinK, DuoAttention, InfLLM, ...) get them
here: a cache layer that wants to take part puts itself into the attention kwargs during ``Cache.update`` (the
kwargs dict that models spread into the attention function), and this function calls its ``attend``. Any other
call falls back to the attention the model used before (SDPA, or eager), with the matching mask, so a model set to
``hf_longmem`` attention behaves exactly as before with any other cache.

Two names are registered: ``"hf_longmem"`` (falls back to SDPA) and ``"hf_longmem_eager"`` (falls back to the
model's own eager attention, which returns attention weights).
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_longmem.memory.attention_features import check_attention_kwargs, model_name

ATTENTION_NAME = "hf_longmem"
EAGER_ATTENTION_NAME = "hf_longmem_eager"
#: Key under which a cache layer puts itself into the attention kwargs.
LAYER_KWARG = "longmem_layer"

_FALLBACK = {ATTENTION_NAME: "sdpa", EAGER_ATTENTION_NAME: "eager"}


def _eager_attention_for(module: torch.nn.Module):
    """The model's own ``eager_attention_forward`` (defined next to its attention class)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def fallback_attention(module: torch.nn.Module, implementation: str):
    """The attention function a ``hf_longmem`` attention name stands in for."""
    fallback = _FALLBACK.get(implementation, "sdpa")
    if fallback == "eager":
        return _eager_attention_for(module)
    return ALL_ATTENTION_FUNCTIONS[fallback]


def _make_attention(implementation: str):
    def longmem_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query ``[batch, q_heads, q, head_dim]``; key/value ``[batch, kv_heads, kv, head_dim]``.

        The parameter order is ``sdpa_attention_forward``'s (``dropout`` before ``scaling``), so wrappers that pass
        ``dropout`` positionally, as kvpress's attention patch does, keep working.

        Returns ``([batch, q, q_heads, head_dim], weights or None)`` as every transformers attention does.
        """
        layer = kwargs.pop(LAYER_KWARG, None)
        if _FALLBACK[implementation] == "sdpa" and _has_sinks(module, kwargs):
            raise ValueError(
                f"unsupported model: {model_name(module)} has attention sinks, which SDPA ignores; run it with "
                f"attn_implementation='eager' (hf_longmem then uses {EAGER_ATTENTION_NAME!r})"
            )
        if layer is not None:
            check_attention_kwargs(module, kwargs, type(layer).__name__)
            return layer.attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        fn = fallback_attention(module, implementation)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    longmem_attention_forward.__name__ = f"{implementation}_attention_forward"
    return longmem_attention_forward


def _has_sinks(module: torch.nn.Module, kwargs: dict) -> bool:
    return kwargs.get("s_aux") is not None or isinstance(getattr(module, "sinks", None), torch.Tensor)


def _make_mask(implementation: str):
    fallback = _FALLBACK[implementation]

    def longmem_mask(*args, **kwargs):
        return ALL_MASK_ATTENTION_FUNCTIONS[fallback](*args, **kwargs)

    return longmem_mask


def register_attention() -> None:
    """Registers both names and their mask functions with transformers (idempotent, cheap)."""
    for name in _FALLBACK:
        AttentionInterface.register(name, _make_attention(name))
        AttentionMaskInterface.register(name, _make_mask(name))


def longmem_attention_name(current: str | None, supports_sdpa: bool = True) -> str:
    """The hf_longmem attention name that falls back to ``current`` (eager for models SDPA cannot run exactly:
    ``_supports_sdpa = False``, e.g. Gemma-2's softcap, GPT-OSS's sinks)."""
    if current in _FALLBACK:
        return current
    return EAGER_ATTENTION_NAME if current == "eager" or not supports_sdpa else ATTENTION_NAME


def enable_longmem_attention(model) -> str:
    """Routes ``model``'s attention through hf_longmem, keeping its current kind as the fallback.

    A model on ``eager`` goes to ``"hf_longmem_eager"``; on ``sdpa`` (or anything else) to ``"hf_longmem"``, except
    models that declare ``_supports_sdpa = False`` (their attention does what SDPA cannot: softcap, sinks), which go
    to ``"hf_longmem_eager"``. With a cache that does not take part, outputs are unchanged. Returns the name now in
    use.
    """
    register_attention()
    current = getattr(model.config, "_attn_implementation", None)
    name = longmem_attention_name(current, getattr(model, "_supports_sdpa", True) is not False)
    if current != name:
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise ValueError(
                f"unsupported model: {type(model).__name__} cannot switch its attention implementation "
                "(it does not use transformers' AttentionInterface)"
            )
    return name


def uses_longmem_attention(config) -> bool:
    return getattr(config, "_attn_implementation", None) in _FALLBACK
