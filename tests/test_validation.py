"""The shared option checks: every bad value is a ValueError naming the option (never a TypeError from a comparison)."""

import pytest

from hf_longmem.validation import check_choice, check_int, check_optional_int, check_ratio, check_real


@pytest.mark.parametrize("value", ["abc", None, True, 2.5, 2.0, [1]])
def test_check_int_refuses_non_integers(value):
    with pytest.raises(ValueError, match="`budget` must be an integer"):
        check_int("budget", value, low=1)


def test_bounds_and_normalisation():
    assert check_int("n", 3, low=1, high=3) == 3 and check_optional_int("n", None) is None
    with pytest.raises(ValueError, match=r"`n` must be >= 1 and <= 3, got 4"):
        check_int("n", 4, low=1, high=3)
    assert check_real("lr", 1) == 1.0 and isinstance(check_real("lr", 1), float)
    for bad in ("x", None, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="`ratio` must be a finite number"):
            check_ratio("ratio", bad)
    for bad in (0, 1, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"`ratio` must be > 0.0 and < 1.0"):
            check_ratio("ratio", bad)
    assert check_ratio("ratio", 0, include_zero=True) == 0.0 and check_ratio("ratio", 1, include_one=True) == 1.0
    with pytest.raises(ValueError, match="`mode` must be one of 'a', 'b', got 'c'"):
        check_choice("mode", "c", ("a", "b"))


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(hidden_size="abc"), "hidden_size"),
        (dict(memory_max_lr="x"), "memory_max_lr"),
        (dict(num_attention_heads=None), "num_attention_heads"),
        (dict(variant="q"), "variant"),
    ],
)
def test_architecture_configs_name_the_bad_field(options, name):
    from hf_longmem.modeling.titans import TitansConfig

    with pytest.raises(ValueError, match=f"`{name}`"):
        TitansConfig(**options)
