"""Replaying the layers below the side memory: their output is recorded once per edit and reused by every
optimisation step (only the side memory and the layers above it change)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


class _Recorded(nn.Module):
    """Stands in for a decoder layer below the side memory during an edit: returns the recorded output of the last
    of them (their inputs and outputs do not depend on the side memory). Other attributes (``attention_type``, ...)
    are read from the layer it replaces."""

    def __init__(self, layer: nn.Module, output: Any):
        super().__init__()
        self._replaced = (layer,)
        self._output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._output

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._replaced[0], name)


class LowerLayerCache:
    """Runs the decoder layers below the edited one once per edit instead of once per optimisation step.

    The side memory sits in layer ``L``; layers ``0..L-1`` see the same input at every step of an edit, so their
    output is recorded on the first forward and reused afterwards. Results are identical (checked once per
    editor against a full forward; on any mismatch or error the editor falls back to full forwards).
    """

    def __init__(self, model: nn.Module, target_module: str):
        from .side_memory import _LAYER_PATTERN

        self.layers: nn.ModuleList | None = None
        self.index = 0
        self.enabled = True
        self.verified = False
        match = _LAYER_PATTERN.match(target_module)
        if match is not None:
            try:
                layers = model.get_submodule(match["prefix"])
            except AttributeError:
                layers = None
            if isinstance(layers, nn.ModuleList) and int(match["index"]) > 0:
                self.layers, self.index = layers, int(match["index"])
        if self.layers is None:
            self.enabled = False

    @contextlib.contextmanager
    def record(self) -> Iterator[list[Any]]:
        """Record the output of layer ``L - 1`` during the forwards inside the block."""
        box: list[Any] = []
        if not self.enabled:
            yield box
            return

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            box[:] = [output]

        handle = self.layers[self.index - 1].register_forward_hook(hook)
        try:
            yield box
        finally:
            handle.remove()

    @contextlib.contextmanager
    def reuse(self, output: Any) -> Iterator[None]:
        """Replace layers ``0..L-1`` by stand-ins returning ``output`` inside the block."""
        originals = [self.layers[i] for i in range(self.index)]
        try:
            for i, layer in enumerate(originals):
                self.layers[i] = _Recorded(layer, output)
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
