import math

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from hf_longmem.continual import ContinualTrainer, Example, TrainerConfig, build_strategy, fact_domains, tokenize_task
from hf_longmem.continual.asd import ANSWER_STYLES, diversify_answer_styles, style_example
from hf_longmem.continual.data import collate, epoch_rows
from hf_longmem.continual.regularizers import EcoTTA
from hf_longmem.evals.tasks import vocabulary_texts
from hf_longmem.evals.vocab import build_tokenizer
from tests.helpers.coverage import Exempt

from .util import TINY_MODEL, make_trainer, tiny_lora, tiny_tasks

EXEMPT = Exempt(
    "asd",
    reason="its answer-style templates (yes, no, Options, ...) are outside the shared suite's closed tiny tokenizer, "
    "so it refuses to start there; test_asd_strategy_rewrites_training_data_only_and_needs_a_covering_tokenizer "
    "trains it with a tokenizer that covers them (it has no state to round-trip)",
)


def _style(example: Example) -> str:
    if example.prompt.startswith("Question: Is it true"):
        return "yes_no"
    if "Options:" in example.prompt:
        return "multiple_choice"
    for style, marker in (("short", "single word"), ("brief", "Answer briefly"), ("detailed", "Answer in detail")):
        if marker in example.prompt:
            return style
    return "native"


def test_asd_rewrites_the_ratio_equally_over_the_other_styles():
    examples = fact_domains(1, 20)[0].examples
    out = diversify_answer_styles(examples, ratio=0.2, seed=3)
    assert out == diversify_answer_styles(examples, ratio=0.2, seed=3)
    changed = [i for i, (a, b) in enumerate(zip(examples, out)) if a != b]
    assert len(changed) == 4 and sorted(_style(out[i]) for i in changed) == [
        "brief",
        "detailed",
        "multiple_choice",
        "yes_no",
    ]
    everything = diversify_answer_styles(examples, ratio=1.0, native="brief")
    counts = {s: sum(_style(e) == s for e in everything) for s in ANSWER_STYLES}
    assert counts["brief"] == 0 and sorted(counts.values())[1:] == [5, 5, 5, 5]
    for original, new in zip(examples, everything):
        style = _style(new)
        if style == "multiple_choice":  # the lettered option is the true answer; the others are not
            options = dict(
                line.split(". ", 1) for line in new.prompt.splitlines() if line[:3] in ("A. ", "B. ", "C. ", "D. ")
            )
            assert options[new.answer] == original.answer and list(options.values()).count(original.answer) == 1
        elif style == "yes_no":
            asked = new.prompt.split(original.prompt + " ", 1)[1].split("?", 1)[0]
            assert new.answer == ("yes" if asked == original.answer else "no")
        elif style in ("short", "brief", "detailed"):
            assert original.answer in new.answer and original.prompt in new.prompt
    assert {_style(e) for e in everything if _style(e) == "yes_no"} and {
        e.answer for e in everything if _style(e) == "yes_no"
    } == {"yes", "no"}


def test_asd_strategy_rewrites_training_data_only_and_needs_a_covering_tokenizer():
    tasks = tiny_tasks()
    with pytest.raises(ValueError, match="asd: the tokenizer does not cover"):
        make_trainer([build_strategy({"name": "asd", "ratio": 0.5})])
    texts = list(vocabulary_texts())
    for task in tasks:
        for s in ANSWER_STYLES:
            texts += [
                f"{e.prompt} {e.answer}"
                for e in diversify_answer_styles(
                    task.examples, ratio=1.0, styles=[s], native="short" if s != "short" else "brief"
                )
            ]
    texts.append(style_example(tasks[0].examples[0], "yes_no", ["0", "1", "2"]).answer + " no yes")
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_MODEL))
    tasks = [tokenize_task(t, tokenizer) for t in fact_domains(3, 4, num_digits=2)]
    before = [list(t.examples) for t in tasks]
    asd = build_strategy({"name": "asd", "ratio": 0.5, "seed": 1})
    trainer = ContinualTrainer(
        model,
        tokenizer,
        tasks,
        [asd],
        TrainerConfig(steps_per_task=1, batch_size=4, plot=False, output_dir="unused"),
        accelerator=Accelerator(cpu=True),
    )
    assert [list(t.examples) for t in tasks] == before  # the caller's tasks are untouched
    assert asd.rewritten == 3 * 2
    for t, task in enumerate(trainer.tasks):
        assert sum(a != b for a, b in zip(task.examples, before[t])) == 2
        assert task.eval_examples == before[t] and trainer.evaluator.tasks[t] is task
        assert len(task.prompt_ids) == len(task.examples)
    assert math.isfinite(trainer.train_step())


def test_ecotta_entropy_mode_is_the_filtered_prompt_entropy_and_never_sees_answers():
    eco = EcoTTA(lam=2.0, partitions=2, main_loss="entropy", entropy_margin=1.0)
    trainer = make_trainer([eco], model=tiny_lora(), learning_rate=1e-2)
    prompt = trainer.tasks[0].prompt_ids[0]
    answer = trainer.tasks[0].answer_ids[0]
    other = [(t + 1) % 10 + 20 for t in answer[:-1]] + answer[-1:]  # another answer of the same length
    outs = []
    for ans in (answer, other):
        batch = collate([(prompt, ans)], trainer.pad_token_id, "answer")
        batch["groups"] = torch.zeros(1, dtype=torch.long)
        out = trainer.forward(batch, output_hidden_states=True)
        loss = eco.task_loss(batch, out) + eco.extra_loss(batch, out)
        grads = torch.autograd.grad(loss, [p for _, p in eco.trainable()], allow_unused=True)
        outs.append((loss.detach(), [g for g in grads if g is not None]))
        # by hand: the mean entropy of the next-token distributions at the prompt positions (margin 1: all kept)
        logp = torch.log_softmax(out.logits[0, : len(prompt)].detach().float(), -1)
        assert eco.task_loss(batch, out).detach().item() == pytest.approx(
            float(-(logp.exp() * logp).sum(-1).mean()), rel=1e-6
        )
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(outs[0][1], outs[1][1]))
    # the filter keeps only positions below margin * ln V
    strict = EcoTTA(main_loss="entropy", entropy_margin=1e-6)
    assert strict.entropy_loss(out.logits, torch.ones(out.logits.shape[:2], dtype=torch.bool)).item() == 0.0
    # the trainer's step uses the entropy objective, not the cross entropy
    rows = [(0, i, 0) for i in epoch_rows(len(trainer.tasks[0].examples), 4, 0, 0, 0)]
    batch = trainer.make_batch(rows)
    with torch.no_grad():
        out = trainer.forward(batch, output_hidden_states=True)
        expected = (eco.task_loss(batch, out) + eco.extra_loss(batch, out)).item()
    assert trainer.train_step() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="main_loss"):
        EcoTTA(main_loss="kl")
