"""SEFE's Answer Style Diversification (ASD) as a data transform of the training stream.

Chen et al., "SEFE: Superficial and Essential Forgetting Eliminator for Multimodal Continual Instruction Tuning"
(ICML 2025, arXiv 2505.02486; jinpeng0528/SEFE, ``CoIN-ASD/``). *Superficial* forgetting is a model that still knows
the content but has adopted the answer style of the latest task (e.g. answers every question with an option letter).
ASD rewrites ``X%`` of every task's training examples into the other answer styles, split equally among them, so no
task teaches a single style; the evaluation sets keep their own format. The five styles of the paper:

==================  ==================================================================================
``yes_no``          "Question: Is it true that {prompt} {candidate}? Answer yes or no." -> "yes" / "no"
``multiple_choice`` "Question: {prompt} ?\\nOptions:\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer with the option's letter
                    from the given choices directly." -> the letter (LLaVA's MCQ instruction, which CoIN uses)
``short``           "{prompt}\\nAnswer the question using a single word or phrase." -> the answer (LLaVA's
                    short-answer instruction)
``brief``           "{prompt}\\nAnswer briefly." -> "The answer is {answer}."
``detailed``        "{prompt}\\nAnswer in detail." -> "{prompt} {answer}. So the answer is {answer}."
==================  ==================================================================================

A task's own style is ``native`` (default ``short``: our generated facts are short answers); ``ratio`` of its training
examples (seeded choice) are rewritten, cycling over the other styles in a seeded order. The yes/no candidate is the
true answer for half of the rewritten examples and a distractor for the other half; the multiple-choice options are
the answer and three distractors in a seeded order. Distractors are other answers of the same task, completed with
random numbers of the same length for numeric answers (the paper has an LLM write plausible distractors).

Deviations (and why): the paper's brief and detailed explanations are written by an LLM from the image and question
(``CoIN-ASD/prompts/*/brief.txt``, ``detail.txt``); without an LLM and for generated facts, the explanations here are
templated restatements of the fact. ``ratio`` defaults to 0.2, the ``X = 20`` of the SEFE README's example
(``train_x20.json``; annotations are released for several ``X``). The words of these templates (``yes``, ``no``, ``Options``, ...) are not in the embedded tiny model's closed
vocabulary: with such a tokenizer the strategy refuses to start and names the missing words (build the tokenizer with
``hf_longmem.evals.vocab.build_tokenizer(texts)`` over the rewritten texts, or use a BPE tokenizer).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from hf_longmem.validation import check_choice, check_ratio

from .base import Strategy, register_strategy
from .data import ContinualTask, Example, _encode

__all__ = ["ANSWER_STYLES", "AnswerStyleDiversification", "diversify_answer_styles", "style_example"]

ANSWER_STYLES: tuple[str, ...] = ("yes_no", "multiple_choice", "short", "brief", "detailed")
_LETTERS = "ABCD"


def _distractors(answer: str, others: Sequence[str], rng: random.Random, count: int = 3) -> list[str]:
    pool = sorted({o for o in others if o != answer})
    rng.shuffle(pool)
    out = pool[:count]
    if len(out) < count and answer.isdigit():
        low = 10 ** (len(answer) - 1) if len(answer) > 1 else 0
        high = 10 ** len(answer)
        if high - low - 1 < count:
            raise ValueError(f"cannot draw {count} distractors for the {len(answer)}-digit answer {answer!r}")
        while len(out) < count:
            value = str(rng.randrange(low, high))
            if value != answer and value not in out:
                out.append(value)
    if len(out) < count:
        raise ValueError(f"need {count} other answers in the task to build distractors for {answer!r}")
    return out


def style_example(example: Example, style: str, distractors: Sequence[str], *, truthful: bool = True, order: int = 0):
    """``example`` rewritten in ``style``.

    Args:
        example: a prompt and its answer (the ``short`` content).
        style: one of :data:`ANSWER_STYLES`.
        distractors: three wrong answers (``yes_no`` uses the first when ``truthful`` is false; ``multiple_choice``
            all three).
        truthful: for ``yes_no``: ask about the true answer (-> "yes") or the first distractor (-> "no").
        order: for ``multiple_choice``: the position (0-3) of the true answer among the options.
    """
    check_choice("style", style, ANSWER_STYLES)
    prompt, answer = example.prompt, example.answer
    if style == "yes_no":
        candidate = answer if truthful else distractors[0]
        return Example(
            f"Question: Is it true that {prompt} {candidate}? Answer yes or no.", "yes" if truthful else "no"
        )
    if style == "multiple_choice":
        if len(distractors) < 3 or not 0 <= order < 4:
            raise ValueError("multiple_choice needs three distractors and an order in [0, 3]")
        options = list(distractors[:3])
        options.insert(order, answer)
        listed = "\n".join(f"{letter}. {option}" for letter, option in zip(_LETTERS, options))
        return Example(
            f"Question: {prompt} ?\nOptions:\n{listed}\nAnswer with the option's letter from the given choices directly.",
            _LETTERS[order],
        )
    if style == "short":
        return Example(f"{prompt}\nAnswer the question using a single word or phrase.", answer)
    if style == "brief":
        return Example(f"{prompt}\nAnswer briefly.", f"The answer is {answer}.")
    return Example(f"{prompt}\nAnswer in detail.", f"{prompt} {answer}. So the answer is {answer}.")


def diversify_answer_styles(
    examples: Sequence[Example],
    *,
    ratio: float = 0.2,
    native: str = "short",
    styles: Sequence[str] = ANSWER_STYLES,
    seed: int = 0,
) -> list[Example]:
    """ASD of one task: ``round(ratio * n)`` examples rewritten, equally over ``styles`` other than ``native``.

    The other examples are returned unchanged (they are in the task's own style), in their original positions.
    """
    check_ratio("ratio", ratio, include_one=True)
    check_choice("native", native, ANSWER_STYLES)
    targets = [check_choice("styles", s, ANSWER_STYLES) for s in styles if s != native]
    if not targets:
        raise ValueError(f"styles must name at least one style other than native={native!r}")
    rng = random.Random(f"asd:{seed}")
    chosen = sorted(rng.sample(range(len(examples)), round(ratio * len(examples))))
    rng.shuffle(targets)
    answers = [e.answer for e in examples]
    out = list(examples)
    counts = dict.fromkeys(targets, 0)
    for k, i in enumerate(chosen):
        style = targets[k % len(targets)]
        distractors = _distractors(examples[i].answer, answers, rng)
        out[i] = style_example(
            examples[i], style, distractors, truthful=counts[style] % 2 == 0, order=counts[style] % len(_LETTERS)
        )
        counts[style] += 1
    return out


@register_strategy
class AnswerStyleDiversification(Strategy):
    """Rewrite ``ratio`` of every task's training examples into the other answer styles (SEFE's ASD).

    The transform runs once in :meth:`setup`, on copies of the trainer's tasks (the caller's task objects are left
    untouched; evaluation sets keep their format); it is a pure function of the options, so a resumed run rewrites the
    same examples.

    Args:
        ratio: share of each task's training examples rewritten (the paper's ``X / 100``; default 0.2).
        native: the tasks' own style (not among the rewrites).
        styles: the styles to rewrite into (default: all five).
        seed: seed of the choice of examples, styles, distractors and option orders (per task: ``seed + task``).
    """

    name = "asd"

    def __init__(self, ratio: float = 0.2, native: str = "short", styles: Sequence[str] = ANSWER_STYLES, seed: int = 0):
        self.ratio = check_ratio("ratio", ratio, include_one=True)
        self.native = check_choice("native", native, ANSWER_STYLES)
        if isinstance(styles, str) or not all(s in ANSWER_STYLES for s in styles) or not set(styles) - {native}:
            raise ValueError(f"styles must be a list of {ANSWER_STYLES} holding one other than native, got {styles!r}")
        self.styles = list(styles)
        self.seed = seed
        self.rewritten = 0

    def setup(self, trainer) -> None:
        super().setup(trainer)
        tokenizer = trainer.tokenizer
        for t, task in enumerate(trainer.tasks):
            examples = diversify_answer_styles(
                task.examples, ratio=self.ratio, native=self.native, styles=self.styles, seed=self.seed + t
            )
            self.rewritten += sum(a != b for a, b in zip(examples, task.examples))
            new = ContinualTask(name=task.name, examples=examples, eval_examples=list(task.eval_examples))
            try:
                new.prompt_ids, new.answer_ids = _encode(tokenizer, examples)
            except ValueError as error:
                missing = sorted(
                    {
                        w
                        for e in examples
                        for w in f"{e.prompt} {e.answer}".replace("\n", " ").split()
                        if tokenizer.unk_token_id in tokenizer(w, add_special_tokens=False)["input_ids"]
                    }
                )
                raise ValueError(
                    f"asd: the tokenizer does not cover the rewritten answer styles (missing: {missing[:12]}); use a "
                    "tokenizer with these words (e.g. hf_longmem.evals.vocab.build_tokenizer over the texts) or "
                    "restrict `styles`"
                ) from error
            new.eval_prompt_ids, new.eval_answer_ids = task.eval_prompt_ids, task.eval_answer_ids
            trainer.tasks[t] = new
            trainer.evaluator.tasks[t] = new
