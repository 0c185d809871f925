"""Memory probes run inside the continual loop: recognition, recall, retention, knowledge injection, repeated data,
and SCoLe-style re-occurring streams.

A *probe* measures the model's memory of a fixed item set at every continual evaluation (the initial one, every
``eval_every`` steps and every task end); pass them as ``ContinualTrainer(..., probes=[...])`` and their results land
in every ``history`` row of ``results.json`` under ``"probes"``. The metrics:

- **Recognition** (Orhan, "Recognition, recall, and retention of few-shot memories in large language models", 2023):
  two-alternative forced choice. A trial shows a studied item and a foil, each scored alone; the model "recognises"
  the studied one when its summed next-token loss is lower. Accuracy is the fraction of trials won (a tie counts
  1/2), so an untrained model sits at 0.5 and a model that memorised the items at 1.0 (:class:`RecognitionProbe`).
- **Recall** (same paper): cued completion. The model sees the cue (an example's prompt, or the first part of a
  sentence) and must produce the rest; exact match of the whole continuation. It is computed teacher-forced: every
  continuation token is the argmax, which is exactly when greedy decoding reproduces the continuation
  (:class:`RecallProbe`, also reporting the per-token accuracy and the per-item outcome).
- **Retention**: either metric along the later updates (:func:`probe_series`).
- **Factual-knowledge injection** (Chang et al., "How Do Large Language Models Acquire Factual Knowledge During
  Pretraining?", 2024; code kaistAI/factual-knowledge-acquisition): the log-probability ``l(q, t)`` of each probe's
  target span is tracked (:class:`LogProbProbe`); with ``t0`` the evaluation before the injection and ``t_LAM`` the
  local acquisition maximum (the step of largest ``l`` while the knowledge is presented), the *effectivity* is
  ``l(t_LAM) - l(t0)`` and the *retainability* ``R(t) = (l(t_LAM + t) - l(t0)) / (l(t_LAM) - l(t0))``
  (:func:`injection_metrics`). :func:`fit_forgetting_curve` fits the paper's ``R = b - a log10(t)`` (``a``: the decay
  constant; the paper calls the trend power-law), an exponential ``A exp(-k t)`` (their alternative) and a pure power
  law ``A t^(-alpha)``, with the RMSE of each.
- **Repeated data** (Hernandez et al., "Scaling Laws and Interpretability of Learning from Repeated Data", 2022): a
  task where a fraction of the rows repeats a small subset many times (:func:`repeated_data_task`); memorisation of
  the repeated vs the unique part (two :class:`RecallProbe`) and in-context copying, the induction-head behaviour the
  paper finds damaged by repetition: a random token sequence shown twice, accuracy of predicting its second copy
  (:class:`CopyingProbe`).
- **SCoLe** (Lesort et al., "Challenging Common Assumptions about Catastrophic Forgetting", CoLLAs 2023): a long
  sequence of tasks, each a random subset of a finite pool of fact groups (the paper's classes), so groups re-occur
  (:func:`scole_stream`); knowledge accumulation is the accuracy on the **whole pool** after every task, against the
  share of the pool the current task holds (:func:`knowledge_accumulation`).

Deviations (and why): Orhan studies sentences seen 1-3 times; here the studied set is whatever the stream trains on
(the trainer's tasks), and foils for facts are the same prompt with another value (:func:`fact_foils`), which makes
the trial about the fact, not the template. Chang et al. inject by replacing part of one batch; here the injected
knowledge is a task of the stream (``injection_start`` .. ``injection_end``), and ``t`` counts evaluations' steps after
``t_LAM`` (their ``t`` counts steps). Hernandez et al. repeat a fraction of the *tokens* of a pre-training corpus;
here a fraction of the *rows* of a task. SCoLe samples classes of image datasets; here the classes are groups of
generated facts with their own sentence template.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hf_longmem.evals.tasks import KEY_WORDS
from hf_longmem.validation import check_int, check_ratio

from .data import DOMAIN_TEMPLATES, ContinualTask, Example, collate

__all__ = [
    "CopyingProbe",
    "LogProbProbe",
    "Probe",
    "RecallProbe",
    "RecognitionProbe",
    "RepeatedSplit",
    "ScoleStream",
    "continuation_scores",
    "copying_scores",
    "fact_foils",
    "fit_forgetting_curve",
    "injection_metrics",
    "knowledge_accumulation",
    "occurrence_forgetting",
    "probe_series",
    "repeated_data_task",
    "scole_stream",
    "two_afc",
]

Item = str | Example


# ---------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def continuation_scores(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_token_id: int,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Log-likelihood of each continuation after its prefix, in one teacher-forced forward per batch.

    Args:
        model: a causal LM (put in eval mode by the caller).
        pairs: ``(prefix_ids, continuation_ids)`` per item; the prefix holds at least one token.
        pad_token_id: padding id (rows are right-padded).
        batch_size: rows per forward.
        device: device of the inputs (default: the model's).

    Returns:
        ``logprob`` ``[n]`` (float64, summed over the continuation), ``num_correct`` ``[n]`` (continuation tokens that
        are the argmax), ``num_tokens`` ``[n]``.
    """
    if not pairs:
        raise ValueError("pairs must not be empty")
    if any(len(p) < 1 or len(c) < 1 for p, c in pairs):
        raise ValueError("every prefix and continuation needs at least one token")
    device = device or next(model.parameters()).device
    logprob, correct, tokens = [], [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate(list(pairs[start : start + batch_size]), pad_token_id, "answer")
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits[:, :-1]
        logp = torch.log_softmax(logits.double(), dim=-1).cpu()
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        picked = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        logprob.append((picked * mask).sum(-1))
        correct.append(((logp.argmax(-1) == targets) & mask).sum(-1))
        tokens.append(mask.sum(-1))
    return {"logprob": torch.cat(logprob), "num_correct": torch.cat(correct), "num_tokens": torch.cat(tokens)}


def _start(tokenizer) -> list[int]:
    """The token every scored sequence starts from (BOS, else EOS, as lm-eval does for models without BOS)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer needs a bos_token_id or an eos_token_id to score whole sequences")
    return [token]


def _ids(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise ValueError(f"the tokenizer does not cover {text!r} (unknown token)")
    if not ids:
        raise ValueError(f"{text!r} has no tokens")
    return ids


def _text(item: Item) -> str:
    return f"{item.prompt} {item.answer}" if isinstance(item, Example) else item


def two_afc(studied_logprob: torch.Tensor, foil_logprob: torch.Tensor) -> float:
    """Two-alternative forced-choice accuracy: fraction of trials whose studied item is more likely (ties: 1/2)."""
    studied, foil = torch.as_tensor(studied_logprob), torch.as_tensor(foil_logprob)
    if studied.shape != foil.shape or studied.numel() == 0:
        raise ValueError("need as many studied items as foils (at least one)")
    return float(((studied > foil).double() + 0.5 * (studied == foil).double()).mean())


# ---------------------------------------------------------------------------------------------------- probes
class Probe:
    """A memory measurement on a fixed item set, run at every continual evaluation.

    Subclasses set ``name`` and implement :meth:`prepare` (tokenize once) and :meth:`measure`.
    """

    name: str = ""

    def prepare(self, tokenizer) -> None:
        """Tokenize the items (called once, before the first measurement)."""

    def measure(self, model: torch.nn.Module, pad_token_id: int) -> dict[str, Any]:
        """JSON-serialisable results of ``model`` now."""
        raise NotImplementedError

    def __call__(self, model: torch.nn.Module, tokenizer) -> dict[str, Any]:
        if not getattr(self, "_prepared", False):
            self.prepare(tokenizer)
            self._prepared = True
        return self.measure(model, tokenizer.pad_token_id)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a probe needs a non-empty string name, got {name!r}")
    return name


class RecognitionProbe(Probe):
    """2AFC recognition: each studied item against its foil, by summed log-likelihood of the whole text.

    Args:
        name: key of the results.
        studied: the studied items (texts or :class:`~hf_longmem.continual.data.Example`, scored as
            ``prompt + " " + answer``).
        foils: one foil per studied item, never trained on.
        batch_size: rows per forward.

    Results: ``accuracy`` (2AFC) and ``margin`` (mean log-likelihood advantage of the studied item, nats).
    """

    def __init__(self, name: str, studied: Sequence[Item], foils: Sequence[Item], batch_size: int = 64):
        self.name = _check_name(name)
        if not studied or len(studied) != len(foils):
            raise ValueError(f"need one foil per studied item, got {len(studied)} studied and {len(foils)} foils")
        if any(_text(s) == _text(f) for s, f in zip(studied, foils)):
            raise ValueError("a foil equals its studied item")
        self.studied, self.foils = list(studied), list(foils)
        self.batch_size = check_int("batch_size", batch_size, low=1)

    def prepare(self, tokenizer) -> None:
        start = _start(tokenizer)
        self.pairs = [(start, _ids(tokenizer, _text(x))) for x in self.studied + self.foils]

    def measure(self, model, pad_token_id):
        logprob = continuation_scores(model, self.pairs, pad_token_id, batch_size=self.batch_size)["logprob"]
        studied, foil = logprob[: len(self.studied)], logprob[len(self.studied) :]
        return {"accuracy": two_afc(studied, foil), "margin": float((studied - foil).mean())}


class RecallProbe(Probe):
    """Cued recall: exact match of each item's continuation after its cue (teacher-forced argmax = greedy).

    Args:
        name: key of the results.
        items: :class:`~hf_longmem.continual.data.Example` (cue: the prompt; continuation: ``" " + answer``) or texts
            (cue: the first ``cue_fraction`` of the tokens, at least one; continuation: the rest).
        cue_fraction: share of a text's tokens given as the cue, in ``(0, 1)``.
        batch_size: rows per forward.

    Results: ``exact_match``, ``token_accuracy`` and ``correct`` (one 0/1 per item, in order).
    """

    def __init__(self, name: str, items: Sequence[Item], cue_fraction: float = 0.5, batch_size: int = 64):
        self.name = _check_name(name)
        if not items:
            raise ValueError("items must not be empty")
        self.items = list(items)
        self.cue_fraction = check_ratio("cue_fraction", cue_fraction)
        self.batch_size = check_int("batch_size", batch_size, low=1)

    def prepare(self, tokenizer) -> None:
        self.pairs = []
        for item in self.items:
            if isinstance(item, Example):
                cue, rest = _start(tokenizer) + _ids(tokenizer, item.prompt), _ids(tokenizer, " " + item.answer)
            else:
                ids = _ids(tokenizer, item)
                if len(ids) < 2:
                    raise ValueError(f"{item!r} is too short to split into a cue and a continuation")
                cut = min(len(ids) - 1, max(1, round(self.cue_fraction * len(ids))))
                cue, rest = _start(tokenizer) + ids[:cut], ids[cut:]
            self.pairs.append((cue, rest))

    def measure(self, model, pad_token_id):
        scores = continuation_scores(model, self.pairs, pad_token_id, batch_size=self.batch_size)
        correct = (scores["num_correct"] == scores["num_tokens"]).tolist()
        return {
            "exact_match": sum(correct) / len(correct),
            "token_accuracy": float(scores["num_correct"].sum() / scores["num_tokens"].sum()),
            "correct": [int(c) for c in correct],
        }


class LogProbProbe(Probe):
    """Log-probability of each probe's target span (the quantity ``l(q, t)`` of Chang et al. 2024).

    Args:
        name: key of the results.
        items: :class:`~hf_longmem.continual.data.Example` whose ``answer`` is the target span after ``prompt``.
        batch_size: rows per forward.

    Results: ``logprob`` (mean over items of the span's summed log-probability) and ``logprobs`` (per item).
    """

    def __init__(self, name: str, items: Sequence[Example], batch_size: int = 64):
        self.name = _check_name(name)
        if not items or not all(isinstance(x, Example) for x in items):
            raise ValueError("items must be a non-empty list of Example (prompt, target span)")
        self.items = list(items)
        self.batch_size = check_int("batch_size", batch_size, low=1)

    def prepare(self, tokenizer) -> None:
        start = _start(tokenizer)
        self.pairs = [(start + _ids(tokenizer, x.prompt), _ids(tokenizer, " " + x.answer)) for x in self.items]

    def measure(self, model, pad_token_id):
        logprob = continuation_scores(model, self.pairs, pad_token_id, batch_size=self.batch_size)["logprob"]
        return {"logprob": float(logprob.mean()), "logprobs": [float(v) for v in logprob]}


@torch.no_grad()
def copying_scores(
    model: torch.nn.Module, sequences: torch.Tensor, start_token: int, device: torch.device | str | None = None
) -> dict[str, float]:
    """In-context copying of random sequences shown twice: ``[start] x x``.

    Args:
        model: a causal LM.
        sequences: ``[num, length]`` token ids ``x``.
        start_token: the first token of every row (BOS).

    Returns:
        ``accuracy``: fraction of the second copy's tokens 2..length that are the argmax (the first token of the copy
        cannot be inferred from the context); ``loss``: their mean cross entropy (nats).
    """
    if sequences.ndim != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be [num, length >= 2], got shape {tuple(sequences.shape)}")
    device = device or next(model.parameters()).device
    num, length = sequences.shape
    ids = torch.cat([torch.full((num, 1), start_token, dtype=torch.long), sequences, sequences], dim=1)
    logits = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device)).logits.double().cpu()
    # target ids[:, q] for q in the second copy without its first token; predicted at position q - 1
    targets = ids[:, length + 2 :]
    predicted = logits[:, length + 1 : 2 * length]
    loss = torch.nn.functional.cross_entropy(predicted.transpose(1, 2), targets)
    return {"accuracy": float((predicted.argmax(-1) == targets).double().mean()), "loss": float(loss)}


class CopyingProbe(Probe):
    """Copying / induction accuracy on seeded random token sequences (Hernandez et al. 2022; Olsson et al. 2022).

    Args:
        name: key of the results.
        length: tokens per random sequence (shown twice).
        num_sequences: sequences scored.
        token_ids: the ids sequences are drawn from (default: every id of the tokenizer but its special tokens).
        seed: seed of the sequences.

    Results: ``accuracy`` and ``loss`` of :func:`copying_scores`.
    """

    def __init__(
        self,
        name: str = "copying",
        length: int = 16,
        num_sequences: int = 32,
        token_ids: Sequence[int] | None = None,
        seed: int = 0,
    ):
        self.name = _check_name(name)
        self.length = check_int("length", length, low=2)
        self.num_sequences = check_int("num_sequences", num_sequences, low=1)
        if token_ids is not None and len(token_ids) < 2:
            raise ValueError("token_ids must hold at least two ids")
        self.token_ids = None if token_ids is None else list(token_ids)
        self.seed = seed

    def prepare(self, tokenizer) -> None:
        special = set(tokenizer.all_special_ids)
        pool = self.token_ids or [i for i in range(len(tokenizer)) if i not in special]
        rng = np.random.default_rng([self.seed, 7])
        self.sequences = torch.tensor(np.asarray(pool)[rng.integers(0, len(pool), (self.num_sequences, self.length))])
        self.start = _start(tokenizer)[0]

    def measure(self, model, pad_token_id):
        return copying_scores(model, self.sequences, self.start)


# ---------------------------------------------------------------------------------------------------- curves
def probe_series(
    history: Sequence[dict[str, Any]], probe: str, metric: str, *, after: int | None = None
) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one probe metric over the evaluations of a run (e.g. a retention curve).

    Args:
        history: ``results["history"]`` of :class:`~hf_longmem.continual.trainer.ContinualTrainer`.
        probe / metric: which value (e.g. ``"recall"``, ``"exact_match"``).
        after: keep only steps ``>= after`` (e.g. the end of the studied task).
    """
    points = {}
    for row in history:
        value = row.get("probes", {}).get(probe, {}).get(metric)
        if value is not None and (after is None or row["step"] >= after):
            points[row["step"]] = float(value)
    if not points:
        raise ValueError(f"no evaluation holds probe {probe!r} metric {metric!r}")
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares ``y = slope x + intercept``; returns ``(slope, intercept, r2)``."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else 1.0
    return float(slope), float(intercept), r2


def fit_forgetting_curve(t: Sequence[float], retention: Sequence[float]) -> dict[str, Any]:
    """Fit retention vs steps since acquisition with the three usual forgetting laws.

    Args:
        t: steps since the acquisition maximum, all ``> 0``.
        retention: the retained fraction at each ``t`` (e.g. the retainability of :func:`injection_metrics`).

    Returns:
        ``{"log": {"a", "b", "r2", "rmse", "t_zero"}, "exponential": {"A", "k", "rmse"}, "power": {"A", "alpha",
        "rmse"}, "best": name}``: ``R = b - a log10(t)`` (Chang et al.'s fit; ``a`` the decay constant, ``t_zero =
        10^(b/a)`` the step where the acquired improvement is gone), ``R = A exp(-k t)`` and ``R = A t^(-alpha)``
        (both fitted in log space on the points with ``R > 0``; ``None`` with fewer than two such points); ``t_zero``
        is ``None`` when the fit shows no forgetting (``a <= 0``) or puts it beyond ``1e300`` steps. ``best``
        has the smallest RMSE in ``R`` over all points.
    """
    t_arr, r_arr = np.asarray(t, dtype=np.float64), np.asarray(retention, dtype=np.float64)
    if t_arr.shape != r_arr.shape or t_arr.ndim != 1 or len(t_arr) < 3:
        raise ValueError("need the same number (>= 3) of steps and retention values")
    if not (np.isfinite(t_arr).all() and np.isfinite(r_arr).all()) or (t_arr <= 0).any():
        raise ValueError("steps must be > 0 and all values finite")
    if len(np.unique(t_arr)) < 2:
        raise ValueError("need at least two distinct steps")

    def rmse(prediction: np.ndarray) -> float:
        return float(np.sqrt(((prediction - r_arr) ** 2).mean()))

    slope, intercept, r2 = _linear_fit(np.log10(t_arr), r_arr)
    a, b = -slope, intercept
    out: dict[str, Any] = {
        "log": {
            "a": a,
            "b": b,
            "r2": r2,
            "rmse": rmse(b - a * np.log10(t_arr)),
            "t_zero": float(10 ** (b / a)) if a > 0 and b / a < 300 else None,
        }
    }
    positive = r_arr > 0
    out["exponential"] = out["power"] = None
    if positive.sum() >= 2 and len(np.unique(t_arr[positive])) >= 2:
        k_slope, log_a, _ = _linear_fit(t_arr[positive], np.log(r_arr[positive]))
        amp = math.exp(log_a)
        out["exponential"] = {"A": amp, "k": -k_slope, "rmse": rmse(amp * np.exp(k_slope * t_arr))}
        p_slope, log_p, _ = _linear_fit(np.log(t_arr[positive]), np.log(r_arr[positive]))
        amp = math.exp(log_p)
        out["power"] = {"A": amp, "alpha": -p_slope, "rmse": rmse(amp * t_arr**p_slope)}
    fitted = {k: v["rmse"] for k, v in out.items() if v is not None}
    out["best"] = min(fitted, key=fitted.get)
    return out


def injection_metrics(
    steps: Sequence[int], logprobs: Sequence[float], injection_start: int, injection_end: int
) -> dict[str, Any]:
    """Acquisition and forgetting of injected knowledge (Chang et al. 2024) from a log-probability series.

    Args:
        steps / logprobs: the evaluations of ``l(q, t)`` (e.g. :func:`probe_series` of a :class:`LogProbProbe`).
        injection_start: the step after which the knowledge is presented (``l(t0)`` is the last evaluation at or
            before it).
        injection_end: the last step presenting it; ``t_LAM`` is the step of the largest ``l`` in
            ``(injection_start, injection_end]``.

    Returns:
        ``t0``, ``t_lam``, ``effectivity = l(t_LAM) - l(t0)``, ``retainability``: ``[(t, R(t))]`` for the evaluations
        after ``t_LAM`` (``t = step - t_LAM``), and ``fit``: :func:`fit_forgetting_curve` of it (``None`` with fewer
        than three points or a non-positive effectivity, where ``R`` is undefined).
    """
    if len(steps) != len(logprobs) or not steps:
        raise ValueError("steps and logprobs must be non-empty and of the same length")
    if not injection_start < injection_end:
        raise ValueError(f"need injection_start < injection_end, got {injection_start} and {injection_end}")
    series = sorted(zip(steps, logprobs))
    before = [(s, v) for s, v in series if s <= injection_start]
    during = [(s, v) for s, v in series if injection_start < s <= injection_end]
    if not before or not during:
        raise ValueError("need an evaluation at or before injection_start and one in (injection_start, injection_end]")
    t0, l0 = before[-1]
    t_lam, l_lam = max(during, key=lambda p: (p[1], -p[0]))
    effectivity = l_lam - l0
    out: dict[str, Any] = {"t0": t0, "t_lam": t_lam, "effectivity": effectivity, "retainability": [], "fit": None}
    if effectivity > 0:
        out["retainability"] = [(s - t_lam, (v - l0) / effectivity) for s, v in series if s > t_lam]
        if len(out["retainability"]) >= 3:
            t, r = zip(*out["retainability"])
            out["fit"] = fit_forgetting_curve(t, r)
    return out


# ---------------------------------------------------------------------------------------------------- data
def fact_foils(examples: Sequence[Example], *, seed: int = 0) -> list[Example]:
    """One foil per fact: the same prompt with another value of the same number of digits (seeded)."""
    foils = []
    for i, ex in enumerate(examples):
        if not ex.answer.isdigit():
            raise ValueError(f"fact_foils needs numeric answers, got {ex.answer!r}")
        digits = len(ex.answer)
        rng = random.Random(f"foil:{seed}:{i}:{ex.prompt}")
        low = 10 ** (digits - 1) if digits > 1 else 0
        value = ex.answer
        while value == ex.answer:
            value = str(rng.randrange(low, 10**digits))
        foils.append(Example(ex.prompt, value))
    return foils


def _facts(template: str, keys: Sequence[str], num_digits: int, tag: str) -> list[Example]:
    out = []
    for key in keys:
        rng = random.Random(f"{tag}:{key}")
        out.append(Example(template.format(key=key), str(rng.randrange(10 ** (num_digits - 1), 10**num_digits))))
    return out


@dataclass
class RepeatedSplit:
    """A task with repeated data: ``task.examples`` lists the repeated items many times and the unique ones once."""

    task: ContinualTask
    repeated: list[Example]
    unique: list[Example]


def repeated_data_task(
    examples: Sequence[Example],
    *,
    total: int,
    repeated_fraction: float,
    num_repeated: int,
    seed: int = 0,
    name: str = "repeated",
) -> RepeatedSplit:
    """A task of ``total`` rows where ``repeated_fraction`` of them cycle over ``num_repeated`` items.

    Args:
        examples: the candidate items (distinct); ``num_repeated`` are drawn (seeded) to be repeated, and the unique
            rows are other items, each used once.
        total: rows of the task (one epoch of :func:`~hf_longmem.continual.data.epoch_rows` covers them).
        repeated_fraction: share of rows that are repeats, in ``(0, 1)`` (Hernandez et al.: 0.1%-50% of tokens).
        num_repeated: distinct repeated items (each appears about ``repeated_fraction * total / num_repeated``
            times per epoch).

    Returns:
        :class:`RepeatedSplit`; the task's evaluation set is every distinct item.
    """
    check_int("total", total, low=2)
    check_ratio("repeated_fraction", repeated_fraction)
    check_int("num_repeated", num_repeated, low=1)
    n_rep = max(num_repeated, round(repeated_fraction * total))
    n_unique = total - n_rep
    if n_unique < 1:
        raise ValueError(f"repeated_fraction={repeated_fraction} leaves no unique rows in total={total}")
    if len(set(examples)) != len(examples) or len(examples) < num_repeated + n_unique:
        raise ValueError(f"need {num_repeated + n_unique} distinct examples, got {len(set(examples))}")
    order = np.random.default_rng([seed, 5]).permutation(len(examples))
    repeated = [examples[i] for i in order[:num_repeated]]
    unique = [examples[i] for i in order[num_repeated : num_repeated + n_unique]]
    rows = [repeated[i % num_repeated] for i in range(n_rep)] + unique
    return RepeatedSplit(ContinualTask(name=name, examples=rows, eval_examples=repeated + unique), repeated, unique)


@dataclass
class ScoleStream:
    """A SCoLe-style stream: ``tasks[i]`` trains the facts of groups ``task_groups[i]`` of a finite ``pool``."""

    tasks: list[ContinualTask]
    pool: list[Example]
    groups: list[list[int]]
    task_groups: list[list[int]]

    def task_items(self, i: int) -> set[int]:
        """Pool indices of the facts task ``i`` trains on."""
        return {j for g in self.task_groups[i] for j in self.groups[g]}


def scole_stream(
    num_groups: int = 6,
    facts_per_group: int = 4,
    groups_per_task: int = 2,
    num_tasks: int = 12,
    *,
    probabilities: Sequence[float] | None = None,
    num_digits: int = 2,
    seed: int = 0,
) -> ScoleStream:
    """A long sequence of tasks, each ``groups_per_task`` groups drawn from ``num_groups`` (the SCoLe environment).

    Group ``g`` holds ``facts_per_group`` facts "KEY -> number" written with template ``DOMAIN_TEMPLATES[g % 6]`` and
    its own keys from :data:`~hf_longmem.evals.tasks.KEY_WORDS` (so every word is in the embedded tokenizer). Each task
    draws its groups without replacement with ``probabilities`` (default uniform; a skewed distribution makes some
    groups rare, the paper's occurrence-frequency axis), so groups re-occur along the stream.

    Returns:
        :class:`ScoleStream`; task ``i`` is named ``"t{i}:g{a}+g{b}"`` and evaluated on its own facts; probe the whole
        pool with ``RecallProbe("pool", stream.pool)`` and read :func:`knowledge_accumulation`.
    """
    check_int("num_groups", num_groups, low=2, high=len(KEY_WORDS))
    check_int("facts_per_group", facts_per_group, low=1, high=len(KEY_WORDS) // num_groups)
    check_int("groups_per_task", groups_per_task, low=1, high=num_groups - 1, hint="fewer than num_groups")
    check_int("num_tasks", num_tasks, low=1)
    check_int("num_digits", num_digits, low=1, high=9)
    if probabilities is None:
        p = np.full(num_groups, 1.0 / num_groups)
    else:
        p = np.asarray(probabilities, dtype=np.float64)
        if p.shape != (num_groups,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"probabilities must be {num_groups} non-negative numbers with a positive sum")
        if (p > 0).sum() < groups_per_task:
            raise ValueError(f"probabilities must give at least groups_per_task={groups_per_task} groups a chance")
        p = p / p.sum()
    pool, groups = [], []
    for g in range(num_groups):
        template = DOMAIN_TEMPLATES[g % len(DOMAIN_TEMPLATES)][1]
        keys = KEY_WORDS[g * facts_per_group : (g + 1) * facts_per_group]
        groups.append(list(range(len(pool), len(pool) + facts_per_group)))
        pool.extend(_facts(template, keys, num_digits, f"scole:{seed}:{g}"))
    rng = np.random.default_rng([seed, 3])
    tasks, task_groups = [], []
    for i in range(num_tasks):
        chosen = sorted(int(g) for g in rng.choice(num_groups, size=groups_per_task, replace=False, p=p))
        task_groups.append(chosen)
        examples = [pool[j] for g in chosen for j in groups[g]]
        tasks.append(ContinualTask(name=f"t{i}:" + "+".join(f"g{g}" for g in chosen), examples=examples))
    return ScoleStream(tasks, pool, groups, task_groups)


def knowledge_accumulation(
    stream: ScoleStream, correct: Sequence[Sequence[int]] | dict[str, Any], probe: str = "pool"
) -> dict[str, Any]:
    """SCoLe's knowledge accumulation from the per-fact outcomes on the whole pool after each task.

    Args:
        stream: the stream.
        correct: ``correct[i][j]`` = 1 if pool fact ``j`` is recalled after task ``i``; or the trainer's results dict,
            whose task-end rows of ``probe`` (a :class:`RecallProbe` over ``stream.pool``) are used.
        probe: the probe name when ``correct`` is a results dict.

    Returns:
        Per task: ``acc_all`` (accuracy on the whole pool), ``acc_absent`` (on the facts *not* in that task: what was
        kept from earlier tasks; ``None`` when the task holds the whole pool), ``coverage`` (the pool share of the task:
        what remembering only the current task would give) and ``seen`` (the pool share trained so far); summary
        ``final_acc_all``, ``final_acc_absent``, ``accumulation = final acc_all - final coverage`` (> 0: the model
        knows more than its last task) and ``acc_all_slope`` (least-squares slope of ``acc_all`` per task).
    """
    if isinstance(correct, dict):
        rows = [
            r
            for r in correct["history"]
            if r.get("boundary") and r.get("task", -1) >= 0 and probe in r.get("probes", {})
        ]
        correct = [r["probes"][probe]["correct"] for r in rows]
    if len(correct) == 0 or len(correct) > len(stream.tasks):
        raise ValueError(f"need one outcome row per finished task (1..{len(stream.tasks)}), got {len(correct)}")
    n = len(stream.pool)
    out: dict[str, Any] = {"acc_all": [], "acc_absent": [], "coverage": [], "seen": []}
    seen: set[int] = set()
    for i, row in enumerate(correct):
        if len(row) != n:
            raise ValueError(f"row {i} has {len(row)} outcomes for a pool of {n} facts")
        present = stream.task_items(i)
        seen |= present
        absent = [row[j] for j in range(n) if j not in present]
        out["acc_all"].append(sum(row) / n)
        out["acc_absent"].append(sum(absent) / len(absent) if absent else None)
        out["coverage"].append(len(present) / n)
        out["seen"].append(len(seen) / n)
    out["final_acc_all"] = out["acc_all"][-1]
    out["final_acc_absent"] = out["acc_absent"][-1]
    out["accumulation"] = out["acc_all"][-1] - out["coverage"][-1]
    k = len(out["acc_all"])
    out["acc_all_slope"] = float(np.polyfit(np.arange(k), out["acc_all"], 1)[0]) if k > 1 else 0.0
    return out


def occurrence_forgetting(stream: ScoleStream, results: dict[str, Any], probe: str = "pool_logprob") -> dict[int, Any]:
    """Acquisition and forgetting of each group's facts between its first occurrence and its next one.

    A group first trained in task ``i`` is knowledge injected during task ``i`` (Chang et al.'s injection); until the
    group re-occurs, the later tasks only interfere. For each group with at least three evaluations in that window
    after its acquisition maximum, :func:`injection_metrics` of the group's mean target log-probability.

    Args:
        stream: the stream the run trained on.
        results: the trainer's results; ``probe`` must be a :class:`LogProbProbe` over ``stream.pool``.
        probe: that probe's name.

    Returns:
        ``{group: {"first_task", "next_task" (None if it never re-occurs), **injection_metrics}}``.
    """
    ends = results["task_end_steps"]
    rows = [r for r in results["history"] if probe in r.get("probes", {})]
    if not rows:
        raise ValueError(f"no evaluation holds probe {probe!r}")
    out: dict[int, Any] = {}
    for g, items in enumerate(stream.groups):
        tasks = [i for i, groups in enumerate(stream.task_groups[: len(ends)]) if g in groups]
        if not tasks:
            continue
        first = tasks[0]
        nxt = tasks[1] if len(tasks) > 1 else None
        start = ends[first - 1] if first > 0 else 0
        stop = ends[nxt - 1] if nxt is not None else ends[-1]
        steps = [r["step"] for r in rows if r["step"] <= stop]
        values = [sum(r["probes"][probe]["logprobs"][j] for j in items) / len(items) for r in rows if r["step"] <= stop]
        metrics = injection_metrics(steps, values, start, ends[first])
        if metrics["fit"] is not None:
            out[g] = {"first_task": first, "next_task": nxt, **metrics}
    return out
