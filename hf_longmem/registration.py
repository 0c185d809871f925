"""How hf_longmem finds its methods: each registers itself where it is defined, and its package imports it.

One pattern for every kind of method:

* a cache module of ``hf_longmem.cache_classes`` calls :func:`hf_longmem.registry.register_cache` below its class;
* an architecture package of ``hf_longmem.modeling`` calls :func:`hf_longmem.modeling.register_architecture` in its
  ``__init__``;
* a continual strategy module of ``hf_longmem.continual`` decorates its class with
  :func:`hf_longmem.continual.register_strategy`.

The package then imports every such module with :func:`import_submodules` (no list to edit), so a new method is one
new module (or architecture package) plus its test, and the shared tests enumerate the registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(
    package: str, path: Iterable[str], skip: Iterable[str] = (), packages_only: bool = False
) -> list[str]:
    """Imports the submodules of ``package`` (its ``__name__`` and ``__path__``) by name, each registering what it
    defines.

    Args:
        package: the package's dotted name.
        path: the package's ``__path__``.
        skip: submodule names that hold shared machinery, not a method (names starting with ``_`` are skipped too).
        packages_only: import subpackages only (architectures are packages; their plumbing modules are skipped).

    Returns:
        The imported submodules' names, in import order.
    """
    skipped = set(skip)
    names = [
        info.name
        for info in sorted(pkgutil.iter_modules(list(path)), key=lambda info: info.name)
        if not info.name.startswith("_") and info.name not in skipped and (info.ispkg or not packages_only)
    ]
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


__all__ = ["import_submodules"]
