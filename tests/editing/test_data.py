"""Edit sets: fictional facts from the words a tokenizer knows, unrelated prompts, the ZsRE loader, tokenization."""

from __future__ import annotations

import json

import pytest

from hf_longmem.editing import fictional_facts, load_edits, unrelated_prompts
from hf_longmem.editing.data import encode_pair, known_text
from tests.helpers.tiny_tokenizer import tiny_tokenizer


def _texts(record):
    return [record.prompt, record.target, *record.paraphrases, record.locality_prompt, record.locality_answer]


def test_fictional_facts_respect_a_closed_vocabulary(word_tokenizer):
    facts = fictional_facts(word_tokenizer, 200, seed=3, num_paraphrases=2)
    assert len({f.subject for f in facts}) == 200  # every entity is new
    assert len({f.prompt.replace(f.subject, "{s}") for f in facts}) >= 3  # several relation families
    for fact in facts:
        for text in _texts(fact):
            assert known_text(word_tokenizer, text), text  # no [UNK], decodes back to itself
        assert len(fact.paraphrases) == 2 and all(fact.subject in p for p in fact.paraphrases)
        assert fact.target not in fact.prompt.split()
    assert fictional_facts(word_tokenizer, 200, seed=3, num_paraphrases=2) == facts
    assert fictional_facts(word_tokenizer, 5, seed=4) != facts[:5]


def test_fictional_facts_with_open_and_character_tokenizers():
    tokenizer = tiny_tokenizer()  # every ASCII letter is known: all families are usable
    facts = fictional_facts(tokenizer, 30, seed=0)
    assert len({f.prompt.replace(f.subject, "{s}") for f in facts}) >= 5
    assert all(known_text(tokenizer, t) for f in facts for t in _texts(f))


def test_unrelated_prompts_are_known_and_seeded(word_tokenizer):
    pairs = unrelated_prompts(word_tokenizer, 20, seed=1)
    assert pairs == unrelated_prompts(word_tokenizer, 20, seed=1) and len(set(pairs)) > 10
    assert all(known_text(word_tokenizer, p + " " + a) for p, a in pairs)
    with pytest.raises(ValueError, match="num_prompts"):
        unrelated_prompts(word_tokenizer, 0)
    with pytest.raises(ValueError, match="num_facts"):
        fictional_facts(word_tokenizer, -1)


def test_encode_pair_finds_target_tokens(word_tokenizer):
    ids, num_prompt = encode_pair(word_tokenizer, "The pass key of the tiger is", "4 7")
    pieces = word_tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == "<s>" and pieces[num_prompt:] == [" 4", " 7"]
    char_ids, char_prompt = encode_pair(tiny_tokenizer(), "ab", "cd")
    assert len(char_ids) == 6 and char_prompt == 3  # <s> a b | " " c d
    with pytest.raises(ValueError, match="target"):
        encode_pair(word_tokenizer, "The tiger is", "  ")


def test_load_zsre_json_and_jsonl(tmp_path):
    zsre = [
        {
            "subject": "Watts Humphrey",
            "src": "What university did Watts Humphrey attend?",
            "pred": "Trinity College",
            "rephrase": "What university did Watts Humphrey take part in?",
            "alt": "University of Michigan",
            "answers": ["Illinois Institute of Technology"],
            "loc": "nq question: who played desmond doss father",
            "loc_ans": "Hugo Weaving",
            "cond": "Trinity College >> University of Michigan || ...",
        },
    ]
    path = tmp_path / "zsre_mend_eval.json"
    path.write_text(json.dumps(zsre * 3))
    records = load_edits(path, limit=2)
    assert len(records) == 2
    record = records[0]
    assert record.prompt == zsre[0]["src"] and record.target == "University of Michigan"
    assert record.paraphrases == [zsre[0]["rephrase"]] and record.locality_answer == "Hugo Weaving"
    assert record.ground_truth == "Illinois Institute of Technology" and record.source == "zsre_mend_eval.json"
    lines = tmp_path / "edits.jsonl"
    lines.write_text(json.dumps({"prompt": "A is", "target": "B", "paraphrases": ["Is A", "A:"]}) + "\n\n")
    assert load_edits(lines)[0].paraphrases == ["Is A", "A:"]


def test_load_edits_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_edits(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "A is", "target": "B"}\n{"prompt": "C is"}\n')
    with pytest.raises(ValueError, match="line 2.*'target'"):
        load_edits(bad)
    bad.write_text('{"prompt": "A is", "target": "B"\n')
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_edits(bad)
