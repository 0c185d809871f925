"""In-context fictional facts (fact_qa) and the extended closed vocabulary that covers them."""

from __future__ import annotations

import pytest

from hf_longmem.editing.data import fictional_facts
from hf_longmem.evals import facts
from hf_longmem.evals.tasks import generate_task
from hf_longmem.evals.vocab import build_tokenizer, pieces


@pytest.fixture(scope="module")
def extended():
    return build_tokenizer(extended=True)


def test_questions_ask_stated_facts_with_several_phrasings(extended):
    phrasings = set()
    for sample in facts.fact_qa(extended, 400, 20, seed=3, num_facts=5, num_questions=3):
        assert len(sample.turns) == 3 and len(set(sample.meta["subjects"])) == 3
        for turn, subject in zip(sample.turns, sample.meta["subjects"]):
            assert subject in turn.query
            statement = next(s for s in sample.context.split(". ") if f" {subject} " in s + " ")
            assert statement.rstrip(".").endswith(" " + turn.answers[0])  # the stated target is the answer
            family = next(f for f in facts.FACT_FAMILIES if turn.query in facts.question_texts(f, subject))
            phrasings.add((family["prompt"], turn.query.replace(subject, "{s}")))
        text = sample.context + "".join(t.query + " " + t.answers[0] for t in sample.turns)
        ids = extended(text)["input_ids"]
        assert extended.unk_token_id not in ids and len(ids) == len(pieces(text)) + 1
    assert len({prompt for prompt, _ in phrasings}) >= 4 and len(phrasings) >= 10


def test_base_vocabulary_is_refused_and_extended_covers_ruler_and_wise(extended):
    with pytest.raises(ValueError, match="extended=True"):
        generate_task("fact_qa", build_tokenizer(), 300, 1)
    with pytest.raises(ValueError, match="num_questions"):
        facts.fact_qa(extended, 300, 1, num_facts=2, num_questions=3)
    base = build_tokenizer()
    assert set(base.get_vocab()) < set(extended.get_vocab())  # a superset: v1 texts tokenize the same
    for name in ("niah_multivalue", "niah_multiquery"):
        (sample,) = generate_task(name, extended, 300, 1)
        assert extended.unk_token_id not in extended(sample.context + sample.turns[0].query)["input_ids"]
    for record in fictional_facts(extended, 20, num_paraphrases=2):
        texts = [record.prompt, *record.paraphrases, record.locality_prompt, " " + record.target]
        assert all(extended.unk_token_id not in extended(t)["input_ids"] for t in texts)
