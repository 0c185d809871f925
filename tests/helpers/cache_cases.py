"""How the shared cache suites run each registered cache method, declared in that method's own test module.

The shared suites (``tests/cache_classes/test_contract.py``, the architecture matrix of
``tests/cache_classes/test_architectures.py``) enumerate :func:`hf_longmem.available_caches`. Options come from the
registry (``get_cache_spec(name).options_for_budget(budget)``); where a method needs more to be tested (an
observation window shorter than the tiny prompts, a head pattern for a random model, how many tokens it keeps), its
test module declares it next to its own tests, as a module-level :class:`CacheCase` (or a list ``CACHE_CASES``)::

    # tests/cache_classes/test_recent.py
    CASE = CacheCase("recent")                      # options_for_budget alone; keeps options["budget"] tokens

A method that the contract cannot apply to is declared ``Exempt("name", reason=...)`` there instead.
``test_contract.py::test_every_registered_cache_is_covered`` fails for a registered method with neither.

Option values may be callables of the model (``lambda model: ...``), resolved when the cache is built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.helpers.coverage import Exempt, declarations, import_test_modules

#: Token budget of the contract's full-budget tests: holds every token (prompts <= 40, + 12 generated).
FULL = 64
#: Token budget of the contract's evicting tests (prompts of 20 and 30 tokens).
SMALL = 12

#: Test modules that consume the cases (never declare any): not imported by :func:`declared_cases`.
SHARED_SUITES = ("test_contract", "test_architectures")


def _budget_tokens(options: dict, **_) -> int:
    return options["budget"]


@dataclass(frozen=True)
class CacheCase:
    """One registered cache method (or a variant of it) as the shared suites run it.

    Attributes:
        name: the registry name.
        label: the test id (default ``name``); a variant of a method (``"streaming_shift"``) has its own label.
        options: merged over ``options_for_budget(budget)`` in every contract test (e.g. ``{"window_size": 4}``).
        full: merged over that at the full budget: what makes the method hold every token of the tests (its output
            must then equal ``DynamicCache``'s).
        full_budget: the budget of the full-budget tests (default :data:`FULL`).
        small: merged over ``options_for_budget(SMALL)`` and ``options`` in the evicting tests; ``None``: the method
            is not run at a small budget (``skip`` must say why).
        kept: how many real tokens a row keeps after eviction,
            ``kept(options=, layer=, prompt=, decoded=, cache=, row=) -> int`` (``layer`` its index, ``cache`` the
            cache after the run, ``prompt`` the row's real prompt tokens, ``decoded`` the decoding steps); default:
            ``options["budget"]``.
        skip: contract test name -> why that test does not apply to the method.
        matrix_full / matrix_small: merged over ``options_for_budget`` in the architecture matrix's full-budget and
            compressing checks (``tests/helpers/architecture_rule.py``).
        matrix_shift: merged over the compressing options for the re-rotation check (g) (methods that can
            re-rotate keys but do not by default).
    """

    name: str
    label: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)
    full_budget: int = FULL
    small: dict[str, Any] | None = field(default_factory=dict)
    kept: Callable[..., int] = _budget_tokens
    skip: dict[str, str] = field(default_factory=dict)
    matrix_full: dict[str, Any] = field(default_factory=dict)
    matrix_small: dict[str, Any] = field(default_factory=dict)
    matrix_shift: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.label or self.name

    def full_options(self) -> dict[str, Any]:
        """Contract options at the full budget (option values may still be callables of the model)."""
        return {**registry_options(self.name, self.full_budget), **self.options, **self.full}

    def small_options(self, budget: int = SMALL) -> dict[str, Any]:
        """Contract options at an evicting budget."""
        if self.small is None:
            raise ValueError(f"{self.id} has no small-budget case")
        return {**registry_options(self.name, budget), **self.options, **self.small}

    def holding_options(self) -> dict[str, Any]:
        """The evicting configuration at budget :data:`FULL` (holds every token): the registry's options for it, ``options``, and those of ``small`` that the registry does not set."""
        budget = registry_options(self.name, FULL)
        small = {key: value for key, value in (self.small or {}).items() if key not in budget}
        return {**budget, **self.options, **small}


def registry_options(name: str, budget: int) -> dict[str, Any]:
    from hf_longmem import get_cache_spec

    return dict(get_cache_spec(name).options_for_budget(budget))


def resolve(options: dict[str, Any], model) -> dict[str, Any]:
    """Option values that are callables of the model, called."""
    return {key: value(model) if callable(value) else value for key, value in options.items()}


@functools.cache
def declared_cases() -> tuple[dict[str, CacheCase], dict[str, Exempt]]:
    """``({label: CacheCase}, {name: Exempt})`` from every test module of ``tests/cache_classes``."""
    from tests import cache_classes

    cases: dict[str, CacheCase] = {}
    exempt: dict[str, Exempt] = {}
    for item, module in declarations(import_test_modules(cache_classes, skip=SHARED_SUITES), (CacheCase, Exempt)):
        target = cases if isinstance(item, CacheCase) else exempt
        key = item.id if isinstance(item, CacheCase) else item.name
        if key in target:
            raise ValueError(f"{key!r} is declared twice (again in {module})")
        target[key] = item
    return cases, exempt


def cache_cases() -> list[CacheCase]:
    """The declared cases of the registered methods, in registry order (variants after their method)."""
    from hf_longmem import available_caches

    cases, _ = declared_cases()
    order = {name: index for index, name in enumerate(available_caches())}
    registered = [case for case in cases.values() if case.name in order]
    return sorted(registered, key=lambda case: (order[case.name], case.label is not None, case.id))


def matrix_case(name: str) -> CacheCase:
    """The method's own case (not a variant) for the architecture matrix; a default one when none is declared."""
    cases, _ = declared_cases()
    case = cases.get(name)
    return case if case is not None else CacheCase(name)


def uncovered_caches() -> list[str]:
    """Registered methods with neither a :class:`CacheCase` nor an :class:`Exempt` declaration."""
    from hf_longmem import available_caches

    cases, exempt = declared_cases()
    covered = {case.name for case in cases.values()} | set(exempt)
    return [name for name in available_caches() if name not in covered]


__all__ = ["FULL", "SMALL", "CacheCase", "Exempt", "cache_cases", "matrix_case", "resolve", "uncovered_caches"]
