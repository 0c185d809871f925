"""What a cache learns about a forward pass that the model's attention does not hand to ``Cache.update``.

Most transformers decoders call ``cache.update(k, v, layer_idx, kwargs=kwargs)`` with ``position_ids`` among the
kwargs, which is how a cache layer tells pads from real tokens (:mod:`hf_longmem.memory.padding`). Some do not:
GPT-NeoX, Falcon, GPT-Neo, Bloom, CTRL call ``update(k, v, layer_idx)`` with no kwargs at all; StableLM (and others)
take ``position_ids`` as a named parameter of the attention, so it never reaches the kwargs. A cache there would
assume no padding and keep (and score) pads as real tokens.

:func:`track_step_inputs` (``make_cache(name, model)`` calls it) registers, once per model:

* a forward pre-hook on the decoder (the module that receives ``position_ids``/``attention_mask`` from
  ``generate``), which hands them to an hf_longmem cache passed to that forward (:class:`StepInputs`, stamped with
  the tokens the cache had seen, so a later forward without the hook cannot use them); with any other cache it does
  nothing;
* on attention modules whose ``update`` call passes no kwargs, a forward pre-hook that puts a :class:`AttentionHandoff`
  into the attention kwargs, so a cache layer that needs the queries (SnapKV, H2O, ...) still gets the attention
  call (the layer cannot put itself into kwargs it never receives). It is only added when the model runs hf_longmem
  attention, and hands the call back to the model's own attention when no layer takes it.

A cache built from a config alone and used on such a model knows nothing about padding: it refuses a batch of more
than one row (``LongMemCache.update``) rather than guess.
"""

from __future__ import annotations

import inspect
import re
import weakref

import torch

from hf_longmem.attention import LAYER_KWARG, fallback_attention, uses_longmem_attention

#: Attribute under which a model keeps its :class:`_Tracker` (the hooks are registered once).
TRACKER_ATTRIBUTE = "_hf_longmem_step_tracker"


class StepInputs:
    """The decoder's ``position_ids`` / 2-D ``attention_mask`` of one forward pass.

    Args:
        position_ids: ``[batch or 1, q]`` or ``None``.
        attention_mask: ``[batch, seen + q]`` (1 = real token) or ``None`` (other mask formats are ignored).
        seen: tokens the cache had seen before this forward.
    """

    __slots__ = ("position_ids", "attention_mask", "seen", "_from_mask")

    def __init__(self, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, seen: int):
        self.position_ids = position_ids
        self.seen = seen  # tokens the cache had seen when the forward began: the inputs are for the next ones
        is_2d = isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2
        self.attention_mask = attention_mask if is_2d else None
        self._from_mask: torch.Tensor | None = None

    def position_ids_for(self, num_new: int) -> torch.Tensor | None:
        """``[batch or 1, num_new]`` positions of the new tokens, or ``None`` (no pads: positions continue the count).

        The model's ``position_ids`` when it got them; else derived from a 2-D attention mask as ``generate`` does
        (``mask.cumsum(-1) - 1``, pads at 1); else ``None``: a forward without either has no pads.
        """
        if self.position_ids is not None:
            return self.position_ids[..., -num_new:]
        if self.attention_mask is None:
            return None
        if self._from_mask is None:
            mask = self.attention_mask.to(torch.long)
            self._from_mask = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return self._from_mask[:, -num_new:]


class AttentionHandoff:
    """Stands in for a cache layer in the attention kwargs of a model whose ``update`` takes no kwargs.

    The cache sets :attr:`layer` in ``update`` when its layer asks for the attention call; hf_longmem's attention
    function then calls :meth:`attend`, which passes the call to that layer, or to the model's own attention.
    """

    __slots__ = ("layer", "armed")

    def __init__(self):
        self.layer = None
        self.armed = False  # a pre-hook put this object into the coming attention call's kwargs

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer, self.layer, self.armed = self.layer, None, False
        if layer is not None:
            return layer.attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        fn = fallback_attention(module, module.config._attn_implementation)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


class _Tracker:
    """The hooks of one model; holds the hf_longmem cache of the last forward (weakly)."""

    def __init__(self, decoder: torch.nn.Module):
        self.cache_ref = None
        self.handles = [decoder.register_forward_pre_hook(self._before, with_kwargs=True)]
        self.forward_params = list(inspect.signature(decoder.forward).parameters)
        self.handoff_modules = 0
        for module in decoder.modules():
            if isinstance(
                getattr(module, "layer_idx", getattr(module, "layer_id", None)), int
            ) and _update_takes_no_kwargs(type(module)):
                self.handles.append(module.register_forward_pre_hook(self._before_attention, with_kwargs=True))
                self.handoff_modules += 1

    def cache(self):
        return None if self.cache_ref is None else self.cache_ref()

    def _before(self, module, args, kwargs):
        from hf_longmem.cache_classes.base import LongMemCache

        named = dict(zip(self.forward_params, args)) if args else {}
        named.update(kwargs)
        cache = named.get("cache", named.get("past_key_values"))
        if not isinstance(cache, LongMemCache):
            self.cache_ref = None
            return None
        cache.step_inputs = StepInputs(named.get("position_ids"), named.get("attention_mask"), cache.get_seq_length())
        cache.handoff.layer, cache.handoff.armed = None, False
        self.cache_ref = weakref.ref(cache)
        return None

    def _before_attention(self, module, args, kwargs):
        cache = self.cache()
        if cache is None or not uses_longmem_attention(getattr(module, "config", None)) or LAYER_KWARG in kwargs:
            return None
        cache.handoff.armed = True
        return args, {**kwargs, LAYER_KWARG: cache.handoff}


_NO_KWARGS_CACHE: dict[type, bool] = {}


def _update_takes_no_kwargs(cls: type) -> bool:
    """Whether ``cls.forward`` calls ``<cache>.update(..., layer_idx)`` without passing its kwargs on.

    Such a module's attention kwargs never reach the cache; it needs :class:`AttentionHandoff` (and must accept
    ``**kwargs`` to receive it).
    """
    if cls not in _NO_KWARGS_CACHE:
        try:
            source = inspect.getsource(cls.forward)
            takes_var_kwargs = any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.forward).parameters.values()
            )
        except (OSError, TypeError, ValueError):
            source, takes_var_kwargs = "", False
        calls = re.findall(r"\.update\(([^()]*)\)", source)
        _NO_KWARGS_CACHE[cls] = takes_var_kwargs and any("layer_id" in call and "kwargs" not in call for call in calls)
    return _NO_KWARGS_CACHE[cls]


def _decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if isinstance(decoder, torch.nn.Module):
            return decoder
    return model


def track_step_inputs(model: torch.nn.Module) -> None:
    """Lets hf_longmem caches see ``position_ids``/``attention_mask`` on ``model`` (idempotent; see module docs).

    Harmless with any other cache: the hooks only act when the forward's cache is an hf_longmem cache.
    """
    decoder = _decoder_of(model)
    if getattr(decoder, TRACKER_ATTRIBUTE, None) is None:
        # not an nn.Module attribute (no state_dict / deepcopy surprises beyond a plain object)
        object.__setattr__(decoder, TRACKER_ATTRIBUTE, _Tracker(decoder))


def untrack_step_inputs(model: torch.nn.Module) -> None:
    """Removes the hooks :func:`track_step_inputs` added (no-op if none)."""
    decoder = _decoder_of(model)
    tracker = getattr(decoder, TRACKER_ATTRIBUTE, None)
    if tracker is not None:
        for handle in tracker.handles:
            handle.remove()
        object.__delattr__(decoder, TRACKER_ATTRIBUTE)


__all__ = ["AttentionHandoff", "StepInputs", "track_step_inputs", "untrack_step_inputs"]
