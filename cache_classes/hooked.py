"""Caches that observe the model through forward hooks (SirLLM, EM-LLM, InfLLM), and their deep copies.

``make_cache`` attaches hooks to the model that see only the forwards using *their* cache (SirLLM's token scores,
EM-LLM's surprise, the pads of InfLLM/EM-LLM), and the layers of these caches reach their cache through a weak
reference. ``copy.deepcopy`` is how a compressed cache is rolled back (the harness's shared-context and choice
modes), and a plain deep copy would keep the weak references and the hooks of the original: the copy's layers would
read and change the original's state, and no hook would score the copy's forwards. SirLLM then failed on the second
question of a shared context, or decayed one set of scores for every copy.

:class:`ModelHookedCache` makes a deep copy a cache of its own: every weak reference of its layers to the original
points to the copy, layers built later are built for the copy (the layer factories are bound methods, which
``deepcopy`` rebinds), and the copy attaches its own hooks to the same model (removed when it is closed or collected).
"""

from __future__ import annotations

import copy
import weakref


class ModelHookedCache:
    """Mixin (before :class:`~hf_longmem.cache_classes.base.LongMemCache`) for caches with model hooks.

    Subclasses implement :meth:`attach` (which calls :meth:`remember_model`) and name the attributes holding hook
    handles in :attr:`hook_attributes`.
    """

    #: Attributes holding hook handles: not copied (the copy attaches its own).
    hook_attributes: tuple[str, ...] = ()

    def attach(self, model) -> None:
        raise NotImplementedError

    def remember_model(self, model) -> None:
        """Keeps ``model`` (weakly) so that a deep copy can attach its own hooks to it."""
        self._hooked_model = weakref.ref(model)

    def __deepcopy__(self, memo):
        cls = type(self)
        clone = cls.__new__(cls)
        memo[id(self)] = clone
        skipped = {*self.hook_attributes, "_hooked_model"}
        for name, value in vars(self).items():
            setattr(clone, name, None if name in skipped else copy.deepcopy(value, memo))
        for layer in clone.layers:
            for name, value in list(vars(layer).items()):
                if isinstance(value, weakref.ref) and value() is self:
                    setattr(layer, name, weakref.ref(clone))
        model_ref = vars(self).get("_hooked_model")
        model = model_ref() if model_ref is not None else None
        if model is not None:
            clone.attach(model)
        return clone
