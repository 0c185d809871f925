"""The official per-dataset scorers of LongBench, InfiniteBench and SCBench, and their dataset -> metric tables.

Every scorer has the harness signature ``metric(prediction, answers, **options) -> float`` (``answers``: the turn's
accepted answers as strings) and is registered in :data:`hf_longmem.evals.metrics.METRICS` under its name in
:data:`OFFICIAL_METRICS`; the loaders of :mod:`hf_longmem.evals.loaders` set ``meta["metric"]`` (and
``meta["metric_options"]``) from the tables below.

Sources (read, then ported line by line):

- LongBench (THUDM/LongBench ``LongBench/metrics.py`` and ``eval.py``): ``dataset2metric``
  (:data:`LONGBENCH_METRICS`); the score of a prediction is the max over its ground truths; for trec, triviaqa,
  samsum and lsht the prediction is first cut to its first line (``prediction.lstrip("\\n").split("\\n")[0]``,
  option ``first_line``); LongBench-E reports 0-4k / 4-8k / 8k+ buckets of the row's ``length``
  (:func:`longbench_length_bucket`).
- InfiniteBench (OpenBMB/InfiniteBench ``src/compute_scores.py``, ``get_score_one_*``): :data:`INFINITEBENCH_METRICS`.
- SCBench (microsoft/MInference ``scbench/compute_scores.py``): its ``Multiturnbench_to_Infinitebench`` mapping and
  scorers, some of which differ from InfiniteBench's of the same name (kv retrieval is a substring test, the
  dialogue QA accepts any answer as a case-insensitive substring, math-find truncates a float prediction):
  :data:`SCBENCH_METRICS`.

Deviations, and why:

- Labels are strings here (the harness's answers); the official InfiniteBench/SCBench scorers compare typed JSON
  labels, so numeric labels are parsed back: math_find reads ``"42"`` as the int 42 and ``"3.5"`` as a float, code_run
  and math_calc read ints. A label that does not parse raises ``ValueError`` (the official raises ``TypeError``).
- InfiniteBench math_find with an int label and a decimal first number in the prediction (``"3.5"``) scores 0.0; the
  official ``int("3.5")`` raises and stops the whole evaluation.
- InfiniteBench kv_retrieval / longdialogue_qa_eng and SCBench kv use the first accepted answer as the label (the
  official compares the label as stored: a string for these tasks).
- InfiniteBench math_calc skips the GPT-4-only rule that drops the first predicted number.
- LongBench classification without ``all_classes`` and retrieval with a ground truth that names no paragraph raise
  ``ValueError`` (the official crashes with ``TypeError`` / ``IndexError``); the loaders check both up front.
- SCBench repoqa (function retrieval scored by tree-sitter sanitising and BLEU) is not reimplemented: the SCBench
  loader refuses ``scbench_repoqa`` rows unless a metric is given explicitly.
- ROUGE-L, rougeLsum, fuzzywuzzy ratio and jieba: see :mod:`hf_longmem.evals.text_overlap`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .text_overlap import fuzz_ratio, jieba_words, rouge_l_f, rouge_lsum_f

__all__ = [
    "INFINITEBENCH_MAX_NEW_TOKENS",
    "INFINITEBENCH_METRICS",
    "JIEBA_METRICS",
    "LONGBENCH_FIRST_LINE",
    "LONGBENCH_MAX_NEW_TOKENS",
    "LONGBENCH_METRICS",
    "OFFICIAL_METRICS",
    "SCBENCH_MAX_NEW_TOKENS",
    "SCBENCH_METRICS",
    "longbench_length_bucket",
    "longbench_report",
]

_PUNCTUATION = frozenset(string.punctuation)
_ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _answers(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("`answers` must hold at least one accepted answer, got an empty list")
    return answers


def normalize_answer(text: str) -> str:
    """LongBench / InfiniteBench / SCBench ``normalize_answer``: lower case, no punctuation, no articles, one space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """``normalize_zh_answer``: lower case, no ASCII or Chinese punctuation, no whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def _f1(prediction: list[str], truth: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(truth)
    return (2 * precision * recall) / (precision + recall)


# ----------------------------------------------------------------------------------------------------------------------
# LongBench (metrics.py, one ground truth each; the max over ground truths and the first-line cut are in _longbench)
# ----------------------------------------------------------------------------------------------------------------------


def _qa_f1(prediction: str, truth: str, **_) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(truth).split())


def _qa_f1_zh(prediction: str, truth: str, **_) -> float:
    def tokens(text):
        return [t for t in (normalize_zh_answer(w) for w in jieba_words(text)) if len(t) > 0]

    return _f1(tokens(prediction), tokens(truth))


def _rouge(prediction: str, truth: str, **_) -> float:
    return rouge_l_f(prediction, truth)


def _rouge_zh(prediction: str, truth: str, **_) -> float:
    return rouge_l_f(" ".join(jieba_words(prediction)), " ".join(jieba_words(truth)))


def _classification(prediction: str, truth: str, *, all_classes: Sequence[str] | None = None, **_) -> float:
    if not all_classes:
        raise ValueError("LongBench classification (trec, lsht) needs the row's `all_classes`, got none")
    matches = [name for name in all_classes if name in prediction]
    # Ported as written, including removing from the list being iterated (the element after a removed one is skipped).
    for term in matches:
        if term in truth and term != truth:
            matches.remove(term)
    return 1.0 / len(matches) if truth in matches else 0.0


def _paragraph_count(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    right = sum(str(number) == str(target) for number in numbers)
    return 0.0 if len(numbers) == 0 else float(right / len(numbers))


def _paragraph_id(truth: str, pattern: str) -> str:
    matches = re.findall(pattern, truth)
    if not matches:
        raise ValueError(f"LongBench retrieval ground truth {truth!r} names no paragraph (pattern {pattern!r})")
    return matches[0]


def _retrieval(prediction: str, truth: str, **_) -> float:
    return _paragraph_count(prediction, _paragraph_id(truth, r"Paragraph (\d+)"))


def _retrieval_zh(prediction: str, truth: str, **_) -> float:
    return _paragraph_count(prediction, _paragraph_id(truth, r"段落(\d+)"))


def _count(prediction: str, truth: str, **_) -> float:
    return _paragraph_count(prediction, truth)


def _code_sim(prediction: str, truth: str, **_) -> float:
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, truth) / 100


def _longbench(one: Callable[..., float]) -> Callable[..., float]:
    def metric(
        prediction: str, answers: Sequence[str], *, first_line: bool = False, all_classes: Sequence[str] | None = None
    ) -> float:
        if first_line:
            prediction = prediction.lstrip("\n").split("\n")[0]
        best = 0.0
        for truth in _answers(answers):
            best = max(best, one(prediction, truth, all_classes=all_classes))
        return float(best)

    metric.__name__ = metric.__qualname__ = f"longbench{one.__name__}"
    metric.__doc__ = (
        f"LongBench's ``{one.__name__.lstrip('_')}`` scorer: the max over ``answers``; ``first_line`` cuts the "
        "prediction to its first line first (trec, triviaqa, samsum, lsht); ``all_classes`` for classification."
    )
    return metric


# ----------------------------------------------------------------------------------------------------------------------
# InfiniteBench / SCBench (compute_scores.py get_score_one_*; ``answers`` is the official label list)
# ----------------------------------------------------------------------------------------------------------------------


def _first_digits(prediction: str) -> str:
    for item in re.split("[^0-9]", prediction):
        if item != "":
            return item
    return ""


def _parse_int(label: str, task: str) -> int:
    try:
        return int(label)
    except ValueError:
        raise ValueError(f"{task} labels are integers, got {label!r}") from None


def passkey(prediction: str, answers: Sequence[str]) -> float:
    """``get_score_one_passkey`` / ``number_string``: the first run of digits of the prediction equals the label
    (as strings: ``"0042"`` is not ``"42"``)."""
    return float(_answers(answers)[0] == _first_digits(prediction))


def _words(prediction: str, characters: str) -> list[str]:
    for c in characters:
        prediction = prediction.replace(c, " ")
    return prediction.split()


def infinitebench_kv_retrieval(prediction: str, answers: Sequence[str]) -> float:
    """InfiniteBench ``get_score_one_kv_retrieval``: the label is a whole word of the prediction once
    ``\\n : " ' . , ? ! { }`` are spaces."""
    return float(_answers(answers)[0] in _words(prediction, "\n:\"'.,?!{}"))


def scbench_kv_retrieval(prediction: str, answers: Sequence[str]) -> float:
    """SCBench ``get_score_one_kv_retrieval``: the label is a substring of the prediction (case-sensitive)."""
    return float(_answers(answers)[0] in prediction)


def code_run(prediction: str, answers: Sequence[str]) -> float:
    """``get_score_one_code_run``: the last word (after ``\\n . ` ' " :`` become spaces) is the integer label."""
    label = _parse_int(_answers(answers)[0], "code_run")
    words = _words(prediction.strip(), "\n.`'\":")
    if not words:
        return 0.0
    try:
        return float(int(words[-1]) == label)
    except ValueError:
        return 0.0


def code_debug(prediction: str, answers: Sequence[str]) -> float:
    """InfiniteBench ``get_score_one_code_debug``; ``answers = [function name, option letter, ...]``."""
    answers = _answers(answers)
    if len(answers) < 2:
        raise ValueError(f"code_debug answers are [function name, option letter], got {answers!r}")
    fn_name, letter = answers[0], answers[1]
    prediction = prediction.strip()
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    for c in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        prediction = prediction.replace(c, " ")
    while "  " in prediction:
        prediction = prediction.replace("  ", " ")
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = prediction.find(prefix)
        if idx == -1:
            continue
        if len(prediction) < idx + len(prefix) + 1:
            return 0.0
        rest = prediction[idx + len(prefix) + 1 :]
        return float(any(rest.startswith(s) for s in (letter, fn_name)))
    return 0.0


def _math_find(prediction: str, answers: Sequence[str], *, truncate: bool) -> float:
    label_text = _answers(answers)[0].strip()
    if re.fullmatch(r"[-+]?\d+", label_text):
        label: int | float = int(label_text)
    else:
        try:
            label = float(label_text)
        except ValueError:
            raise ValueError(f"math_find labels are numbers, got {label_text!r}") from None
    found = re.search(r"\d+\.\d+|\d+", prediction)
    if found is None:
        return 0.0
    number = found.group(0).strip()
    if isinstance(label, float):
        return float(float(number) == label)
    if truncate:
        return float(int(float(number)) == label)
    return float("." not in number and int(number) == label)


def infinitebench_math_find(prediction: str, answers: Sequence[str]) -> float:
    """InfiniteBench ``get_score_one_math_find``: the first number (``\\d+\\.\\d+|\\d+``) equals the label (an int
    label needs an integer; a decimal scores 0.0 where the official raises)."""
    return _math_find(prediction, answers, truncate=False)


def scbench_math_find(prediction: str, answers: Sequence[str]) -> float:
    """SCBench ``get_score_one_math_find``: as InfiniteBench's, an int label compared with ``int(float(number))``."""
    return _math_find(prediction, answers, truncate=True)


def math_calc(prediction: str, answers: Sequence[str]) -> float:
    """``get_score_one_math_calc``: the fraction of the label sequence (``answers``, one int each) matched by the
    prediction's digit runs before the first mismatch."""
    labels = [_parse_int(a, "math_calc") for a in _answers(answers)]
    predicted = [int(item) for item in re.split("[^0-9]", prediction) if item != ""]
    count = 0
    for label, value in zip(labels, predicted):
        if label != value:
            break
        count += 1
    return count / len(labels)


def infinitebench_dialogue(prediction: str, answers: Sequence[str]) -> float:
    """InfiniteBench ``get_score_one_longdialogue_qa_eng``: the first answer is one of the upper-cased words of the
    prediction (the answer itself is not upper-cased: the dataset's names are)."""
    return float(_answers(answers)[0] in [w.upper() for w in _words(prediction.strip(), "\n:\"'.,?!{}")])


def scbench_dialogue(prediction: str, answers: Sequence[str]) -> float:
    """SCBench ``get_score_one_longdialogue_qa_eng`` (qa_eng, many_shot): any answer is a case-insensitive substring."""
    text = prediction.strip().upper()
    return float(any(item.upper() in text for item in _answers(answers)))


def choice(prediction: str, answers: Sequence[str]) -> float:
    """``get_score_one_longbook_choice_eng``; ``answers`` holds the option text and its letter."""
    label = _answers(answers)
    prediction = prediction.strip()
    if prediction == "":
        return 0.0
    if prediction[0] in "ABCD":
        return float(prediction[0] in label)
    if prediction in label:
        return 1.0
    for c in ("\n", '"', "'", ".", ",", "?", "!", "{", "}"):
        prediction = prediction.replace(c, " ")
    while "  " in prediction:
        prediction = prediction.replace("  ", " ")
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = prediction.find(prefix)
        if idx == -1:
            continue
        if len(prediction) < idx + len(prefix) + 1:
            return 0.0
        rest = prediction[idx + len(prefix) + 1 :]
        return float(any(rest.startswith(s) for s in label))
    for word in prediction.split():
        if word in "ABCD":  # a substring test, as written ("AB" passes, then is not a label)
            return float(word in label)
    return 0.0


def qa_f1_zh_chars(prediction: str, answers: Sequence[str]) -> float:
    """InfiniteBench / SCBench ``qa_f1_score_zh``: character F1 of the normalised texts (no segmentation), max over
    answers."""
    predicted = list(normalize_zh_answer(prediction))
    return max(float(_f1(predicted, list(normalize_zh_answer(a)))) for a in _answers(answers))


def rouge_lsum(prediction: str, answers: Sequence[str]) -> float:
    """``get_score_one_longbook_sum_eng``: HF ``evaluate`` rouge ``rougeLsum`` (the max over references, as
    ``score_multi`` picks the best F)."""
    return max(rouge_lsum_f(prediction, a) for a in _answers(answers))


def scbench_string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """SCBench ``string_match_all`` (variable tracking): the fraction of answers found in the prediction
    (case-insensitive), rounded to 2 decimals."""
    answers = _answers(answers)
    return round(sum(1.0 if a.lower() in prediction.lower() else 0.0 for a in answers) / len(answers), 2)


#: Name -> scorer, merged into :data:`hf_longmem.evals.metrics.METRICS`.
OFFICIAL_METRICS: dict[str, Callable[..., float]] = {
    "longbench_qa_f1": _longbench(_qa_f1),
    "longbench_qa_f1_zh": _longbench(_qa_f1_zh),
    "longbench_rouge": _longbench(_rouge),
    "longbench_rouge_zh": _longbench(_rouge_zh),
    "longbench_classification": _longbench(_classification),
    "longbench_retrieval": _longbench(_retrieval),
    "longbench_retrieval_zh": _longbench(_retrieval_zh),
    "longbench_count": _longbench(_count),
    "longbench_code_sim": _longbench(_code_sim),
    "passkey": passkey,
    "infinitebench_kv_retrieval": infinitebench_kv_retrieval,
    "scbench_kv_retrieval": scbench_kv_retrieval,
    "code_run": code_run,
    "code_debug": code_debug,
    "infinitebench_math_find": infinitebench_math_find,
    "scbench_math_find": scbench_math_find,
    "math_calc": math_calc,
    "infinitebench_dialogue": infinitebench_dialogue,
    "scbench_dialogue": scbench_dialogue,
    "choice": choice,
    "qa_f1_zh_chars": qa_f1_zh_chars,
    "rouge_lsum": rouge_lsum,
    "scbench_string_match_all": scbench_string_match_all,
}

#: The metrics that need jieba.
JIEBA_METRICS = frozenset({"longbench_qa_f1_zh", "longbench_rouge_zh"})

#: LongBench ``dataset2metric``.
LONGBENCH_METRICS: dict[str, str] = {
    "narrativeqa": "longbench_qa_f1",
    "qasper": "longbench_qa_f1",
    "multifieldqa_en": "longbench_qa_f1",
    "multifieldqa_zh": "longbench_qa_f1_zh",
    "hotpotqa": "longbench_qa_f1",
    "2wikimqa": "longbench_qa_f1",
    "musique": "longbench_qa_f1",
    "dureader": "longbench_rouge_zh",
    "gov_report": "longbench_rouge",
    "qmsum": "longbench_rouge",
    "multi_news": "longbench_rouge",
    "vcsum": "longbench_rouge_zh",
    "trec": "longbench_classification",
    "triviaqa": "longbench_qa_f1",
    "samsum": "longbench_rouge",
    "lsht": "longbench_classification",
    "passage_retrieval_en": "longbench_retrieval",
    "passage_count": "longbench_count",
    "passage_retrieval_zh": "longbench_retrieval_zh",
    "lcc": "longbench_code_sim",
    "repobench-p": "longbench_code_sim",
}
#: The LongBench datasets whose prediction is cut to its first line before scoring (``eval.py``).
LONGBENCH_FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})
#: LongBench ``config/dataset2maxlen.json``.
LONGBENCH_MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

#: InfiniteBench ``get_score_one`` (``NAME_TO_SCORE_GETTER``).
INFINITEBENCH_METRICS: dict[str, str] = {
    "passkey": "passkey",
    "number_string": "passkey",
    "kv_retrieval": "infinitebench_kv_retrieval",
    "kv_retrieval_prefix": "infinitebench_kv_retrieval",
    "kv_retrieval_both": "infinitebench_kv_retrieval",
    "code_run": "code_run",
    "code_debug": "code_debug",
    "longdialogue_qa_eng": "infinitebench_dialogue",
    "longbook_qa_eng": "qa_f1",
    "longbook_sum_eng": "rouge_lsum",
    "longbook_choice_eng": "choice",
    "longbook_qa_chn": "qa_f1_zh_chars",
    "math_find": "infinitebench_math_find",
    "math_calc": "math_calc",
}
#: InfiniteBench ``DATA_NAME_TO_MAX_NEW_TOKENS``.
INFINITEBENCH_MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 6,
    "number_string": 12,
    "kv_retrieval": 50,
    "longbook_sum_eng": 1200,
    "longbook_choice_eng": 40,
    "longbook_qa_eng": 40,
    "longbook_qa_chn": 40,
    "longdialogue_qa_eng": 40,
    "math_find": 3,
    "math_calc": 30000,
    "code_run": 5,
    "code_debug": 5,
}

#: SCBench task (and per-turn ``task`` of the mixed files) -> scorer (``compute_scores.py``); repoqa is absent.
SCBENCH_METRICS: dict[str, str] = {
    "scbench_choice_eng": "choice",
    "scbench_qa_eng": "scbench_dialogue",
    "scbench_qa_chn": "qa_f1_zh_chars",
    "scbench_kv": "scbench_kv_retrieval",
    "scbench_kv_hard": "scbench_kv_retrieval",
    "scbench_hashhop": "scbench_kv_retrieval",
    "scbench_prefix_suffix": "scbench_kv_retrieval",
    "scbench_kv_compressible": "scbench_kv_retrieval",
    "scbench_mf": "scbench_math_find",
    "scbench_passkey": "passkey",
    "scbench_summary": "rouge_lsum",
    "scbench_vt": "scbench_string_match_all",
    "scbench_many_shot": "scbench_dialogue",
}
#: SCBench ``DATA_NAME_TO_MAX_NEW_TOKENS`` (per turn task for the mixed files).
SCBENCH_MAX_NEW_TOKENS: dict[str, int] = {
    "scbench_choice_eng": 40,
    "scbench_qa_eng": 40,
    "scbench_qa_chn": 40,
    "scbench_kv": 150,
    "scbench_kv_hard": 150,
    "scbench_mf": 5,
    "scbench_hashhop": 150,
    "scbench_prefix_suffix": 150,
    "scbench_kv_compressible": 150,
    "scbench_passkey": 15,
    "scbench_repoqa": 1024,
    "scbench_summary": 200,
    "scbench_vt": 30,
    "scbench_many_shot": 10,
}


def longbench_length_bucket(length: int) -> str:
    """LongBench-E's length bucket of a row's ``length``: ``"0-4k"`` (< 4000), ``"4-8k"`` (< 8000) or ``"8k+"``."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def longbench_report(
    samples: Iterable[Any], records: Iterable[Mapping[str, Any]], *, by_length: bool = False
) -> dict[str, Any]:
    """LongBench's ``eval.py`` result from the runner's records of :func:`~hf_longmem.evals.loaders.load_longbench`
    samples: ``{dataset: round(100 * mean score, 2)}`` (``scorer``), or with ``by_length`` LongBench-E's
    ``{dataset: {"0-4k": ..., "4-8k": ..., "8k+": ...}}`` over the rows' ``length`` (``scorer_e``; an empty bucket is
    NaN, as ``np.mean`` of nothing).

    Args:
        samples: the loaded samples (their ``meta`` has ``dataset`` and ``original_length``).
        records: the records of one cache (``evaluate(...)``), each with ``sample_id`` and ``score``.
        by_length: report the LongBench-E length buckets.
    """
    meta = {sample.id: sample.meta for sample in samples}
    records = list(records)
    caches = {record.get("cache") for record in records}
    if len(caches) > 1:
        raise ValueError(f"records of several caches {sorted(map(str, caches))}; pass the records of one cache")
    groups: dict[str, Any] = {}
    for record in records:
        row = meta.get(record["sample_id"])
        if row is None or "dataset" not in row:
            raise ValueError(f"record of sample {record['sample_id']!r} has no LongBench sample among `samples`")
        if not by_length:
            groups.setdefault(row["dataset"], []).append(record["score"])
            continue
        if row.get("original_length") is None:
            raise ValueError(f"sample {record['sample_id']!r} has no `length`; LongBench-E buckets need it")
        buckets = groups.setdefault(row["dataset"], {"0-4k": [], "4-8k": [], "8k+": []})
        buckets[longbench_length_bucket(row["original_length"])].append(record["score"])

    def mean(scores: list[float]) -> float:
        return round(100 * sum(scores) / len(scores), 2) if scores else float("nan")

    if by_length:
        return {name: {key: mean(values) for key, values in buckets.items()} for name, buckets in groups.items()}
    return {name: mean(scores) for name, scores in groups.items()}
