"""Seeing the model's own next-token distributions from inside a cache.

``generate`` computes logits for the last position only, but SirLLM (token self-information) and EM-LLM
(surprise) need them for every new token. A forward hook on the base model (the decoder stack) hands the last hidden
states of each forward that uses a given cache to a callback, together with a projection to logits.

The projection is the model's output embedding, plus the final-logit softcapping and scaling that some models apply
(Gemma-2 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``). Whether it really is the
model's head is checked, not assumed: a second hook on the whole model compares, on the first forward, the model's
own logits of the last position with the projection of its hidden state, and refuses the model (``ValueError``, before
any token is generated) where they differ — a model with another head in between (ModernBERT's decoder) would
otherwise be scored with a distribution that is not its own.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

import torch

#: Largest difference between the model's logits and the projection that is still "the same head": both are float
#: computations of the same matmul on the same hidden state; 1e-3 relative to the logits' scale covers a reduction
#: order that differs between a batched and a sliced call.
_HEAD_TOLERANCE = 1e-3


class _Hooks:
    """The two hook handles, removed together (``.remove()``, as a ``RemovableHandle``)."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def logits_projection(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """``hidden [batch, q, hidden_size] -> logits [batch, q, vocab]`` as the model's head computes them (float32)."""
    lm_head = model.get_output_embeddings()
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)

    def project(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        if isinstance(divide, (int, float)) and not isinstance(divide, bool) and divide:
            logits = logits / divide
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.float()

    return project


def decoder_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module of ``model`` that runs the decoder layers with the cache: ``get_decoder()`` when that module takes a
    cache argument, else ``base_model``, else ``model`` itself.

    ``get_decoder()`` is not always the decoder stack: on ModernBERT-decoder it returns the LM head's ``Linear``
    (named ``decoder`` there), where a hook would never see a forward that uses the cache.
    """
    get_decoder = getattr(model, "get_decoder", None)
    candidates = [get_decoder() if callable(get_decoder) else None, getattr(model, "base_model", None), model]
    for candidate in candidates:
        if isinstance(candidate, torch.nn.Module):
            params = inspect.signature(candidate.forward).parameters
            if "cache" in params or "past_key_values" in params:
                return candidate
    return model


def attach_output_hook(model, cache, callback: Callable[..., None], method: str) -> _Hooks:
    """Calls ``callback(cache, input_ids, hidden, project)`` after every decoder forward that uses ``cache``.

    Args:
        model: a causal LM (its decoder stack, :func:`decoder_module`, and ``get_output_embeddings()``).
        cache: the cache whose forwards are observed (held weakly: the hooks are removed when it is collected).
        callback: receives ``input_ids`` ``[batch, q]``, ``hidden`` ``[batch, q, hidden_size]`` and ``project``
            (:func:`logits_projection`), under ``torch.no_grad()``.
        method: name used in error messages.

    Returns:
        A handle whose ``.remove()`` detaches the hooks.
    """
    if model.get_output_embeddings() is None:
        raise ValueError(f"{method} needs a causal LM with an output embedding (lm_head) to score tokens")
    base = decoder_module(model)
    project = logits_projection(model)
    cache_ref = weakref.ref(cache)
    state = {"last": None, "verified": False}

    def uses_cache(kwargs) -> bool:
        observed = cache_ref()
        return observed is not None and kwargs.get("cache", kwargs.get("past_key_values")) is observed

    def base_hook(module, args, kwargs, output):
        if not uses_cache(kwargs):
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(f"{method} scores tokens by id: call the model with input_ids, not inputs_embeds")
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        with torch.no_grad():
            if not state["verified"]:
                state["last"] = project(hidden[:, -1:])
            callback(cache_ref(), input_ids, hidden, project)

    def model_hook(module, args, kwargs, output):
        if state["verified"] or state["last"] is None or not uses_cache(kwargs):
            return
        logits = output[0] if isinstance(output, tuple) else getattr(output, "logits", None)
        if logits is None:
            return
        mine, theirs = state["last"], logits[:, -1:].detach().float()
        state["last"] = None
        tolerance = _HEAD_TOLERANCE * max(1.0, float(theirs.abs().max()))
        if mine.shape != theirs.shape or float((mine - theirs).abs().max()) > tolerance:
            raise ValueError(
                f"unsupported model: {method} scores tokens with the model's next-token distribution, and "
                f"{type(model).__name__}'s logits are not its output embedding applied to the base model's last hidden "
                "state (another head sits in between), so the scores would not be the model's own"
            )
        state["verified"] = True

    handles = _Hooks(
        base.register_forward_hook(base_hook, with_kwargs=True),
        model.register_forward_hook(model_hook, with_kwargs=True),
    )
    weakref.finalize(cache, handles.remove)
    return handles
