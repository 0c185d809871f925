"""Seeing the model's own next-token distributions from inside a cache.

``generate`` computes logits for the last position only, but SirLLM (token self-information) and EM-LLM
(surprise) need them for every new token. A forward hook on the decoder hands the last hidden states of each forward
that uses a given cache to a callback, together with the model's LM head to project them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle


def attach_output_hook(
    model, cache, callback: Callable[..., None], method: str
) -> RemovableHandle:
    """Calls ``callback(cache, input_ids, hidden, lm_head)`` after every decoder forward that uses ``cache``.

    Args:
        model: a causal LM (``get_decoder()``/``base_model`` and ``get_output_embeddings()``).
        cache: the cache whose forwards are observed (held weakly: the hook is removed when it is collected).
        callback: receives ``input_ids`` ``[batch, q]``, ``hidden`` ``[batch, q, hidden_size]`` and the LM head,
            under ``torch.no_grad()``.
        method: name used in error messages.

    Returns:
        The hook handle (``.remove()`` detaches it).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{method} needs a causal LM with an output embedding (lm_head) to score tokens")
    cache_ref = weakref.ref(cache)

    def hook(module, args, kwargs, output):
        observed = cache_ref()
        if observed is None or kwargs.get("cache", kwargs.get("past_key_values")) is not observed:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(f"{method} scores tokens by id: call the model with input_ids, not inputs_embeds")
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        with torch.no_grad():
            callback(observed, input_ids, hidden, lm_head)

    handle = decoder.register_forward_hook(hook, with_kwargs=True)
    weakref.finalize(cache, handle.remove)
    return handle
