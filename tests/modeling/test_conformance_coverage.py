"""Every architecture hf_longmem registers runs the conformance suite (``tests/modeling/conformance.py``).

An architecture package registers itself (``register_architecture`` in its ``__init__``); its test module
``tests/modeling/test_<name>.py`` subclasses :class:`ConformanceSuite` with a tester whose ``model_class`` is the
registered causal LM, or declares ``Exempt(model_type, reason=...)``. This test fails for a registered architecture
with neither.
"""

from __future__ import annotations

from hf_longmem.modeling import available_architectures, get_architecture_spec
from tests.helpers.coverage import Exempt, declarations, import_test_modules
from tests.modeling.conformance import ConformanceSuite


def uncovered_architectures() -> list[str]:
    """``model_type`` of the architectures registered by ``hf_longmem.modeling`` with neither a conformance test in
    ``tests/modeling`` nor an ``Exempt`` declaration there."""
    from tests import modeling

    modules = import_test_modules(modeling, skip=(__name__.rsplit(".", 1)[-1],))
    covered = {
        value.tester.model_class
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, ConformanceSuite) and value is not ConformanceSuite
    }
    exempt = {item.name for item, _ in declarations(modules, (Exempt,))}
    specs = [get_architecture_spec(t) for t in available_architectures()]
    builtin = [spec for spec in specs if spec.config_class.__module__.startswith("hf_longmem.modeling.")]
    assert builtin, "no architecture registered by hf_longmem.modeling"
    return [s.model_type for s in builtin if s.causal_lm_class not in covered and s.model_type not in exempt]


def test_every_registered_architecture_runs_the_conformance_suite():
    missing = uncovered_architectures()
    assert not missing, (
        f"registered architecture(s) {missing} have no conformance test: in tests/modeling/test_<name>.py subclass "
        "ConformanceSuite (tests/modeling/conformance.py) with a ModelTester whose model_class is the registered "
        "causal LM, or declare `Exempt(model_type, reason=...)` (tests/helpers/coverage.py) there"
    )
