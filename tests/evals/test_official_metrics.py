"""The official LongBench / InfiniteBench / SCBench scorers and the text-overlap scores they use.

Values from the official packages: the literal expected numbers below were computed by the official code, run in a
scratch venv (``pip install rouge==1.0.1 fuzzywuzzy==0.18.0 rouge_score==0.1.2 jieba==0.42.1``, no
python-Levenshtein) on THUDM/LongBench ``LongBench/metrics.py``, OpenBMB/InfiniteBench ``src/compute_scores.py`` and
microsoft/MInference ``scbench/compute_scores.py`` (their ``evaluate.load("rouge")`` replaced by the ``rouge_score``
``RougeScorer`` it wraps). The same venv compared every scorer here with the official one on 15,265 random
prediction/label pairs covering every dataset, and ROUGE-L / rougeLsum / fuzz.ratio with the packages on 3,000 random
pairs each (0 differences); the hand derivations are in the comments.
"""

from __future__ import annotations

import sys

import pytest

from hf_longmem.evals import loaders
from hf_longmem.evals.metrics import METRICS, metric_options, score
from hf_longmem.evals.official_metrics import (
    INFINITEBENCH_METRICS,
    LONGBENCH_METRICS,
    OFFICIAL_METRICS,
    SCBENCH_METRICS,
    longbench_length_bucket,
)
from hf_longmem.evals.text_overlap import fuzz_ratio, jieba_words, rouge_l_f, rouge_lsum_f


def test_tables_name_registered_metrics():
    for table in (LONGBENCH_METRICS, INFINITEBENCH_METRICS, SCBENCH_METRICS):
        assert set(table.values()) <= set(METRICS)
    assert set(OFFICIAL_METRICS) <= set(METRICS)
    assert len(LONGBENCH_METRICS) == 21 and len(INFINITEBENCH_METRICS) == 14


def test_rouge_l_pltrdy():
    # words are sets: ref {the, cat, sat, on, mat} (m=5), hyp n=3, LCS words 3 -> P=1, R=0.6, F=1.2/(1.6+1e-8).
    assert rouge_l_f("the cat sat", "the cat sat on the mat") == 0.7499999953125
    assert rouge_l_f("the cat sat", "the cat sat on the mat") == 2 * 0.6 / (1.6 + 1e-8)
    assert rouge_l_f("The cat. The dog sat.", "the dog. the cat sat on the mat.") == 0.5999999952
    # No sentence ("" or only dots) makes the package raise; LongBench scores 0.0.
    assert rouge_l_f("", "x") == rouge_l_f("...", "a b") == rouge_l_f("a b", "") == 0.0


def test_rouge_l_long_sentence_is_scored():
    # The official recursive LCS hits RecursionError on two 800-word sentences and LongBench scores 0.0; the
    # documented deviation: the real score (identical texts: P = R = 1).
    text = " ".join(f"w{i}" for i in range(800))
    assert rouge_l_f(text, text) == pytest.approx(1.0, abs=1e-8)


def test_rouge_lsum():
    # tokens: ref 6, pred 3, 3 hits -> P=1, R=1/2, F=2/3.
    assert rouge_lsum_f("the cat sat", "the cat sat on the mat") == 2 / 3
    assert rouge_lsum_f("The cat sat.\nThe dog ran!", "the dog ran\nthe cat sat on the mat") == 0.8
    assert rouge_lsum_f("", "x") == rouge_lsum_f("!!", "x") == 0.0
    # InfiniteBench's longbook_sum_eng with two references: the best one (0.8 above).
    assert score("The cat sat.\nThe dog ran!", ["the dog ran\nthe cat sat on the mat", "a dog"], "rouge_lsum") == 0.8


def test_fuzz_ratio_difflib():
    # SequenceMatcher ratio 2*3/8 = 0.75; equal strings 100 (even empty ones); one empty 0.
    assert fuzz_ratio("abcd", "abce") == 75 and fuzz_ratio("", "") == 100 and fuzz_ratio("a", "") == 0
    assert fuzz_ratio("return x + 1", "return x+1") == 91


def test_longbench_metrics():
    # code_sim: the first line without ` # // is scored.
    assert score("```python\n# comment\nreturn x + 1\n```", ["return x+1"], "longbench_code_sim") == 0.91
    assert score("\n\n// only\n", ["x"], "longbench_code_sim") == 0.0
    # qa_f1: the max over ground truths.
    assert score("The cat sat.", ["a cat sat on the mat"], "longbench_qa_f1") == pytest.approx(2 / 3)
    assert score("Paris", ["London", "paris!"], "longbench_qa_f1") == 1.0 and score("", ["x"], "longbench_qa_f1") == 0
    # retrieval / count: right numbers over all numbers of the prediction.
    assert score("Paragraph 3", ["Paragraph 3"], "longbench_retrieval") == 1.0
    assert score("Paragraph 3 or Paragraph 12", ["Paragraph 3"], "longbench_retrieval") == 0.5
    assert score("", ["Paragraph 3"], "longbench_retrieval") == 0.0
    assert score("段落3", ["段落3"], "longbench_retrieval_zh") == 1.0
    with pytest.raises(ValueError, match="names no paragraph"):
        score("3", ["no paragraph"], "longbench_retrieval")  # the official raises IndexError
    assert score("There are 5 paragraphs", ["5"], "longbench_count") == 1.0
    assert score("5 or 6", ["5"], "longbench_count") == 0.5 and score("none", ["5"], "longbench_count") == 0.0
    # ROUGE over several references: the max.
    assert score("the cat sat", ["x y", "the cat sat on the mat"], "longbench_rouge") == 0.7499999953125


def test_longbench_classification():
    classes = ["Location", "Number", "Loc"]
    # "Loc" is inside the truth "Location" and dropped; two classes remain -> 1/2.
    assert score("Location or Number", ["Location"], "longbench_classification", all_classes=classes) == 0.5
    assert score("Location", ["Location"], "longbench_classification", all_classes=classes) == 1.0
    assert score("nothing", ["Location"], "longbench_classification", all_classes=classes) == 0.0
    # The official removes from the list it iterates: after dropping "Human" it skips "Hum", leaving 2 -> 0.5.
    quirk = ["Human", "Hum", "Human being"]
    assert score("Human being", ["Human being"], "longbench_classification", all_classes=quirk) == 0.5
    with pytest.raises(ValueError, match="all_classes"):
        score("Location", ["Location"], "longbench_classification")


def test_longbench_first_line():
    # trec / triviaqa / samsum / lsht: the prediction is cut to its first line (leading newlines stripped first).
    assert score("\nParis\nLondon", ["Paris"], "longbench_qa_f1", first_line=True) == 1.0
    assert score("\nParis\nLondon", ["Paris"], "longbench_qa_f1") == pytest.approx(2 / 3)
    assert score("\n\n", ["x"], "longbench_rouge", first_line=True) == 0.0


def test_longbench_zh_needs_jieba(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # import jieba -> ImportError
    with pytest.raises(ValueError, match=r"hf-longmem\[zh\]"):
        score("猫", ["猫"], "longbench_qa_f1_zh")
    with pytest.raises(ValueError, match="jieba"):
        score("猫", ["猫"], "longbench_rouge_zh")


def test_longbench_zh_with_jieba():
    pytest.importorskip("jieba")
    assert jieba_words("猫坐在垫子上") and "".join(jieba_words("猫坐在垫子上")) == "猫坐在垫子上"
    assert score("猫坐在垫子上。", ["猫在垫子上"], "longbench_qa_f1_zh") == 0.75
    assert score("猫坐在垫子上。", ["猫在垫子上"], "longbench_rouge_zh") == 0.6666666617283951


def test_infinitebench_retrieval_and_code():
    # passkey / number_string: the first digit run compared as a string.
    assert score("The pass key is 0042.", ["42"], "passkey") == 0.0 and score("71432.", ["71432"], "passkey") == 1.0
    assert score("no digits", ["1"], "passkey") == 0.0
    # kv: a whole word (InfiniteBench) vs a substring (SCBench).
    assert score('The value is "abc-1".', ["abc-1"], "infinitebench_kv_retrieval") == 1.0
    assert score("abc-12", ["abc-1"], "infinitebench_kv_retrieval") == 0.0
    assert score("abc-12", ["abc-1"], "scbench_kv_retrieval") == 1.0
    # code_run: the last word is the integer label.
    assert score("The output is: `-12`", ["-12"], "code_run") == 1.0 and score("-12 is it", ["-12"], "code_run") == 0.0
    # code_debug: "B." prefix, an answer prefix followed by the letter or the function name, else 0.
    for prediction, expected in [("B. func_2", 1), ("The answer is: func_2", 1), ("The correct option is: B", 1)]:
        assert score(prediction, ["func_2", "B"], "code_debug") == expected
    assert score("func_2", ["func_2", "B"], "code_debug") == 0.0


def test_infinitebench_math():
    # math_find: an int label needs an int first number; InfiniteBench's own code raises on "3.5" (we score 0).
    assert score("The max is 3.5", ["3"], "infinitebench_math_find") == 0.0
    assert score("The max is 3.5", ["3.5"], "infinitebench_math_find") == 1.0
    assert score("It is 42", ["42"], "infinitebench_math_find") == 1.0
    assert score("3.9", ["3"], "scbench_math_find") == 1.0  # SCBench truncates: int(float("3.9")) == 3
    with pytest.raises(ValueError, match="numbers"):
        score("3", ["three"], "infinitebench_math_find")
    # math_calc: digit runs (signs dropped) matched in order until the first mismatch.
    assert score("[1, 3, -1, -11]", ["1", "3", "-1", "-11"], "math_calc") == 0.5
    assert score("1 3 5", ["1", "3", "4"], "math_calc") == pytest.approx(2 / 3)


def test_dialogue_choice_and_zh():
    assert score("It was alice.", ["ALICE"], "infinitebench_dialogue") == 1.0
    assert score("It was alice.", ["alice"], "infinitebench_dialogue") == 0.0  # the label is not upper-cased
    assert score("It was alice.", ["alice"], "scbench_dialogue") == 1.0
    assert score("Malice", ["ALICE"], "scbench_dialogue") == 1.0  # a substring
    label = ["the second", "B"]
    expected = {"B": 1, "The answer is: B": 1, "AB": 0, "": 0, "the second": 1, "I think the answer is the second": 1}
    for prediction, value in {**expected, "Maybe C or B": 0}.items():
        assert score(prediction, label, "choice") == value, prediction
    # Character F1: 5 common of 6 and 5 characters -> 10/11.
    assert score("猫坐在垫子上。", ["猫在垫子上"], "qa_f1_zh_chars") == 0.9090909090909091
    assert score("X = 1, Y, Z", ["x", "y", "q"], "scbench_string_match_all") == 0.67


def test_metric_options_and_buckets():
    meta = {"metric": "longbench_classification", "metric_options": {"all_classes": ["A"]}}
    assert metric_options(meta, "longbench_classification") == {"all_classes": ["A"]}
    assert metric_options(meta, "exact_match") == {} and metric_options(None, "qa_f1") == {}
    assert [longbench_length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)] == ["0-4k"] * 2 + ["4-8k"] * 2 + ["8k+"]


def test_loader_jieba_error_is_up_front(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)
    row = '{"input": "q", "context": "c", "answers": ["a"], "dataset": "vcsum", "length": 3, "_id": "x"}'
    (tmp_path / "vcsum.jsonl").write_text(row + "\n")
    with pytest.raises(ValueError, match=r"vcsum.jsonl.*jieba"):
        loaders.load_longbench(tmp_path / "vcsum.jsonl")
