"""Generated recall tasks (hf_longmem/evals/recall.py)."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.evals.recall import (
    RecallMixture,
    RecallVocabulary,
    collate_recall,
    evaluate_recall,
    generate_recall,
)
from hf_longmem.evals.vocab import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("length", [40, 77, 160])
def test_mqar_layout(tokenizer, length):
    vocab = RecallVocabulary(tokenizer)
    for sample in generate_recall("mqar", vocab, length, 5, seed=3, num_pairs=6, num_queries=4):
        ids = sample.input_ids
        assert len(ids) == len(sample.answer_mask) == length and ids[0] == tokenizer.bos_token_id
        pairs = dict(zip(ids[1:13:2], ids[2:13:2]))
        assert len(pairs) == 6 and set(pairs) <= set(vocab.keys) and set(pairs.values()) <= set(vocab.values)
        answers = [i for i, a in enumerate(sample.answer_mask) if a]
        assert len(answers) == 4 and answers[-1] == length - 1
        for i in answers:  # every answer is the value of the key right before it
            assert pairs[ids[i - 1]] == ids[i]
        assert sample.loss_mask == sample.answer_mask


def test_mqar_spread_queries(tokenizer):
    vocab = RecallVocabulary(tokenizer)
    ends = generate_recall("mqar", vocab, 64, 40, seed=2, num_pairs=4)
    spread = generate_recall("mqar", vocab, 64, 40, seed=2, num_pairs=4, query_placement="spread")
    first_answers = set()
    for end, sample in zip(ends, spread):
        ids = sample.input_ids
        assert len(ids) == len(sample.answer_mask) == 64 and ids[:9] == end.input_ids[:9]  # same pairs
        pairs = dict(zip(ids[1:9:2], ids[2:9:2]))
        answers = [i for i, a in enumerate(sample.answer_mask) if a]
        assert len(answers) == 4 and sample.loss_mask == sample.answer_mask
        for i in answers:
            assert pairs[ids[i - 1]] == ids[i]
        assert sorted(ids[9:]) == sorted(end.input_ids[9:])  # the same filler and queries, rearranged
        first_answers.add(answers[0])
    assert min(first_answers) < 20 and max(first_answers) > 40  # short- and long-range queries


def test_mqar_groups(tokenizer):
    vocab = RecallVocabulary(tokenizer)
    key_group = {key: i // 16 for i, key in enumerate(vocab.keys)}  # 64 keys -> 4 groups of 16
    value_group = {value: i // 8 for i, value in enumerate(vocab.values[:32])}  # 34 values -> 4 groups of 8
    for sample in generate_recall("mqar", vocab, 99, 20, seed=5, num_pairs=48, num_queries=1, num_groups=4):
        ids = sample.input_ids
        pairs = list(zip(ids[1:97:2], ids[2:97:2]))
        assert len({k for k, _ in pairs}) == 48
        assert all(value in value_group and key_group[key] == value_group[value] for key, value in pairs)
        assert sorted(key_group[key] for key, _ in pairs) == sorted(list(range(4)) * 12)  # balanced groups
        assert all(vocab.key_group(key, 4) == key_group[key] for key, _ in pairs)
        (answer,) = [i for i, a in enumerate(sample.answer_mask) if a]
        assert dict(pairs)[ids[answer - 1]] == ids[answer]
    plain = generate_recall("mqar", vocab, 40, 3, seed=1, num_pairs=6)
    assert [s.input_ids for s in plain] == [
        s.input_ids for s in generate_recall("mqar", vocab, 40, 3, seed=1, num_pairs=6, num_groups=1)
    ]
    with pytest.raises(ValueError, match="num_groups"):
        generate_recall("mqar", vocab, 40, 1, num_pairs=4, num_groups=0)
    with pytest.raises(ValueError, match="num_groups=3"):
        generate_recall("mqar", vocab, 200, 1, num_pairs=64, num_groups=3)  # 21 keys per group


def test_fact_recall_is_language_with_answers(tokenizer):
    for sample in generate_recall("fact_recall", tokenizer, 120, 6, seed=1, num_facts=3):
        assert len(sample.input_ids) == 120 and sum(sample.answer_mask) == 3
        text = tokenizer.decode(sample.input_ids)
        for i in (i for i, a in enumerate(sample.answer_mask) if a):
            question = tokenizer.decode(sample.input_ids[:i])
            key = question.rsplit("The ", 1)[1].split(" ")[0]
            fact = f"The {key} is{tokenizer.decode([sample.input_ids[i]])}."
            assert text.index(fact) < question.rindex("What is")  # stated before it is asked
        assert all(sample.loss_mask[1:]) and not sample.loss_mask[0]


def test_seeding_and_collate(tokenizer):
    a = generate_recall("mqar", tokenizer, 64, 4, seed=0, num_pairs=4)
    b = generate_recall("mqar", tokenizer, 64, 6, seed=0, num_pairs=4)
    c = generate_recall("mqar", tokenizer, 64, 4, seed=1, num_pairs=4)
    assert [s.input_ids for s in a] == [s.input_ids for s in b[:4]] != [s.input_ids for s in c]
    batch = collate_recall(a, answer_weight=3.0)
    assert batch["input_ids"].shape == (4, 64) and batch["loss_weights"].shape == (4, 63)
    assert torch.equal(batch["loss_weights"] == 3.0, batch["answer_mask"])


def test_mixture_stream(tokenizer):
    mixture = RecallMixture(tokenizer, {"mqar": {"weight": 1, "num_pairs": [2, 3]}, "fact_recall": {"weight": 1}}, 0)
    batches = mixture.batches(3, 96)
    seen = {s.task for _ in range(8) for s in next(batches)}
    assert seen == {"mqar", "fact_recall"}
    lengths = RecallMixture(tokenizer, {"mqar": {"num_pairs": 2, "length": [16, 40]}}, 0).batches(2, 96)
    assert {len(s.input_ids) for _ in range(12) for s in next(lengths)} == {16, 40}  # per-task length mixture
    variants = [{"num_pairs": 2, "length": 9}, {"num_pairs": 6, "length": 25}]
    tied = RecallMixture(tokenizer, {"mqar": {"num_queries": None, "variants": variants}}, 0).batches(2, 96)
    shapes = {(len(s.input_ids), sum(s.answer_mask)) for _ in range(12) for s in next(tied)}
    assert shapes == {(9, 2), (25, 6)}  # length tied to the number of pairs (dense: no filler)
    with pytest.raises(ValueError, match="variants"):
        RecallMixture(tokenizer, {"mqar": {"variants": []}}, 0)
    with pytest.raises(ValueError, match="weight"):
        RecallMixture(tokenizer, {"mqar": {"variants": [{"weight": 2.0}]}}, 0)


def test_evaluate_recall_counts_answers(tokenizer):
    class Oracle(torch.nn.Module):  # predicts each sequence's own next token: every answer right
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.nn.functional.one_hot(input_ids.roll(-1, 1), len(tokenizer)).float()
            return type("Out", (), {"logits": logits})()

    result = evaluate_recall(Oracle(), tokenizer, "mqar", length=48, num_samples=5, batch_size=2, num_pairs=3)
    assert result["accuracy"] == 1.0 and result["exact"] == 1.0 and result["num_samples"] == 5


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="num_pairs"):
        generate_recall("mqar", tokenizer, 64, 1, num_pairs=0)
    with pytest.raises(ValueError, match="num_queries"):
        generate_recall("mqar", tokenizer, 64, 1, num_pairs=2, num_queries=3)
    with pytest.raises(ValueError, match="length"):
        generate_recall("mqar", tokenizer, 10, 1, num_pairs=8)
    with pytest.raises(ValueError, match="query_placement"):
        generate_recall("mqar", tokenizer, 64, 1, num_pairs=2, query_placement="middle")
    with pytest.raises(ValueError, match="name"):
        generate_recall("nope", tokenizer, 64, 1)
    with pytest.raises(ValueError, match="tasks"):
        RecallMixture(tokenizer, {"nope": {}})
