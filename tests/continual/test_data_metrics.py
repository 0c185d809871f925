import pytest
import torch

from hf_longmem.continual import fact_domains, matrix_metrics, stability_metrics
from hf_longmem.continual.data import collate, epoch_rows
from hf_longmem.continual.evaluation import evaluate_task

from .util import tiny_tasks, tokenizer


def test_fact_domains_are_covered_by_the_embedded_tokenizer():
    tasks = tiny_tasks(num_tasks=6, facts=10)
    keys = [{ex.prompt for ex in t.examples} for t in tasks]
    assert all(len(k) == 10 for k in keys) and len(set().union(*keys)) == 60
    assert all(tokenizer().unk_token_id not in ids for t in tasks for ids in t.prompt_ids + t.answer_ids)
    shared = fact_domains(3, 8, shared_keys=True)
    assert shared[0].examples[0].prompt.split()[-2] in shared[1].examples[0].prompt  # same key, other template
    with pytest.raises(ValueError, match="facts_per_task"):
        fact_domains(3, 30)
    with pytest.raises(ValueError, match="num_tasks"):
        fact_domains(0)


def test_collate_masks_and_epoch_rows():
    batch = collate([([1, 5, 6], [7, 8, 2]), ([1, 5], [9, 2])], pad_token_id=0, loss_on="answer")
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8, 2], [1, 5, 9, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 8, 2], [-100, -100, 9, 2, -100, -100]]
    assert batch["answer_mask"].tolist() == [
        [False, False, False, True, True, False],
        [False, False, True] + [False] * 3,
    ]
    assert collate([([1, 5], [9, 2])], 0, "all")["labels"].tolist() == [[-100, 5, 9, 2]]
    rows = [i for step in range(5) for i in epoch_rows(10, 4, step, seed=3, task_index=1)]
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))  # epochs are permutations
    assert epoch_rows(10, 4, 3, seed=3, task_index=1) == rows[12:16]  # pure function of the step
    with pytest.raises(ValueError, match="loss_on"):
        collate([([1], [2])], 0, "bogus")


def test_matrix_metrics_by_hand():
    R = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.3, 0.6, 1.0]]
    m = matrix_metrics(R, initial=[0.0, 0.1, 0.1])
    assert m["acc"] == pytest.approx((0.3 + 0.6 + 1.0) / 3)
    assert m["bwt"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)
    assert m["fwt"] == pytest.approx(((0.1 - 0.1) + (0.2 - 0.1)) / 2)


def test_stability_metrics_min_acc_and_wc_acc():
    # task 0 ends at step 10, task 1 at step 20; task 0 dips to 0.2 at step 12 (the stability gap) then recovers
    history = [
        {"step": 5, "accuracy": {"0": 0.5}},
        {"step": 10, "accuracy": {"0": 1.0}},
        {"step": 12, "accuracy": {"0": 0.2, "1": 0.1}},
        {"step": 16, "accuracy": {"0": 0.7, "1": 0.8}},
        {"step": 20, "accuracy": {"0": 0.9, "1": 1.0}},
    ]
    matrix = [[1.0, 0.0], [0.9, 1.0]]
    out = stability_metrics(history, matrix, [10, 20], windows=(1, 10))
    assert out["min_acc"]["0"] == 0.2 and out["avg_min_acc"] == 0.2
    assert out["wc_acc"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.2)
    assert out["wc_acc_per_task"][0] == 1.0
    assert out["wf_1"] == pytest.approx(0.8) and out["wf_10"] == pytest.approx(0.8)  # 1.0 at the task end -> 0.2
    matrix3 = [[1.0, 0.0, 0.0], [0.9, 1.0, 0.0], [0.4, 0.3, 1.0]]
    out = stability_metrics(history + [{"step": 25, "accuracy": {"0": 0.4, "1": 0.3}}], matrix3, [10, 20, 25])
    assert out["wf_10"] == pytest.approx(0.8) and out["min_acc"] == {"0": 0.2, "1": 0.3}
    out = stability_metrics(history[2:] + [{"step": 25, "accuracy": {"0": 0.9, "1": 0.3}}], matrix3, [10, 20, 25])
    assert out["wf_100"] == pytest.approx(0.7)  # task 1: 1.0 at its end -> 0.3


def test_evaluate_task_exact_match_agrees_with_greedy():
    from hf_longmem.continual import ContinualTask, Example, tokenize_task
    from hf_longmem.default_model import load_default_model
    from hf_longmem.evals.tasks import passkey

    model, tok = load_default_model()  # it solves short passkey prompts, so some answers are right
    samples = passkey(tok, 96, 6, seed=1) + [s for s in passkey(tok, 96, 2, seed=2)]
    examples = [Example(s.context + s.turns[0].query, s.turns[0].answers[0]) for s in samples]
    examples[-1] = Example(examples[-1].prompt, "12345")  # a wrong answer: must count as incorrect
    task = tokenize_task(ContinualTask("passkey", examples), tok)
    res = evaluate_task(model, task, tok.pad_token_id, batch_size=3)
    greedy = []
    for p, a in zip(task.eval_prompt_ids, task.eval_answer_ids):
        out = model.generate(
            torch.tensor([p]), max_new_tokens=len(a) - 1, do_sample=False, pad_token_id=tok.pad_token_id
        )
        greedy.append(out[0, len(p) :].tolist() == a[:-1])
    assert 0 < res["accuracy"] < 1 and res["num_examples"] == 8 and res["loss"] > 0
    assert res["accuracy"] == sum(greedy) / len(greedy)


def test_evaluate_task_runs_the_same_forwards_on_every_process(monkeypatch):
    """A sharded model's forward is collective: with 2 processes and 3 examples in batches of 1, the process holding 1
    example still runs 2 forwards (the extra one discarded), and the gathered results are those of one process."""
    from hf_longmem.continual import evaluation
    from tests.continual.util import tiny_model, tiny_tasks, tokenizer

    tok = tokenizer()
    task = tiny_tasks(1, facts=3)[0]
    assert len(task.eval_prompt_ids) == 3
    model = tiny_model()
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    shares = []
    monkeypatch.setattr(evaluation, "gather_object", lambda results: shares.append(results) or results)
    for index in range(2):
        calls.clear()
        evaluation.evaluate_task(model, task, tok.pad_token_id, batch_size=1, process_index=index, num_processes=2)
        assert len(calls) == 2, index
    handle.remove()
    alone = evaluation.evaluate_task(model, task, tok.pad_token_id, batch_size=1)
    assert [i for i, *_ in shares[0] + shares[1]] == [0, 2, 1]  # each example once, the padding forward dropped
    gathered = sorted(set(shares[0] + shares[1]))
    assert alone["num_examples"] == len(gathered) == 3
