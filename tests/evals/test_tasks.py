"""Synthetic task generators: determinism, token-length fitting (two tokenizers), answers, argument errors."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_longmem.evals import tasks
from hf_longmem.evals.haystack import FILLER_SENTENCES, PromptTooLongError, count_tokens
from hf_longmem.evals.schema import Sample
from hf_longmem.evals.vocab import build_tokenizer, pieces

SINGLE_TASKS = ["passkey", "multikey_needle", "variable_tracking"]


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    """A second, unrelated tokenizer: byte-level BPE (300 tokens) trained here, no special prefix."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"], show_progress=False)
    backend.train_from_iterator(tasks.vocabulary_texts() * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")


@pytest.fixture(params=["word", "bpe"])
def any_tok(request, word_tok, bpe_tok):
    return word_tok if request.param == "word" else bpe_tok


def _unit_tokens(tokenizer) -> int:
    return max(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER_SENTENCES)


@pytest.mark.parametrize("name", [*SINGLE_TASKS, "shared_context"])
@pytest.mark.parametrize("length", [256, 700])
def test_length_fitted_in_tokens(name, length, any_tok):
    samples = tasks.generate_task(name, any_tok, length, 3, seed=1)
    for s in samples:
        num_tokens = count_tokens(any_tok, s.context + s.turns[0].query)
        assert s.meta["num_tokens"] == num_tokens
        assert 0 <= length - num_tokens <= _unit_tokens(any_tok) + 1
        assert s.meta["length"] == length and 0 <= s.meta["depth"] <= 1


@pytest.mark.parametrize("name", [*SINGLE_TASKS, "shared_context"])
def test_deterministic_per_seed_and_prefix_stable(name, word_tok):
    a = tasks.generate_task(name, word_tok, 300, 4, seed=7)
    b = tasks.generate_task(name, word_tok, 300, 4, seed=7)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.to_dict() for s in tasks.generate_task(name, word_tok, 300, 2, seed=7)] == [s.to_dict() for s in a[:2]]
    other = tasks.generate_task(name, word_tok, 300, 4, seed=8)
    assert [s.context for s in other] != [s.context for s in a]
    assert len({s.id for s in a}) == 4 and all(s.task == name for s in a)
    assert [Sample.from_dict(s.to_dict()) for s in a] == a


def test_passkey_answer_and_depth(word_tok):
    for s in tasks.passkey(word_tok, 400, 5):
        (key,) = s.turns[0].answers
        assert re.fullmatch(r"[1-9]\d{4}", key)
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.context
        assert s.turns[0].query.endswith("The pass key is")
    (first,) = tasks.passkey(word_tok, 400, 1, depth=0.0)
    assert first.context.startswith(tasks.PASSKEY_INTRO + " The pass key is")
    (last,) = tasks.passkey(word_tok, 400, 1, depth=1.0)
    assert last.context.endswith("is the pass key.")
    assert first.meta["depth"] == 0.0 and last.meta["depth"] == 1.0


def test_multikey_needle_answers_match_the_asked_key(any_tok):
    for s in tasks.multikey_needle(any_tok, 500, 5, num_needles=5, depth=0.5):
        needles = dict(re.findall(r"magic numbers for (\w+) is: (\d+)\.", s.context))
        assert len(needles) == 5 and len(set(needles.values())) == 5
        key = re.search(r"magic number for (\w+) mentioned", s.turns[0].query).group(1)
        assert needles[key] == s.turns[0].answers[0] and len(s.turns[0].answers[0]) == 7
        assert s.meta["depth"] == 0.5


def test_variable_tracking_chain_in_order(word_tok):
    for s in tasks.variable_tracking(word_tok, 500, 5, num_chains=2, num_hops=3):
        names = s.turns[0].answers[0].split(" ")
        value = re.search(r"value (\d+) in the text", s.turns[0].query).group(1)
        assert len(names) == 4
        positions = [s.context.index(f"VAR {names[0]} = {value}.")]
        positions += [s.context.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
        assert positions == sorted(positions)
        assert len(re.findall(r"VAR \w = \d+\.", s.context)) == 2


@pytest.mark.parametrize("generator", ["multikey_needle", "variable_tracking"])
def test_shared_context_asks_distinct_planted_facts(generator, word_tok):
    for s in tasks.shared_context(word_tok, 600, 3, generator=generator, num_questions=3):
        assert s.task == "shared_context" and s.meta["generator"] == generator
        assert len(s.turns) == 3 and len({t.query for t in s.turns}) == 3
        for turn in s.turns:
            assert turn.answers[0].split(" ")[0] in s.context
            assert turn.query.startswith("\n") and not turn.query.endswith(" ")


def test_word_tokenizer_round_trips_every_task(word_tok):
    # The generators of this module only: their whole vocabulary is the embedded tokenizer's (the other task families
    # use RULER's wording and are checked in tests/evals/test_task_registry.py).
    for name in [*SINGLE_TASKS, "shared_context"]:
        for s in tasks.generate_task(name, word_tok, 300, 2):
            text = s.context + "".join(t.query + " " + t.answers[0] for t in s.turns)
            ids = word_tok(text)["input_ids"]
            assert ids[0] == word_tok.bos_token_id and word_tok.unk_token_id not in ids
            assert word_tok.decode(ids, skip_special_tokens=True) == text
            assert len(ids) == len(pieces(text)) + 1


def test_unknown_task_name(word_tok):
    with pytest.raises(ValueError, match="unknown task name 'needle'.*passkey"):
        tasks.generate_task("needle", word_tok, 256, 1)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: tasks.passkey(t, 0, 1), "length"),
        (lambda t: tasks.passkey(t, 256, -1), "num_samples"),
        (lambda t: tasks.passkey(t, 256, 1, seed=-3), "seed"),
        (lambda t: tasks.passkey(t, 256, 1, depth=1.5), "depth"),
        (lambda t: tasks.passkey(t, 256, 1, num_digits=0), "num_digits"),
        (lambda t: tasks.passkey("not a tokenizer", 256, 1), "tokenizer"),
        (lambda t: tasks.multikey_needle(t, 256, 1, num_needles=0), "num_needles"),
        (lambda t: tasks.multikey_needle(t, 256, 1, num_needles=len(tasks.KEY_WORDS) + 1), "num_needles"),
        (lambda t: tasks.variable_tracking(t, 256, 1, num_hops=-1), "num_hops"),
        (lambda t: tasks.variable_tracking(t, 256, 1, num_chains=9, num_hops=2), "num_chains"),
        (lambda t: tasks.shared_context(t, 256, 1, generator="essay"), "generator"),
        (lambda t: tasks.shared_context(t, 256, 1, generator="passkey", num_questions=2), "num_questions"),
        (lambda t: tasks.shared_context(t, 600, 1, num_needles=2, num_questions=3), "num_needles"),
        (lambda t: tasks.shared_context(t, 600, 1, colour="red"), "colour"),
        (lambda t: tasks.generate_task("passkey", t, 256, 1, num_needles=3), "num_needles"),
        (lambda t: tasks.multikey_needle(t, 40, 1), "length=40 is too short"),
    ],
)
def test_bad_arguments(call, match, word_tok):
    with pytest.raises(ValueError, match=match):
        call(word_tok)


def test_too_short_is_a_value_error_subclass(word_tok):
    with pytest.raises(PromptTooLongError):
        tasks.passkey(word_tok, 10, 1)
    assert tasks.passkey(word_tok, 256, 0) == []
