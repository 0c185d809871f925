"""Generated task sequences for continual training, and the batching that makes resumption exact.

A *task* is a list of :class:`Example` (a prompt and its answer) that is both trained on and evaluated: each task
of :func:`fact_domains` is a synthetic knowledge "domain" of ``facts_per_task`` key -> number facts written with its
own sentence template, made only of pieces of :mod:`hf_longmem.evals.vocab` so that the embedded tiny model's
closed tokenizer covers every word. Continual pre-training trains on the whole sentence (``loss_on="all"``),
continual fine-tuning only on the answer (``loss_on="answer"``); both are evaluated by teacher-forced exact match of
the answer digits, which for these single-answer prompts equals greedy-decoding exact match.

Batches are a pure function of ``(seed, task, step)`` (:func:`epoch_rows`), so a run resumed from a checkpoint
draws exactly the batches that the interrupted run would have drawn, on any number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_longmem.evals.tasks import KEY_WORDS

__all__ = [
    "DOMAIN_TEMPLATES",
    "ContinualTask",
    "Example",
    "collate",
    "epoch_rows",
    "fact_domains",
    "tokenize_task",
]

#: Sentence templates of the generated domains: ``(name, prompt template)``; the answer follows after a space.
DOMAIN_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("magic", "The special magic number for {key} is"),
    ("var", "VAR {key} ="),
    ("passkey", "What is the pass key for {key}? The pass key is"),
    ("numbers", "One of the numbers for {key} is:"),
    ("value", "Question: What is the value of {key}? Answer:"),
    ("remember", "Remember the {key}. The number of the {key} is"),
)


@dataclass(frozen=True)
class Example:
    """One prompt and its answer (answer without leading whitespace, e.g. ``"472"``)."""

    prompt: str
    answer: str


@dataclass
class ContinualTask:
    """A task of the sequence.

    Attributes:
        name: task name (unique in a sequence).
        examples: training examples; they are also the evaluation set unless ``eval_examples`` is given.
        eval_examples: evaluation examples (default: ``examples``).
        prompt_ids / answer_ids: token ids filled by :func:`tokenize_task` (prompt with BOS; answer with its
            leading space and a trailing EOS).
    """

    name: str
    examples: list[Example]
    eval_examples: list[Example] | None = None
    prompt_ids: list[list[int]] = field(default_factory=list, repr=False)
    answer_ids: list[list[int]] = field(default_factory=list, repr=False)
    eval_prompt_ids: list[list[int]] = field(default_factory=list, repr=False)
    eval_answer_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError(f"examples of task {self.name!r} must not be empty")
        if self.eval_examples is None:
            self.eval_examples = list(self.examples)


def fact_domains(
    num_tasks: int = 3,
    facts_per_task: int = 16,
    *,
    num_digits: int = 3,
    shared_keys: bool = False,
    seed: int = 0,
) -> list[ContinualTask]:
    """A sequence of synthetic knowledge domains.

    Task ``t`` uses template ``DOMAIN_TEMPLATES[t]`` and ``facts_per_task`` keys from
    :data:`hf_longmem.evals.tasks.KEY_WORDS` (disjoint slices, or the same first keys for every task when
    ``shared_keys``, which makes the tasks interfere more: one key, several numbers depending on the template).
    Values are random ``num_digits``-digit numbers drawn per ``(seed, task, key)``.

    Args:
        num_tasks: tasks in the sequence, ``1 <= num_tasks <= len(DOMAIN_TEMPLATES)``.
        facts_per_task: facts per task (``num_tasks * facts_per_task <= 64`` unless ``shared_keys``).
        num_digits: digits per answer, in ``[1, 9]``.
        shared_keys: reuse the same keys in every task.
        seed: seed of the values.

    Returns:
        ``num_tasks`` untokenized :class:`ContinualTask` (see :func:`tokenize_task`).
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or not 1 <= num_tasks <= len(DOMAIN_TEMPLATES):
        raise ValueError(f"num_tasks must be an integer in [1, {len(DOMAIN_TEMPLATES)}], got {num_tasks!r}")
    limit = len(KEY_WORDS) if shared_keys else len(KEY_WORDS) // num_tasks
    if isinstance(facts_per_task, bool) or not isinstance(facts_per_task, int) or not 1 <= facts_per_task <= limit:
        raise ValueError(
            f"facts_per_task must be an integer in [1, {limit}] for {num_tasks} tasks, got {facts_per_task!r}"
        )
    if isinstance(num_digits, bool) or not isinstance(num_digits, int) or not 1 <= num_digits <= 9:
        raise ValueError(f"num_digits must be an integer in [1, 9], got {num_digits!r}")
    tasks = []
    for t in range(num_tasks):
        name, template = DOMAIN_TEMPLATES[t]
        start = 0 if shared_keys else t * facts_per_task
        examples = []
        for key in KEY_WORDS[start : start + facts_per_task]:
            rng = random.Random(f"continual:{seed}:{t}:{key}")
            value = str(rng.randrange(10 ** (num_digits - 1), 10**num_digits))
            examples.append(Example(template.format(key=key), value))
        tasks.append(ContinualTask(name=name, examples=examples))
    return tasks


def _encode(tokenizer, examples: Sequence[Example]) -> tuple[list[list[int]], list[list[int]]]:
    prompts, answers = [], []
    for ex in examples:
        prompts.append(list(tokenizer(ex.prompt, verbose=False)["input_ids"]))
        answer = list(tokenizer(" " + ex.answer, add_special_tokens=False, verbose=False)["input_ids"])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in prompts[-1] + answer:
            raise ValueError(f"tokenizer does not cover example {ex!r} (unknown token)")
        answers.append(answer + [tokenizer.eos_token_id])
    return prompts, answers


def tokenize_task(task: ContinualTask, tokenizer) -> ContinualTask:
    """Fill ``task``'s token ids with ``tokenizer`` (BOS prepended by the tokenizer; EOS appended to answers)."""
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("tokenizer must define eos_token_id and pad_token_id")
    task.prompt_ids, task.answer_ids = _encode(tokenizer, task.examples)
    task.eval_prompt_ids, task.eval_answer_ids = _encode(tokenizer, task.eval_examples)
    return task


def collate(
    pairs: Sequence[tuple[list[int], list[int]]], pad_token_id: int, loss_on: str = "answer"
) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``prompt + answer`` rows.

    Args:
        pairs: ``(prompt_ids, answer_ids)`` per row.
        pad_token_id: padding id.
        loss_on: ``"answer"`` (labels only on answer tokens) or ``"all"`` (every token after the first).

    Returns:
        ``input_ids`` / ``attention_mask`` / ``labels`` ``(B, T)`` (labels ``-100`` where no loss, unshifted like
        Hugging Face causal LMs expect) and ``answer_mask`` ``(B, T)`` bool: positions of the answer tokens
        without the final EOS, which the exact-match accuracy checks.
    """
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
    if not pairs:
        raise ValueError("pairs must not be empty")
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    answer_mask = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(pairs):
        n, m = len(prompt), len(answer)
        ids[row, : n + m] = torch.tensor(prompt + answer)
        attention[row, : n + m] = 1
        start = n if loss_on == "answer" else 1
        labels[row, start : n + m] = ids[row, start : n + m]
        answer_mask[row, n : n + m - 1] = True
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "answer_mask": answer_mask}


def epoch_rows(num_examples: int, batch_size: int, step: int, seed: int, task_index: int) -> list[int]:
    """Example indices of global batch ``step`` of a task: consecutive slices of per-epoch permutations.

    The permutation of epoch ``e`` comes from ``numpy.random.default_rng([seed, task_index, e])``, so the result
    depends only on the arguments (exact resumption, and the same global batch on every process).

    Returns:
        ``batch_size`` indices in ``[0, num_examples)``.
    """
    if num_examples < 1 or batch_size < 1 or step < 0:
        raise ValueError(
            f"need num_examples >= 1, batch_size >= 1, step >= 0; got {num_examples}, {batch_size}, {step}"
        )
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, num_examples)
        perm = np.random.default_rng([seed, task_index, epoch]).permutation(num_examples)
        take = min(batch_size - len(out), num_examples - offset)
        out.extend(int(i) for i in perm[offset : offset + take])
        position += take
    return out
