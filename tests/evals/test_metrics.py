"""Hand-checked cases of the answer metrics."""

from __future__ import annotations

import pytest

from hf_longmem.evals.metrics import (
    METRICS,
    exact_match,
    first_int,
    first_int_match,
    metric_for,
    score,
    string_match_all,
)
from hf_longmem.evals.schema import Turn


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        (" 71432", ["71432"], 1.0),
        ("71432\n", ["71432"], 1.0),
        ("\t 71432  ", [" 71432 "], 1.0),
        ("71432.", ["71432"], 0.0),
        ("7143", ["71432"], 0.0),
        ("b", ["a", "b"], 1.0),  # any accepted answer
        ("", ["71432"], 0.0),
        ("Paris", "Paris", 1.0),  # a bare string is one answer
        ("paris", ["Paris"], 0.0),  # case-sensitive
    ],
)
def test_exact_match(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("the number is 4093217.", ["4093217"], 1.0),
        ("nothing", ["4093217"], 0.0),
        ("Apple and PEAR", ["apple", "pear"], 1.0),  # case-insensitive
        ("apple", ["apple", "pear", "plum", "fig"], 0.25),  # RULER: fraction of refs found
        ("Question", ["Q"], 1.0),  # substring mode matches inside words, as RULER does
    ],
)
def test_string_match_all_substrings(prediction, answers, expected):
    assert string_match_all(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        (" Q K M", "Q K M", 1.0),
        ("M, K and Q", "Q K M", 1.0),  # order does not matter
        (" Q K", "Q K M", pytest.approx(2 / 3)),
        ("Question Kite", "Q K M", 0.0),  # whole words only
        (" q k m", "Q K M", 1.0),
    ],
)
def test_string_match_all_whole_words(prediction, answer, expected):
    assert string_match_all(prediction, [answer], whole_words=True) == expected


def test_first_int():
    assert first_int("The key is 0042.") == 42
    assert first_int("x -7 y 9") == -7
    assert first_int("no digits") is None


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("The pass key is 71432.", ["71432"], 1.0),
        (" 71432 71433", ["71432"], 1.0),
        ("71433 71432", ["71432"], 0.0),  # only the first integer counts
        ("0071432", ["71432"], 1.0),
        ("none", ["71432"], 0.0),
        ("12", ["The answer is 12"], 1.0),
    ],
)
def test_first_int_match(prediction, answers, expected):
    assert first_int_match(prediction, answers) == expected


def test_score_and_errors():
    assert score(" 5", ["5"], "exact_match") == 1.0
    assert score("VAR Q K", ["Q K M"], "string_match_all_words") == pytest.approx(2 / 3)
    assert set(METRICS) >= {"exact_match", "string_match_all", "first_int"}
    with pytest.raises(ValueError, match="metric"):
        score("x", ["x"], "bleu")
    with pytest.raises(ValueError, match="answers"):
        exact_match("x", [])


def test_metric_for():
    assert metric_for("passkey") == "first_int"
    assert metric_for("variable_tracking") == "string_match_all_words"
    assert metric_for("shared_context", {"generator": "multikey_needle"}) == "string_match_all"
    assert metric_for("something_else") == "exact_match"
    assert metric_for("passkey", {"metric": "exact_match"}) == "exact_match"

    assert metric_for("multikey_needle", {"metric": "exact_match"}, Turn("q", ["1"], metric="first_int")) == "first_int"
    assert Turn("q", ["1"]).metric is None  # the sample's metric


def test_wilson_interval():
    from hf_longmem.evals.metrics import wilson_interval

    low, high = wilson_interval(1.0, 20)
    assert high == 1.0 and abs(low - 0.8389) < 1e-3  # 20/20 is not "certainly 1"
    low, high = wilson_interval(0.5, 20)
    assert abs(low - 0.2993) < 1e-3 and abs(high - 0.7007) < 1e-3  # symmetric around 1/2
    assert wilson_interval(0.0, 1) == (0.0, wilson_interval(0.0, 1)[1]) and wilson_interval(0.0, 1)[1] > 0.7
    with pytest.raises(ValueError, match="n"):
        wilson_interval(0.5, 0)
