"""One memory-accounting protocol for every cache, layer and store: ``memory_parts`` -> ``memory_breakdown`` ->
``memory_bytes``.

* ``memory_parts()`` -> ``{part: (where, bytes)}``: what is held, by name, and where: ``"resident"`` (on the compute
  device) or ``"offloaded"`` (in CPU memory while the model runs elsewhere). The only method a class writes.
* ``memory_breakdown()`` -> ``{"resident": bytes, "offloaded": bytes}``: the parts summed by location.
* ``memory_bytes()`` -> every byte held, resident and offloaded.

A cache sums its layers' parts by name (a layer without ``memory_parts``, e.g. one of transformers' own layers in a
model mixing attention types, counts as ``other_layers``) and adds its own state with ``extra_memory_parts()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

RESIDENT = "resident"
OFFLOADED = "offloaded"
LOCATIONS = (RESIDENT, OFFLOADED)

MemoryParts = dict[str, tuple[str, int]]


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the tensors given (``None`` and non-tensors count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def bytes_by_location(parts: Mapping[str, tuple[str, int]]) -> dict[str, int]:
    """Sums ``{part: (where, bytes)}`` (a ``memory_parts()`` result) into ``{"resident": ..., "offloaded": ...}``."""
    total = dict.fromkeys(LOCATIONS, 0)
    for where, size in parts.values():
        if where not in total:
            raise ValueError(f"memory part location must be one of {LOCATIONS}, got {where!r}")
        total[where] += size
    return total


def merge_parts(into: MemoryParts, parts: Mapping[str, tuple[str, int]]) -> MemoryParts:
    """Adds ``parts`` to ``into`` by name (a name keeps the location it was first given) and returns ``into``."""
    for name, (where, size) in parts.items():
        into[name] = (into[name][0] if name in into else where, (into[name][1] if name in into else 0) + size)
    return into


def layer_memory_parts(layer) -> MemoryParts:
    """``layer.memory_parts()``, or the keys and values of a layer that has none (``other_layers``, resident)."""
    if hasattr(layer, "memory_parts"):
        return layer.memory_parts()
    if not getattr(layer, "is_initialized", False):
        return {}
    return {"other_layers": (RESIDENT, tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None)))}


class MemoryReport:
    """``memory_breakdown`` and ``memory_bytes`` derived from ``memory_parts`` (which the class defines)."""

    def memory_parts(self) -> MemoryParts:  # pragma: no cover - every user overrides it
        raise NotImplementedError(f"{type(self).__name__} must define memory_parts()")

    def memory_breakdown(self) -> dict[str, int]:
        """``{"resident": bytes on the compute device, "offloaded": bytes in CPU memory}``."""
        return bytes_by_location(self.memory_parts())

    def memory_bytes(self) -> int:
        """Every byte held, resident and offloaded."""
        return sum(self.memory_breakdown().values())


class CacheMemoryReport(MemoryReport):
    """For a cache with ``self.layers``: its layers' parts summed by name, plus :meth:`extra_memory_parts`."""

    layers: Iterable

    def memory_parts(self) -> MemoryParts:
        parts: MemoryParts = {}
        for layer in self.layers:
            merge_parts(parts, layer_memory_parts(layer))
        return merge_parts(parts, self.extra_memory_parts())

    def extra_memory_parts(self) -> MemoryParts:
        """State the cache holds besides its layers (none by default)."""
        return {}


def memory_bytes_of(cache) -> int:
    """Bytes held by any transformers cache: ours report their own, others are summed from their layers' tensors."""
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    return sum(size for layer in cache.layers for _, size in layer_memory_parts(layer).values())


__all__ = [
    "CacheMemoryReport",
    "MemoryParts",
    "MemoryReport",
    "bytes_by_location",
    "layer_memory_parts",
    "memory_bytes_of",
    "merge_parts",
    "tensor_bytes",
]
