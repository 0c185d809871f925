"""RULER generators: what is planted and asked, the aggregation counts, the QA file readers and their errors."""

from __future__ import annotations

import collections
import json
import re

import pytest

from hf_longmem.evals import ruler
from hf_longmem.evals.metrics import string_match_all, string_match_part
from hf_longmem.evals.vocab import build_tokenizer
from tests.evals.task_fixtures import bpe_tokenizer, hotpotqa_data, squad_data, write_qa_files


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    return bpe_tokenizer()


def test_niah_single_matches_ruler_wording(word_tok):
    for s in ruler.niah_single(word_tok, 400, 3):
        (value,) = s.turns[0].answers
        key = re.search(r"for (\w+) mentioned", s.turns[0].query).group(1)
        assert f"One of the special magic numbers for {key} is: {value}." in s.context
        assert s.context.startswith("A special magic number is hidden within the following text.")
        assert s.turns[0].query.endswith(f"The special magic number for {key} mentioned in the provided text is")


def test_niah_multivalue_and_multiquery(word_tok):
    (s,) = ruler.niah_multivalue(word_tok, 500, 1)
    key = re.search(r"for (\w+) mentioned", s.turns[0].query).group(1)
    assert len(s.turns[0].answers) == 4
    assert all(f"numbers for {key} is: {v}." in s.context for v in s.turns[0].answers)
    assert s.turns[0].query.endswith("mentioned in the provided text are")
    (q,) = ruler.niah_multiquery(word_tok, 500, 1)
    keys = re.search(r"numbers for (.+) mentioned in the provided text\?", q.turns[0].query).group(1)
    keys = keys.replace(", and ", ", ").split(", ")
    assert len(keys) == 4 and len(q.turns[0].answers) == 4
    for key, value in zip(keys, q.turns[0].answers):
        assert f"numbers for {key} is: {value}." in q.context
    assert string_match_all(" " + ", ".join(q.turns[0].answers[:2]), q.turns[0].answers) == 0.5


def test_niah_needle_haystack_asks_a_key_planted_once(word_tok):
    for s in ruler.niah_multikey_haystack(word_tok, 600, 3):
        key = re.search(r"for (\w+) mentioned", s.turns[0].query).group(1)
        assert s.context.count("One of the special magic numbers for") > 20
        assert s.context.count(f"numbers for {key} is:") == 1


@pytest.mark.parametrize("value_type", ["words", "uuids"])
def test_niah_value_types(value_type, bpe_tok):
    (s,) = ruler.niah(bpe_tok, 500, 1, num_keys=3, num_values=2, num_queries=2, value_type=value_type, depth=0.5)
    assert len(s.turns[0].answers) == 4 and s.meta["depths"] == [0.5] * 6
    for value in s.turns[0].answers:
        assert f"special magic {value_type} for" in s.context and f"is: {value}." in s.context
        if value_type == "uuids":
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", value)


def test_common_words_counts(word_tok, bpe_tok):
    for tok, length in [(word_tok, 700), (bpe_tok, 1500)]:
        for s in ruler.common_words(tok, length, 2):
            listed = s.context.split("Memorize the ones that appear most often.\n")[-1]
            counts = collections.Counter(re.findall(r"\d+\. (\w+)", listed))
            assert sum(counts.values()) == len(re.findall(r"\d+\.", listed))
            assert sorted(w for w, c in counts.items() if c == 6) == sorted(s.turns[0].answers)
            assert all(c == 1 for w, c in counts.items() if w not in s.turns[0].answers)
            assert len(counts) == 10 + s.meta["num_uncommon"]
            assert s.context.count("Question: What are the 10 most common words") == 1  # the few-shot example


def test_common_words_pool_limits_are_clear(word_tok):
    with pytest.raises(ValueError, match="more than the 54 units"):
        ruler.common_words(word_tok, 2000, 1)
    with pytest.raises(ValueError, match="too short"):
        ruler.common_words(word_tok, 300, 1)
    with pytest.raises(ValueError, match="freq_uncommon"):
        ruler.common_words(word_tok, 700, 1, freq_common=3, freq_uncommon=3)


@pytest.mark.parametrize("tok_name", ["word", "bpe"])
def test_frequent_words_answer_is_the_zipf_top_three(tok_name, word_tok, bpe_tok):
    tok = word_tok if tok_name == "word" else bpe_tok
    for s in ruler.frequent_words(tok, 800, 2):
        text = s.context.removeprefix(ruler.FWE_INTRO)
        counts = collections.Counter(text.split(" "))
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "..." and ranked[1:4] == s.turns[0].answers
        assert counts[ranked[3]] > counts[ranked[4]]
        n, zeta = s.meta["num_words"], ruler._zeta(2.0)
        assert counts[ranked[1]] == int(n * 2**-2 / zeta)
        unknown = tok.unk_token_id
        assert unknown is None or unknown not in tok(" " + " ".join(s.turns[0].answers))["input_ids"]


def test_zeta_is_accurate():
    assert ruler._zeta(2.0) == pytest.approx(3.141592653589793**2 / 6, abs=1e-9)
    assert ruler._zeta(4.0) == pytest.approx(3.141592653589793**4 / 90, abs=1e-9)


def test_qa_squad_and_hotpotqa(tmp_path, word_tok):
    paths = write_qa_files(tmp_path)
    items, docs = ruler.read_squad(paths["squad"])
    assert len(items) == 12 and len(docs) == 12  # the unanswerable questions are skipped
    assert all(len(i.related) == 2 for i in items)
    for s in ruler.qa_squad(word_tok, 400, 4, path=paths["squad"]):
        question = s.turns[0].query.split("Question: ")[1].removesuffix(" Answer:")
        item = next(i for i in items if i.question == question)
        assert docs[item.gold[0]] in s.context and s.turns[0].answers == list(item.answers)
        assert s.context.startswith(ruler.QA_INTRO + "Document 1:\n")
    h_items, h_docs = ruler.read_hotpotqa(paths["hotpotqa"])
    assert len(h_items) == 6 and len(h_docs) == 12 and all(len(i.gold) == 2 for i in h_items)
    for s in ruler.qa_hotpotqa(word_tok, 300, 3, path=paths["hotpotqa"]):
        assert s.turns[0].answers[0] in s.context and s.meta["num_docs"] >= 2
    # More documents than the file holds: repeated, as RULER does.
    (big,) = ruler.qa_hotpotqa(word_tok, 3000, 1, path=paths["hotpotqa"])
    assert big.meta["num_docs"] > len(h_docs)


def test_string_match_part():
    assert string_match_part(" It is in Room 112.", ["room 112", "r112"]) == 1.0
    assert string_match_part(" room 11", ["room 112"]) == 0.0


def _write(tmp_path, data, name="f.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("reader", "data", "match"),
    [
        ("squad", "{not json", "not valid JSON"),
        ("squad", [1, 2], '"data" list'),
        ("squad", {"data": [{"title": "x"}]}, r'data\[0\] must have a "paragraphs" list'),
        ("squad", {"data": [{"paragraphs": [{"context": "c"}]}]}, r'paragraphs\[0\] must have a "qas" list'),
        (
            "squad",
            {"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": ["a"]}]}]}]},
            "answers",
        ),
        ("squad", {"data": [{"paragraphs": [{"context": "c", "qas": []}]}]}, "no answerable question"),
        ("hotpotqa", {"data": []}, "list of questions"),
        ("hotpotqa", [{"question": "q"}], '"question" and "answer"'),
        ("hotpotqa", [{"question": "q", "answer": "a", "context": [["t", "s"]]}], r"\[0\]\.context"),
    ],
)
def test_qa_readers_reject_malformed_files(tmp_path, reader, data, match):
    with pytest.raises(ValueError, match=match):
        ruler.QA_READERS[reader](_write(tmp_path, data))


def test_qa_bad_arguments(tmp_path, word_tok):
    with pytest.raises(ValueError, match="not found"):
        ruler.qa_squad(word_tok, 400, 1, path=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="dataset"):
        ruler.qa(word_tok, 400, 1, path=_write(tmp_path, squad_data()), dataset="nq")
    with pytest.raises(ValueError, match="too short"):
        ruler.qa_hotpotqa(word_tok, 30, 1, path=_write(tmp_path, hotpotqa_data()))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"haystack": "essay"}, "haystack"),
        ({"value_type": "names"}, "value_type"),
        ({"num_values": 0}, "num_values"),
        ({"num_keys": 10_000}, "num_keys"),
        ({"depth": 2.0}, "depth"),
        ({"words": ["a b"]}, "single words"),
        ({"words": ["apple"]}, "needs 2 distinct words"),
    ],
)
def test_niah_bad_arguments(options, match, word_tok):
    with pytest.raises(ValueError, match=match):
        ruler.niah(word_tok, 400, 1, **options)
