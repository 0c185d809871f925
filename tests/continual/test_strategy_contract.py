"""Every registered continual strategy, through the same steps: built from its config by name, a few training steps
(crossing a task boundary) on a tiny model, and its ``state_dict`` saved and loaded with ``state_io`` into a fresh
instance built from the same config.

Each strategy's test module declares how (``StrategyCase``: options, a LoRA model, trainer settings) or why not
(``Exempt``); :func:`test_every_registered_strategy_is_covered` fails for a registered strategy with neither.
"""

from __future__ import annotations

import pytest
import torch

from hf_longmem.continual import STRATEGIES, build_strategy
from hf_longmem.continual.state_io import load_tree, save_tree
from tests.helpers.coverage import Exempt, declarations, import_test_modules

from .util import StrategyCase, make_trainer, tiny_lora


def _declared() -> tuple[dict[str, StrategyCase], dict[str, Exempt]]:
    from tests import continual

    cases: dict[str, StrategyCase] = {}
    exempt: dict[str, Exempt] = {}
    for item, module in declarations(
        import_test_modules(continual, skip=(__name__.rsplit(".", 1)[-1],)), (StrategyCase, Exempt)
    ):
        target = cases if isinstance(item, StrategyCase) else exempt
        if item.name in target:
            raise ValueError(f"strategy {item.name!r} is declared twice (again in {module})")
        target[item.name] = item
    return cases, exempt


CASES, EXEMPT = _declared()


def test_every_registered_strategy_is_covered():
    missing = [name for name in STRATEGIES if name not in CASES and name not in EXEMPT]
    assert not missing, (
        f"registered strategy(ies) {missing} are not covered by the shared strategy test: declare "
        "`StrategyCase(name, options=...)` (tests/continual/util.py) in the strategy's test module, "
        "or `Exempt(name, reason=...)` (tests/helpers/coverage.py)"
    )
    unknown = sorted(set(CASES) - set(STRATEGIES))
    assert not unknown, f"cases declared for strategies that are not registered: {unknown}"


def assert_same_tree(actual, expected, where: str = "state") -> None:
    """Same structure, types and values (tensors: same dtype, shape and values)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__} instead of a tensor"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual.cpu(), expected.cpu()), f"{where}: values differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{where}: keys {list(actual)}"
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{where}: {actual!r}"
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tree(a, e, f"{where}[{index}]")
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_strategy_trains_and_its_state_round_trips(name, tmp_path):
    case = CASES[name]
    config = {"name": name, **case.options}
    strategy = build_strategy(config)
    assert type(strategy) is STRATEGIES[name]
    model = tiny_lora(rank=case.lora_rank) if case.lora_rank else None
    settings = {"steps_per_task": 2, "eval_every": 0, "plot": False, **case.trainer}
    trainer = make_trainer([strategy], model=model, tmp_path=tmp_path / "run", **settings)
    before = [p.detach().clone() for p in trainer.unwrapped.parameters() if p.requires_grad]
    assert trainer.train(stop_after_steps=3) is None  # past the end of the first task
    after = [p.detach() for p in trainer.unwrapped.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "no trainable parameter changed"
    state = strategy.state_dict()
    save_tree(state, tmp_path / "state", "strategy")
    loaded = load_tree(tmp_path / "state", "strategy")
    assert_same_tree(loaded, state)
    fresh = build_strategy(config)
    fresh.load_state_dict(loaded)
    assert_same_tree(fresh.state_dict(), state)
