"""Registry coverage: the shared suites find what each method's own test module declares for them.

A method registers itself where it is defined (a cache module, an architecture package, a strategy module), and its
test module declares how the shared suite runs it (a case object, or an :class:`Exempt` with the reason the suite
cannot apply). The shared suites import every ``test_*`` module of their test package to find those declarations;
a coverage test there fails for a registered method with neither.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Exempt:
    """A registered method that a shared suite cannot apply to, and why (declared in the method's test module)."""

    name: str
    reason: str

    def __post_init__(self):
        if not self.reason.strip():
            raise ValueError(f"Exempt({self.name!r}) needs a reason")


def import_test_modules(package: ModuleType, skip: tuple[str, ...] = ()) -> list[ModuleType]:
    """Every ``test_*`` module of the test ``package`` (imported), by name, except those named in ``skip``."""
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__))
    return [
        importlib.import_module(f"{package.__name__}.{name}")
        for name in names
        if name.startswith("test_") and name not in skip
    ]


def declarations(modules: list[ModuleType], kinds: tuple[type, ...]) -> list:
    """Module-level objects of the given ``kinds`` (alone or in a list/tuple) in ``modules``, with their module."""
    found = []
    for module in modules:
        for value in list(vars(module).values()):
            values = value if isinstance(value, (list, tuple)) else (value,)
            found.extend((item, module.__name__) for item in values if isinstance(item, kinds))
    return found


__all__ = ["Exempt", "declarations", "import_test_modules"]
