import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_longmem.continual import (
    CopyingProbe,
    Example,
    LogProbProbe,
    RecallProbe,
    RecognitionProbe,
    fact_domains,
    fit_forgetting_curve,
    injection_metrics,
    knowledge_accumulation,
    probe_series,
    repeated_data_task,
    scole_stream,
)
from hf_longmem.continual.probes import continuation_scores, copying_scores, fact_foils, two_afc

from .util import make_trainer, tiny_model, tokenizer


class TableLM(torch.nn.Module):
    """A hand-built LM: the next token after token ``i`` is ``table[i]`` with probability ``p`` (rest uniform)."""

    def __init__(self, table: dict[int, int], vocab: int, p: float = 0.9):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        probs = torch.full((vocab, vocab), (1 - p) / (vocab - 1), dtype=torch.float64)
        for i in range(vocab):
            probs[i, table.get(i, 0)] = p
        self.register_buffer("logp", probs.log())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logp[input_ids])


class CopierLM(torch.nn.Module):
    """Predicts the token ``length - 1`` positions back: a perfect in-context copier of ``[bos] x x``."""

    def __init__(self, vocab: int, length: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.vocab, self.length = vocab, length

    def forward(self, input_ids, attention_mask=None):
        source = torch.roll(input_ids, self.length - 1, dims=1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(source, self.vocab).float() * 10)


def _words(*words):
    tok = tokenizer()
    return [tok.convert_tokens_to_ids(w) for w in words]


def test_recognition_is_one_when_memorised_and_chance_when_untouched(tmp_path):
    tok = tokenizer()
    facts = fact_domains(1, 16, num_digits=2)[0]
    probes = [
        RecognitionProbe("recognition", facts.examples, fact_foils(facts.examples)),
        RecallProbe("recall", facts.examples),
    ]
    trainer = make_trainer(
        tmp_path=tmp_path, tasks=[facts], probes=probes, steps_per_task=60, batch_size=16, eval_every=20, loss_on="all"
    )
    results = trainer.train()
    steps, recognition = probe_series(results["history"], "recognition", "accuracy")
    assert steps == [0, 20, 40, 60]
    assert recognition[-1] == 1.0
    assert probe_series(results["history"], "recall", "exact_match")[1][-1] == 1.0
    assert results["history"][-1]["probes"]["recall"]["correct"] == [1] * 16
    # an untouched (random) model is at chance on 64 trials: 0.5 +- 0.15 (3.75 binomial standard deviations)
    facts64 = [e for task in fact_domains(4, 16, num_digits=2) for e in task.examples]
    untouched = RecognitionProbe("r", facts64, fact_foils(facts64))(tiny_model(seed=1).eval(), tok)
    assert abs(untouched["accuracy"] - 0.5) <= 0.15


def test_recognition_and_recall_on_a_hand_built_model():
    tok = tokenizer()
    the, grass, is_, green = _words("The", " grass", " is", " green")
    lm = TableLM({tok.bos_token_id: the, the: grass, grass: is_, is_: green}, len(tok)).eval()
    # recall: cue "The grass" -> " is green" follows the table; " is blue" does not
    recall = RecallProbe("recall", ["The grass is green", "The grass is blue"], cue_fraction=0.5)(lm, tok)
    assert recall["correct"] == [1, 0] and recall["exact_match"] == 0.5
    assert recall["token_accuracy"] == pytest.approx(3 / 4)
    # recognition: the table's sentence beats a foil; the foil listed as studied loses
    recognition = RecognitionProbe(
        "r", ["The grass is green", "The grass is blue"], ["The grass is blue", "The grass is green"]
    )
    result = recognition(lm, tok)
    assert result["accuracy"] == 0.5 and result["margin"] == pytest.approx(0.0, abs=1e-12)
    # summed log-likelihood: 4 table transitions of probability 0.9
    scores = continuation_scores(lm, [([tok.bos_token_id], [the, grass, is_, green])], tok.pad_token_id)
    assert scores["logprob"].item() == pytest.approx(4 * math.log(0.9), abs=1e-9)
    assert two_afc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])) == pytest.approx(0.5)
    example = Example("The special magic number for apple is", "12")
    assert LogProbProbe("lp", [example])(lm, tok)["logprobs"][0] < 0


def test_copying_probe_scores_a_copier_one_and_a_random_model_low():
    tok = tokenizer()
    probe = CopyingProbe(length=6, num_sequences=8, seed=3)
    assert probe(CopierLM(len(tok), 6).eval(), tok)["accuracy"] == 1.0
    assert probe(tiny_model().eval(), tok)["accuracy"] < 0.2
    with pytest.raises(ValueError, match="length >= 2"):
        copying_scores(CopierLM(10, 1), torch.zeros(2, 1, dtype=torch.long), 0)


def test_fit_forgetting_curve_recovers_each_law():
    t = np.arange(1, 101, dtype=float)
    log_fit = fit_forgetting_curve(t, 0.9 - 0.2 * np.log10(t))
    assert log_fit["log"]["a"] == pytest.approx(0.2, abs=1e-9) and log_fit["log"]["b"] == pytest.approx(0.9, abs=1e-9)
    assert log_fit["log"]["t_zero"] == pytest.approx(10**4.5, rel=1e-9) and log_fit["best"] == "log"
    exp_fit = fit_forgetting_curve(t, 0.8 * np.exp(-0.05 * t))
    assert exp_fit["exponential"]["k"] == pytest.approx(0.05, abs=1e-9) and exp_fit["best"] == "exponential"
    power_fit = fit_forgetting_curve(t, 0.7 * t**-0.5)
    assert power_fit["power"]["alpha"] == pytest.approx(0.5, abs=1e-9) and power_fit["best"] == "power"
    with pytest.raises(ValueError, match="> 0"):
        fit_forgetting_curve([0, 1, 2], [1, 0.5, 0.2])


def test_injection_metrics_effectivity_and_retainability():
    # l0 = -10 before the injection at step 10; maximum -4 at step 20 (inside (10, 30]); then forgetting
    steps = [0, 10, 20, 30, 40, 60, 110]
    logprobs = [-10.0, -10.0, -4.0, -5.0, -6.0, -7.0, -8.5]
    out = injection_metrics(steps, logprobs, injection_start=10, injection_end=30)
    assert (out["t0"], out["t_lam"], out["effectivity"]) == (10, 20, 6.0)
    assert out["retainability"] == [(10, 5 / 6), (20, 4 / 6), (40, 3 / 6), (90, 1.5 / 6)]
    assert out["fit"]["log"]["a"] > 0
    with pytest.raises(ValueError, match="injection_start"):
        injection_metrics(steps, logprobs, injection_start=200, injection_end=300)


def test_repeated_data_task_counts():
    examples = fact_domains(1, 32, num_digits=2)[0].examples
    split = repeated_data_task(examples, total=20, repeated_fraction=0.5, num_repeated=2, seed=1)
    rows = split.task.examples
    assert len(rows) == 20 and len(split.repeated) == 2 and len(split.unique) == 10
    assert all(rows.count(x) == 5 for x in split.repeated) and all(rows.count(x) == 1 for x in split.unique)
    assert split.task.eval_examples == split.repeated + split.unique
    with pytest.raises(ValueError, match="distinct examples"):
        repeated_data_task(examples[:5], total=20, repeated_fraction=0.5, num_repeated=2)


def test_scole_stream_reoccurs_and_knowledge_accumulation_by_hand():
    stream = scole_stream(num_groups=4, facts_per_group=2, groups_per_task=2, num_tasks=6, seed=0)
    again = scole_stream(num_groups=4, facts_per_group=2, groups_per_task=2, num_tasks=6, seed=0)
    assert stream.task_groups == again.task_groups and len(stream.pool) == 8
    assert (
        len({tuple(g) for g in stream.task_groups}) < 6
        or max(sum(g in tg for tg in stream.task_groups) for g in range(4)) > 1
    )
    for i, task in enumerate(stream.tasks):
        assert {stream.pool.index(e) for e in task.examples} == stream.task_items(i)
    # by hand: 3 tasks over the pool; outcomes chosen so each number is known
    hand = scole_stream(num_groups=4, facts_per_group=2, groups_per_task=2, num_tasks=3, seed=0)
    rows = []
    for i in range(3):
        present = hand.task_items(i)
        rows.append([1 if j in present or (i == 2 and j == min(set(range(8)) - present)) else 0 for j in range(8)])
    out = knowledge_accumulation(hand, rows)
    assert out["coverage"] == [0.5, 0.5, 0.5] and out["acc_all"] == [0.5, 0.5, 5 / 8]
    assert out["acc_absent"] == [0.0, 0.0, 0.25] and out["accumulation"] == pytest.approx(1 / 8)
    assert out["acc_all_slope"] == pytest.approx(1 / 16)
    with pytest.raises(ValueError, match="outcomes"):
        knowledge_accumulation(hand, [[1, 0]])


def test_probe_options_are_validated():
    with pytest.raises(ValueError, match="one foil per studied"):
        RecognitionProbe("r", ["a"], [])
    with pytest.raises(ValueError, match="equals its studied"):
        RecognitionProbe("r", ["The grass"], ["The grass"])
    with pytest.raises(ValueError, match="unknown token"):
        RecallProbe("r", ["zzzqqq words"])(tiny_model(), tokenizer())
    with pytest.raises(ValueError, match="distinct names"):
        make_trainer(probes=[CopyingProbe(), CopyingProbe()])
    with pytest.raises(ValueError, match="groups_per_task"):
        scole_stream(num_groups=3, groups_per_task=3)


def test_reoccurring_recipe_runs_and_reports_accumulation(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "continual_reoccurring.py"
    spec = importlib.util.spec_from_file_location("continual_reoccurring", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = ["--methods", "naive", "--groups", "3", "--tasks", "2", "--steps-per-task", "2", "--eval-every", "0"]
    summary = recipe.main([*args, "--output-dir", str(tmp_path), "--plot", str(tmp_path / "curves.png")])
    ka = summary["methods"]["naive"]["knowledge_accumulation"]
    assert len(ka["acc_all"]) == 2 and ka["coverage"] == [2 / 3, 2 / 3]
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "curves.png").stat().st_size > 0


def test_occurrence_forgetting_windows_each_group_until_it_reoccurs():
    from hf_longmem.continual.probes import ContinualTask, ScoleStream, occurrence_forgetting

    pool = [Example(f"The special magic number for {k} is", "12") for k in ("apple", "river", "stone")]
    tasks = [ContinualTask(f"t{i}", [pool[g]]) for i, g in enumerate([0, 1, 2, 0])]
    stream = ScoleStream(tasks, pool, [[0], [1], [2]], [[0], [1], [2], [0]])
    group0 = [-10, -6, -4, -5, -6, -7, -7.5, -1, -1]  # learned in task 0 (steps 0-10), re-occurs in task 3 (after 30)
    group1 = [-9, -9, -9, -8, -3, -4, -5, -6, -6.5]  # learned in task 1 (steps 10-20), never re-occurs
    steps = list(range(0, 45, 5))
    history = [
        {"step": s, "probes": {"pool_logprob": {"logprobs": [a, b, -9.0]}}} for s, a, b in zip(steps, group0, group1)
    ]
    out = occurrence_forgetting(stream, {"history": history, "task_end_steps": [10, 20, 30, 40]})
    assert out[0]["next_task"] == 3 and out[0]["retainability"] == [(5, 5 / 6), (10, 4 / 6), (15, 3 / 6), (20, 2.5 / 6)]
    assert out[0] == {"first_task": 0, "next_task": 3, **injection_metrics(steps[:7], group0[:7], 0, 10)}
    assert out[1]["next_task"] is None and out[1]["t_lam"] == 20 and out[1]["effectivity"] == 6.0
    assert 2 not in out  # never learned: no positive effectivity


def test_probe_results_survive_a_killed_and_resumed_run(tmp_path):
    def trainer(out):
        facts = [e for task in fact_domains(3, 4, num_digits=2) for e in task.examples]
        probes = [RecallProbe("recall", facts), RecognitionProbe("recognition", facts, fact_foils(facts))]
        return make_trainer(tmp_path=out, probes=probes, checkpoint_every=2, keep_checkpoints=1, plot=False)

    full = trainer(tmp_path / "a").train()
    assert trainer(tmp_path / "b").train(stop_after_steps=5) is None
    resumed = trainer(tmp_path / "b").train(resume_from="latest")
    assert resumed["history"] == full["history"]
    assert all("recall" in row["probes"] and "recognition" in row["probes"] for row in full["history"])
