"""Seeded infinite stream of generated task samples, encoded as training sequences.

Used by ``recipes/train_tiny.py``: each sequence is ``context + query + " " + answer + EOS`` (for multi-turn
samples, every turn's query, answer and EOS in order), with a loss weight per target token.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .haystack import PromptTooLongError
from .metrics import metric_for
from .schema import Sample, Turn
from .tasks import TASKS, generate_task


@dataclass
class EncodedSample:
    """One training sequence.

    Attributes:
        input_ids: token ids, shape ``(T,)``, starting with the tokenizer's special prefix (BOS).
        answer_mask: ``(T,)`` bool, True on answer tokens and the EOS after each answer.
        task: the sample's task name.
    """

    input_ids: list[int]
    answer_mask: list[bool]
    task: str


def training_answer(sample: Sample, turn: Turn) -> str:
    """The answer text a turn is trained on: every answer joined by ``", "`` where all of them must be recalled
    (``string_match_all``: RULER's multi-value and multi-query needles), else the canonical first answer."""
    if metric_for(sample.task, sample.meta, turn) == "string_match_all":
        return ", ".join(turn.answers)
    return turn.answers[0]


def encode_sample(tokenizer: Any, sample: Sample) -> EncodedSample:
    """Tokenize a sample as ``context + query_1 + " " + answer_1 + EOS + query_2 + ...`` (:func:`training_answer`).

    The first piece is tokenized with special tokens, the others without, so the ids equal those of the
    concatenated text for tokenizers that split at the ``"\\n"`` / ``" "`` boundaries (word-level and most BPE).

    Raises:
        ValueError: if the tokenizer has no EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer must define an eos_token to mark the end of each answer")
    ids: list[int] = []
    mask: list[bool] = []
    for index, turn in enumerate(sample.turns):
        prompt = (sample.context if index == 0 else "") + turn.query
        prompt_ids = tokenizer(prompt, add_special_tokens=index == 0, verbose=False)["input_ids"]
        answer_ids = tokenizer(" " + training_answer(sample, turn), add_special_tokens=False)["input_ids"]
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
        ids += [*prompt_ids, *answer_ids]
        mask += [False] * len(prompt_ids) + [True] * len(answer_ids)
    return EncodedSample(ids, mask, sample.task)


@dataclass
class TaskMixture:
    """Infinite seeded stream of same-length batches drawn from a mixture of generators.

    Attributes:
        tokenizer: tokenizer used for fitting and encoding.
        weights: task name (a key of :data:`hf_longmem.evals.tasks.TASKS`) -> sampling weight.
        options: task name -> generator options; a list value is sampled uniformly per sample. A task's options
            may also be a list of such mappings (option sets), one drawn uniformly per sample, for options that
            must go together (``[{"num_needles": 2, "num_questions": 2}, {"num_needles": 8, "num_questions": 8}]``).
        seed: stream seed; sample seeds start at ``10**6 * (seed + 1)`` so they never collide with small
            evaluation seeds.
    """

    tokenizer: Any
    weights: Mapping[str, float]
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(TASKS))
        if unknown or not self.weights:
            raise ValueError(f"weights must name tasks among {sorted(TASKS)}, got {sorted(self.weights)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {dict(self.weights)}")
        for name, chosen in self.options.items():
            sets = chosen if isinstance(chosen, list) else [chosen]
            if not sets or not all(isinstance(option_set, Mapping) for option_set in sets):
                raise ValueError(
                    f"options[{name!r}] must be a mapping of generator options or a non-empty list of them, got {chosen!r}"
                )
        self._rng = random.Random(self.seed)
        self._counter = 0

    def sample(self, length: int, max_tries: int = 500) -> EncodedSample:
        """Draw a task and its options, generate a fresh sample fitted to ``length`` and encode it.

        A draw whose facts and question alone exceed ``length`` (e.g. six needles in 128 tokens) is redrawn, up
        to ``max_tries`` times (a failed draw costs one tokenization).
        """
        names = list(self.weights)
        for _ in range(max_tries):
            name = self._rng.choices(names, weights=[self.weights[n] for n in names])[0]
            chosen = self.options.get(name, {})
            if isinstance(chosen, list):
                chosen = self._rng.choice(chosen)
            options = {
                key: self._rng.choice(value) if isinstance(value, list) else value for key, value in chosen.items()
            }
            sample_seed = 10**6 * (self.seed + 1) + self._counter
            self._counter += 1
            try:
                (sample,) = generate_task(name, self.tokenizer, length, 1, sample_seed, **options)
            except PromptTooLongError:
                continue
            return encode_sample(self.tokenizer, sample)
        raise ValueError(f"length={length} is too short for every task drawn in {max_tries} tries")

    def batches(self, lengths: Iterator[tuple[int, int]]) -> Iterator[list[EncodedSample]]:
        """For each ``(length, batch_size)`` yield ``batch_size`` samples fitted to ``length``."""
        for length, batch_size in lengths:
            yield [self.sample(length) for _ in range(batch_size)]


def collate(
    batch: Sequence[EncodedSample], pad_id: int, answer_weight: float, first_answer_weight: float | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch.

    Args:
        first_answer_weight: weight of the first token of each answer (``None``: ``answer_weight``). In retrieval
            tasks that token is where the model must select the right fact; the rest of the answer is mostly copied.

    Returns:
        ``input_ids`` ``(B, T)`` long; ``loss_weights`` ``(B, T - 1)`` float weights of the targets
        ``input_ids[:, 1:]`` (1 on prompt tokens, ``answer_weight`` on answer tokens, 0 on padding);
        ``answer_mask`` ``(B, T - 1)`` bool over the same targets.
    """
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    answer = torch.zeros(len(batch), width, dtype=torch.bool)
    valid = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, s in enumerate(batch):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        answer[row, : len(s.answer_mask)] = torch.tensor(s.answer_mask)
        valid[row, : len(s.input_ids)] = True
    weights = valid[:, 1:].float() + (answer_weight - 1.0) * answer[:, 1:].float()
    if first_answer_weight is not None:
        first = answer[:, 1:] & ~answer[:, :-1]  # answer targets whose previous target was not an answer
        weights[first] = first_answer_weight
    return {"input_ids": ids, "loss_weights": weights, "answer_mask": answer[:, 1:]}
