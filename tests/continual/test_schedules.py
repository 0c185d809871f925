import math

import pytest

from hf_longmem.continual.schedules import (
    ConstantSchedule,
    InfiniteSchedule,
    Position,
    RewarmCosineSchedule,
    build_schedule,
)


def pos(global_step, task=0, step_in_task=None, task_steps=100, total_steps=300, first=100):
    return Position(
        global_step, task, global_step if step_in_task is None else step_in_task, task_steps, total_steps, first
    )


def test_rewarm_cosine_rewarms_and_redecays_every_task():
    s = RewarmCosineSchedule(1e-3, min_lr_ratio=0.1, warmup=10)
    assert s(pos(0)) == pytest.approx(1e-4)
    assert s(pos(9)) == pytest.approx(1e-3)
    # cosine: halfway through the decay phase the LR is the mean of eta_max and eta_min
    assert s(pos(10 + 45)) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert s(pos(99)) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    # the next task re-warms from the start: same LR at the same step of the task, whatever the global step
    assert s(pos(100, task=1, step_in_task=0)) == s(pos(0))
    assert s(pos(155, task=1, step_in_task=55)) == pytest.approx(s(pos(55)))


def test_infinite_schedule_matches_its_formula():
    eta_max, eta_const, eta_min = 1e-3, 3e-4, 1e-5
    s = InfiniteSchedule(eta_max, eta_const, warmup=10, cooldown_steps=40, anneal_steps=20, eta_min=eta_min)
    assert s(pos(4)) == pytest.approx(eta_max * 5 / 10)
    assert s(pos(10)) == pytest.approx(eta_max)  # cooldown starts at eta_max
    assert s(pos(30)) == pytest.approx((eta_max + eta_const) / 2)  # cosine midpoint
    # constant phase spans task boundaries: no re-warming
    for t, task in ((50, 0), (150, 1), (279, 2)):
        assert s(pos(t, task=task, step_in_task=t % 100)) == pytest.approx(eta_const)
    # linear annealing over the last 20 steps of the stream
    assert s(pos(289, task=2, step_in_task=89)) == pytest.approx(eta_const + (eta_min - eta_const) * 10 / 20)
    assert s(pos(299, task=2, step_in_task=99)) == pytest.approx(eta_min)


def test_infinite_inv_sqrt_cooldown_and_exponential_anneal():
    a = 10.0
    s = InfiniteSchedule(
        1.0,
        0.25,
        warmup=0,
        cooldown_steps=100,
        cooldown_shape="inv_sqrt",
        inv_sqrt_alpha=a,
        anneal_steps=10,
        eta_min=0.01,
        anneal_shape="exponential",
    )
    h = lambda x: 1 / math.sqrt(1 + a * x) - 1  # noqa: E731
    for t in (0, 37, 99):
        assert s(pos(t, total_steps=1000)) == pytest.approx(1.0 + (0.25 - 1.0) * h(t / 100) / h(1.0))
    assert s(pos(100, total_steps=1000)) == pytest.approx(0.25)
    assert s(pos(994, task=9, step_in_task=94, total_steps=1000)) == pytest.approx(0.25 * (0.01 / 0.25) ** 0.5)


def test_constant_schedule_and_builder():
    s = build_schedule({"kind": "constant", "warmup": 4}, 2e-3)
    assert isinstance(s, ConstantSchedule)
    assert [s(pos(i)) for i in range(6)] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3])
    assert isinstance(build_schedule({"kind": "infinite", "eta_const": 1e-4}, 1e-3), InfiniteSchedule)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "nope"}, "schedule kind"),
        ({"kind": "rewarm_cosine", "min_lr_ratio": 2}, "min_lr_ratio"),
        ({"kind": "infinite", "eta_const": 1.0}, "eta_const"),
        ({"kind": "infinite", "eta_const": 1e-4, "cooldown_shape": "x"}, "cooldown_shape"),
        ({"kind": "constant", "bogus": 1}, "bad schedule options"),
    ],
)
def test_schedule_bad_arguments(spec, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(spec, 1e-3)
