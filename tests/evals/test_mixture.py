"""Training-sequence encoding and the seeded task mixture used by recipes/train_tiny.py."""

from __future__ import annotations

import pytest

from hf_longmem.evals import tasks
from hf_longmem.evals.mixture import EncodedSample, TaskMixture, collate, encode_sample, training_answer
from hf_longmem.evals.tasks import generate_task
from hf_longmem.evals.vocab import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_encode_sample_marks_every_answer_and_eos(tok):
    (sample,) = tasks.shared_context(tok, 400, 1, num_questions=3)
    encoded = encode_sample(tok, sample)
    text = sample.context + "".join(t.query + " " + t.answers[0] + tok.eos_token for t in sample.turns)
    assert encoded.input_ids == tok(text)["input_ids"]
    answer_ids = [i for i, a in zip(encoded.input_ids, encoded.answer_mask) if a]
    expected = []
    for turn in sample.turns:
        expected += tok(" " + turn.answers[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert answer_ids == expected


def test_collate_weights_and_padding(tok):
    mixture = TaskMixture(tok, {"passkey": 1.0})
    batch = collate([mixture.sample(96), mixture.sample(128)], tok.pad_token_id, answer_weight=4.0)
    ids, weights, answer = batch["input_ids"], batch["loss_weights"], batch["answer_mask"]
    assert ids.shape[1] == weights.shape[1] + 1 == answer.shape[1] + 1
    assert set(weights[answer].tolist()) == {4.0} and set(weights[~answer].tolist()) <= {0.0, 1.0}
    assert (weights[0] == 0).sum() == (ids[0] == tok.pad_token_id).sum()
    assert answer.sum(1).tolist() == [6, 6]  # five digits + EOS


def test_mixture_is_seeded_and_redraws_what_does_not_fit(tok):
    weights = {"passkey": 1.0, "multikey_needle": 1.0}
    options = {"multikey_needle": {"num_needles": [4, 5]}}
    first = next(TaskMixture(tok, weights, options, seed=3).batches(iter([(72, 6)])))
    again = next(TaskMixture(tok, weights, options, seed=3).batches(iter([(72, 6)])))
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    assert {s.task for s in first} == {"passkey"}  # four or five needles never fit in 72 tokens
    with pytest.raises(ValueError, match="too short"):
        TaskMixture(tok, {"multikey_needle": 1.0}).sample(40, max_tries=3)


@pytest.mark.parametrize("weights", [{}, {"essay": 1.0}, {"passkey": -1.0}, {"passkey": 0.0}])
def test_bad_weights(tok, weights):
    with pytest.raises(ValueError, match="weights"):
        TaskMixture(tok, weights)


def test_option_sets_keep_options_together(tok):
    """A list of option mappings draws one whole set per sample: every needle asked, for 2 and for 5 needles."""
    sets = [{"num_needles": 2, "num_questions": 2}, {"num_needles": 5, "num_questions": 5}]
    mixture = TaskMixture(tok, {"shared_context": 1.0}, {"shared_context": sets}, seed=0)
    eos = tok.eos_token_id
    counts = {mixture.sample(256).input_ids.count(eos) for _ in range(12)}
    assert counts == {2, 5}  # one EOS per answered question
    with pytest.raises(ValueError, match="non-empty list"):
        TaskMixture(tok, {"shared_context": 1.0}, {"shared_context": []})
    with pytest.raises(ValueError, match="mapping of generator options"):
        TaskMixture(tok, {"passkey": 1.0}, {"passkey": ["depth"]})


def test_recall_all_tasks_train_on_every_answer():
    """A multi-value needle is trained on all its values (scored with string_match_all), a passkey on its one."""
    extended = build_tokenizer(extended=True)
    (sample,) = generate_task("niah_multivalue", extended, 256, 1, num_values=3)
    encoded = encode_sample(extended, sample)
    answer = [i for i, flag in zip(encoded.input_ids, encoded.answer_mask) if flag]
    assert (
        extended.decode(answer[:-1]) == " " + ", ".join(sample.turns[0].answers) and answer[-1] == extended.eos_token_id
    )
    (single,) = generate_task("passkey", extended, 128, 1)
    assert training_answer(single, single.turns[0]) == single.turns[0].answers[0]


def test_first_answer_weight_marks_each_answer_start(tok):
    a = EncodedSample([1, 5, 6, 7, 8, 9, 10], [False, False, True, True, False, True, True], "x")
    batch = collate([a], tok.pad_token_id, 5.0, first_answer_weight=20.0)
    assert batch["loss_weights"].tolist() == [[1.0, 20.0, 5.0, 1.0, 20.0, 5.0]]
    assert collate([a], tok.pad_token_id, 5.0)["loss_weights"].tolist() == [[1.0, 5.0, 5.0, 1.0, 5.0, 5.0]]
