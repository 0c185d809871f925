"""Generated recall tasks for training and evaluating memory architectures from scratch.

Two seeded generators over the closed vocabulary of :mod:`hf_longmem.evals.vocab` (no downloads):

- :func:`mqar` — multi-query associative recall (Arora et al., 2023, "Zoology"): ``num_pairs`` key-value pairs
  (keys are the 64 one-word keys of :data:`hf_longmem.evals.tasks.KEY_WORDS`, values are the one-letter names and
  digits), then ``gap`` tokens of filler language, then the keys again in a random order, each followed by its value.
  The targets are the values in the query part. A model with a sliding window shorter than the distance between a
  pair and its query cannot answer from attention alone: it needs a memory.
- :func:`fact_recall` — simple language: sentences ``"The apple is Q."`` planted in filler sentences, then the
  questions ``"What is the apple? The apple is Q."``. Every token is a language-modelling target; the answer letters
  are the recall targets.

Every sample has exactly ``length`` tokens (BOS included), so batches need no padding. Sample ``i`` of seed ``s``
depends on ``(task, s, i)`` only. :class:`RecallMixture` streams training batches from a weighted mixture, and
:func:`evaluate_recall` measures teacher-forced answer accuracy of any causal LM (``model(input_ids).logits``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .haystack import FILLER_SENTENCES
from .tasks import KEY_WORDS, VARIABLE_NAMES

#: Value pool of the recall tasks: one-letter names and digits (with a leading space).
VALUE_WORDS: tuple[str, ...] = (*VARIABLE_NAMES, *"0123456789")


@dataclass
class RecallSample:
    """One generated sequence.

    Attributes:
        input_ids: ``[length]`` token ids, starting with BOS.
        answer_mask: ``[length]`` bool, True on the answer tokens (the recall targets; the token before each one is
            the position that has to predict it).
        loss_mask: ``[length]`` bool, True on tokens that are language-modelling targets (answers included).
        task: generator name.
    """

    input_ids: list[int]
    answer_mask: list[bool]
    loss_mask: list[bool]
    task: str


class RecallVocabulary:
    """Token ids of the pools the generators draw from, taken from a tokenizer of :mod:`hf_longmem.evals.vocab`."""

    def __init__(self, tokenizer: Any):
        vocab = tokenizer.get_vocab()

        def ids(words: tuple[str, ...], name: str) -> list[int]:
            missing = [w for w in words if " " + w not in vocab]
            if missing:
                raise ValueError(f"tokenizer lacks the {name} tokens {missing[:5]} (use hf_longmem.evals.vocab)")
            return [vocab[" " + w] for w in words]

        if tokenizer.bos_token_id is None:
            raise ValueError("tokenizer must define a bos_token")
        self.bos = tokenizer.bos_token_id
        self.keys = ids(KEY_WORDS, "key")
        self.values = ids(VALUE_WORDS, "value")
        self.filler = [tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in FILLER_SENTENCES]
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def key_group(self, key_id: int, num_groups: int) -> int:
        """The group of key token ``key_id`` in :func:`mqar` with ``num_groups`` (contiguous slices of the key pool)."""
        return self.keys.index(key_id) // (len(self.keys) // num_groups)

    def filler_tokens(self, rng: random.Random, n: int) -> list[int]:
        """``n`` tokens of filler sentences drawn at random (cut at ``n``)."""
        out: list[int] = []
        while len(out) < n:
            out += rng.choice(self.filler)
        return out[:n]


def _check(length: int, needed: int, what: str) -> None:
    if length < needed:
        raise ValueError(f"length={length} is too short for {what} (needs at least {needed} tokens)")


def mqar(
    vocab: RecallVocabulary,
    length: int,
    rng: random.Random,
    *,
    num_pairs: int = 8,
    num_queries: int | None = None,
    query_placement: str = "end",
    num_groups: int = 1,
) -> RecallSample:
    """One multi-query associative recall sample of exactly ``length`` tokens.

    Layout (``query_placement="end"``): ``BOS k_1 v_1 ... k_N v_N <filler> k_a v_a k_b v_b ...`` with distinct keys,
    values drawn with replacement, queries a random subset (``num_queries``, default all ``num_pairs``) in random
    order at the end: every query is at least ``length - 2 * (num_pairs + num_queries)`` tokens after every pair.
    ``query_placement="spread"`` (Zoology's layout) puts each query pair ``k_a v_a`` at a uniformly random place in
    the filler after the pairs instead, so query distances range from 1 token to the whole gap; it gives short-range
    training signal, while ``"end"`` measures recall across the full gap.

    ``num_groups > 1`` gives the pairs a topic structure: the key pool and the value pool are each cut into
    ``num_groups`` contiguous groups, pair ``i`` belongs to group ``i % num_groups`` (so the groups are balanced), draws
    its key and value from that group's pools, and the pairs are shuffled. A key's group is visible from the key
    token alone, which is what a mixture-of-memories router can use to give each group its own memory.
    ``num_groups=1`` is plain MQAR (the same samples as before the option existed).

    Raises:
        ValueError: ``num_pairs`` outside ``[1, 64]`` (or more pairs of a group than its keys), ``num_queries``
            outside ``[1, num_pairs]``, ``num_groups`` outside ``[1, number of values]``, an unknown
            ``query_placement``, or ``length`` shorter than the pairs and queries.
    """
    if query_placement not in ("end", "spread"):
        raise ValueError(f"query_placement must be 'end' or 'spread', got {query_placement!r}")
    if not 1 <= num_pairs <= len(vocab.keys):
        raise ValueError(f"num_pairs must be in [1, {len(vocab.keys)}], got {num_pairs}")
    num_queries = num_pairs if num_queries is None else num_queries
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"num_queries must be in [1, num_pairs={num_pairs}], got {num_queries}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= len(vocab.values):
        raise ValueError(f"num_groups must be an int in [1, {len(vocab.values)}], got {num_groups!r}")
    keys_per_group = len(vocab.keys) // num_groups
    if -(-num_pairs // num_groups) > keys_per_group:
        raise ValueError(
            f"num_pairs={num_pairs} needs more than the {keys_per_group} keys of each of the num_groups={num_groups} "
            "groups"
        )
    _check(length, 1 + 2 * num_pairs + 2 * num_queries, f"mqar with {num_pairs} pairs")
    if num_groups == 1:
        keys = rng.sample(vocab.keys, num_pairs)
        values = [rng.choice(vocab.values) for _ in keys]
    else:
        values_per_group = len(vocab.values) // num_groups
        groups = [i % num_groups for i in range(num_pairs)]
        rng.shuffle(groups)
        group_keys = [
            iter(rng.sample(vocab.keys[g * keys_per_group : (g + 1) * keys_per_group], groups.count(g)))
            for g in range(num_groups)
        ]
        keys = [next(group_keys[g]) for g in groups]
        values = [rng.choice(vocab.values[g * values_per_group : (g + 1) * values_per_group]) for g in groups]
    pairs = [t for kv in zip(keys, values) for t in kv]
    asked = rng.sample(range(num_pairs), num_queries)
    queries = [t for i in asked for t in (keys[i], values[i])]  # only counted here; laid out below
    gap = length - 1 - len(pairs) - len(queries)
    filler = vocab.filler_tokens(rng, gap)
    # filler tokens before each query pair: all of them before the first ("end"), or random cut points ("spread")
    cuts = [gap] * num_queries if query_placement == "end" else sorted(rng.randint(0, gap) for _ in asked)
    ids, answer, start = [vocab.bos, *pairs], [False] * (1 + len(pairs)), 0
    for cut, i in zip(cuts, asked):
        ids += [*filler[start:cut], keys[i], values[i]]
        answer += [False] * (cut - start) + [False, True]
        start = cut
    ids += filler[start:]
    answer += [False] * (gap - start)
    return RecallSample(ids, answer, list(answer), "mqar")


def fact_recall(
    vocab: RecallVocabulary, length: int, rng: random.Random, *, num_facts: int = 4, num_queries: int | None = None
) -> RecallSample:
    """One language recall sample of exactly ``length`` tokens.

    ``"The apple is Q."`` facts at random places in the first half of filler sentences, then the questions
    ``"What is the apple? The apple is Q."`` for ``num_queries`` of them; trailing filler pads to ``length``.
    Every token after BOS is a language-modelling target; the value tokens of the answers are recall targets.

    Raises:
        ValueError: bad ``num_facts``/``num_queries`` or ``length`` too short for the facts and questions.
    """
    if not 1 <= num_facts <= len(vocab.keys):
        raise ValueError(f"num_facts must be in [1, {len(vocab.keys)}], got {num_facts}")
    num_queries = num_facts if num_queries is None else num_queries
    if not 1 <= num_queries <= num_facts:
        raise ValueError(f"num_queries must be in [1, num_facts={num_facts}], got {num_queries}")
    keys = rng.sample(range(len(KEY_WORDS)), num_facts)
    values = [rng.randrange(len(VALUE_WORDS)) for _ in keys]
    facts = [
        vocab.encode(f" The {KEY_WORDS[k]} is") + [vocab.values[v]] + vocab.encode(".") for k, v in zip(keys, values)
    ]
    questions, question_answer = [], []
    for i in rng.sample(range(num_facts), num_queries):
        q = vocab.encode(f" What is the {KEY_WORDS[keys[i]]}? The {KEY_WORDS[keys[i]]} is")
        questions.append(q + [vocab.values[values[i]]] + vocab.encode("."))
        question_answer.append([False] * len(q) + [True, False])
    fixed = 1 + sum(map(len, facts)) + sum(map(len, questions))
    _check(length, fixed, f"fact_recall with {num_facts} facts")
    sentences: list[list[int]] = []  # filler sentences, cut at the end to fit exactly
    while sum(map(len, sentences)) < length - fixed:
        sentences.append(list(rng.choice(vocab.filler)))
    # questions after ``cut`` filler sentences; the last sentence (the one cut to fit) always trails them
    cut = rng.randint(len(sentences) // 2, max(len(sentences) - 1, 0))
    for fact in facts:  # facts between sentences of the first half, in random places
        sentences.insert(rng.randint(0, cut // 2), fact)
        cut += 1
    ids, answer = [vocab.bos], [False]
    for index, sentence in enumerate(sentences):
        if index == cut:
            for q, a in zip(questions, question_answer):
                ids += q
                answer += a
        ids += sentence
        answer += [False] * len(sentence)
    if cut >= len(sentences):
        for q, a in zip(questions, question_answer):
            ids += q
            answer += a
    ids, answer = ids[:length], answer[:length]  # the overflow is shorter than the trailing sentence
    return RecallSample(ids, answer, [False] + [True] * (length - 1), "fact_recall")


#: Generator name -> ``(vocab, length, rng, **options) -> RecallSample``.
RECALL_TASKS: dict[str, Callable[..., RecallSample]] = {"mqar": mqar, "fact_recall": fact_recall}


def generate_recall(
    name: str, tokenizer_or_vocab: Any, length: int, num_samples: int, seed: int = 0, **options: Any
) -> list[RecallSample]:
    """``num_samples`` samples of task ``name``; sample ``i`` is seeded by ``(name, seed, i)`` only."""
    if name not in RECALL_TASKS:
        raise ValueError(f"name must be one of {sorted(RECALL_TASKS)}, got {name!r}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    vocab = (
        tokenizer_or_vocab if isinstance(tokenizer_or_vocab, RecallVocabulary) else RecallVocabulary(tokenizer_or_vocab)
    )
    return [
        RECALL_TASKS[name](vocab, length, random.Random(f"{name}-{seed}-{i}"), **options) for i in range(num_samples)
    ]


def collate_recall(samples: list[RecallSample], answer_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Stack equal-length samples.

    Returns:
        ``input_ids`` ``[batch, length]``; ``loss_weights`` ``[batch, length - 1]`` float weights of the targets
        ``input_ids[:, 1:]`` (1 on language targets, ``answer_weight`` on answers, 0 elsewhere); ``answer_mask``
        ``[batch, length - 1]`` bool over the same targets.
    """
    if not samples or len({len(s.input_ids) for s in samples}) != 1:
        raise ValueError("samples must be a non-empty list of equal-length RecallSample")
    ids = torch.tensor([s.input_ids for s in samples])
    answer = torch.tensor([s.answer_mask for s in samples])[:, 1:]
    lm = torch.tensor([s.loss_mask for s in samples])[:, 1:]
    weights = lm.float() + (answer_weight - 1.0) * answer.float()
    return {"input_ids": ids, "loss_weights": weights, "answer_mask": answer}


class RecallMixture:
    """Infinite seeded stream of training batches from a weighted mixture of recall tasks.

    Args:
        tokenizer: a tokenizer of :mod:`hf_longmem.evals.vocab`.
        tasks: task name -> ``{"weight": float, "length": int or list (optional), <generator option>: value or
            list of values, "variants": list of option mappings (optional)}``; a list is sampled uniformly per batch
            (each batch holds one task with one option set, so it has one length). ``length`` overrides the
            ``length`` given to :meth:`batches` for that task (a list of lengths is a length mixture, e.g. short
            sequences that teach the binding fast next to long ones). Options sampled independently cannot tie a
            length to a number of pairs; ``variants`` can: one mapping is drawn per batch and overrides the task's
            other options (e.g. ``[{num_pairs: 4, length: 17}, {num_pairs: 32, length: 129}]``).
        seed: stream seed (training seeds never collide with the evaluation seeds of :func:`evaluate_recall`,
            which use string seeds).
    """

    def __init__(self, tokenizer: Any, tasks: Mapping[str, Mapping[str, Any]], seed: int = 0):
        unknown = sorted(set(tasks) - set(RECALL_TASKS))
        if unknown or not tasks:
            raise ValueError(f"tasks must name tasks among {sorted(RECALL_TASKS)}, got {sorted(tasks)}")
        self.weights = {name: float(spec.get("weight", 1.0)) for name, spec in tasks.items()}
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"task weights must be non-negative with a positive sum, got {self.weights}")
        self.options = {
            name: {k: v for k, v in spec.items() if k not in ("weight", "variants")} for name, spec in tasks.items()
        }
        self.variants: dict[str, list[dict[str, Any]]] = {}
        for name, spec in tasks.items():
            variants = spec.get("variants", [{}])
            if not isinstance(variants, list) or not variants or not all(isinstance(v, Mapping) for v in variants):
                raise ValueError(f"tasks[{name!r}]['variants'] must be a non-empty list of mappings, got {variants!r}")
            if any({"weight", "variants"} & set(v) for v in variants):
                raise ValueError(f"tasks[{name!r}]['variants'] entries hold generator options, not weight/variants")
            self.variants[name] = [dict(v) for v in variants]
        self.vocab = RecallVocabulary(tokenizer)
        self.rng = random.Random(seed)

    def batches(self, batch_size: int, length: int) -> Iterator[list[RecallSample]]:
        """Yield lists of ``batch_size`` fresh samples of ``length`` tokens (or the task's ``length`` option) forever."""
        if batch_size < 1 or length < 2:
            raise ValueError(f"batch_size must be >= 1 and length >= 2, got {batch_size}, {length}")
        names = list(self.weights)
        while True:
            name = self.rng.choices(names, weights=[self.weights[n] for n in names])[0]
            variants = self.variants[name]  # drawn only when there is a choice: streams without variants unchanged
            options = {**self.options[name], **(self.rng.choice(variants) if len(variants) > 1 else variants[0])}
            options = {k: self.rng.choice(v) if isinstance(v, list) else v for k, v in options.items()}
            size = int(options.pop("length", length))
            yield [RECALL_TASKS[name](self.vocab, size, self.rng, **options) for _ in range(batch_size)]


@torch.no_grad()
def evaluate_recall(
    model: Any,
    tokenizer: Any,
    name: str,
    *,
    length: int,
    num_samples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """Teacher-forced recall accuracy of a causal LM on ``num_samples`` generated samples.

    Returns:
        ``{"task", "length", "num_samples", "options", "accuracy" (fraction of answer tokens predicted by argmax),
        "exact" (fraction of samples with every answer right)}``.
    """
    samples = generate_recall(name, tokenizer, length, num_samples, seed, **options)
    was_training = getattr(model, "training", False)
    model.eval()
    device = next(model.parameters()).device
    correct = total = exact = 0
    for start in range(0, num_samples, batch_size):
        batch = collate_recall(samples[start : start + batch_size])
        ids = batch["input_ids"].to(device)
        logits = model(input_ids=ids).logits[:, :-1]
        hit = (logits.argmax(-1) == ids[:, 1:]) | ~batch["answer_mask"].to(device)
        answer = batch["answer_mask"].to(device)
        correct += int((hit & answer).sum())
        total += int(answer.sum())
        exact += int(hit.all(-1).sum())
    if was_training:
        model.train()
    return {
        "task": name,
        "length": length,
        "num_samples": num_samples,
        "options": dict(options),
        "accuracy": correct / max(total, 1),
        "exact": exact / max(num_samples, 1),
    }
