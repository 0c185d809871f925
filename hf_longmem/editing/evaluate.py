"""Evaluation of lifelong editing: reliability, generalization, locality; sequential runs over T edits.

Metrics follow EasyEdit's default (``eval_metric='token em'``): teacher-forced token accuracy.

- **Reliability**: on ``prompt + target``, the fraction of target tokens the model predicts (argmax, teacher
  forced), averaged over the edits.
- **Generalization**: the same on the paraphrases (each paraphrase counts as one example).
- **Locality**: on ``locality_prompt + locality_answer``, the fraction of answer positions where the edited model
  predicts the same token as the model before any edit.

The lifelong protocol (paper Sec. 4.1, EasyEdit ``sequential_edit=True``) writes T edits one after the other and
evaluates all T after the last. :func:`run_sequential` does this for several T in one pass: after ``T`` edits of a
stream it evaluates the first ``T`` records, which is exactly a run with those ``T`` edits.

:class:`FineTuneBaseline` is the plain fine-tuning baseline (FT-L style): the same layer, loss on the target tokens,
optimiser, steps, early stop and clamp as WISE, but written directly into the main memory, with no side memory,
routing or masks, which shows the forgetting WISE avoids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batching import build_edit_batch, generate_context_templates, pad_id, right_pad
from .config import WISEConfig
from .data import EditRecord, encode_pair
from .editor import EditStats, WISEEditor, _as_str_list
from .losses import target_cross_entropy
from .side_memory import resolve_target_module

__all__ = [
    "EditScores",
    "FineTuneBaseline",
    "evaluate_records",
    "predicted_tokens",
    "run_sequential",
    "token_accuracy",
]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _teacher_forced(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    separator: str,
    batch_size: int,
) -> list[tuple[list[int], list[int]]]:
    """Per example ``(predicted answer tokens, answer tokens)``, teacher forced, batched with right padding."""
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts and {len(answers)} answers.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    encoded = [encode_pair(tokenizer, p, a, separator) for p, a in zip(prompts, answers)]
    device = _model_device(model)
    out: list[tuple[list[int], list[int]]] = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            ids, mask = right_pad([e[0] for e in chunk], pad_id(tokenizer))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            predicted = logits.argmax(-1).cpu()
            for row, (tokens, num_prompt) in enumerate(chunk):
                out.append((predicted[row, num_prompt - 1 : len(tokens) - 1].tolist(), tokens[num_prompt:]))
    return out


def token_accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    separator: str = " ",
    batch_size: int = 32,
) -> list[float]:
    """Teacher-forced token accuracy of ``targets`` after ``prompts``, one value in [0, 1] per example."""
    pairs = _teacher_forced(model, tokenizer, prompts, targets, separator, batch_size)
    return [sum(int(p == t) for p, t in zip(pred, gold)) / len(gold) for pred, gold in pairs]


def predicted_tokens(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    separator: str = " ",
    batch_size: int = 32,
) -> list[list[int]]:
    """Argmax predictions at the answer positions (teacher forced), one list per example (for locality)."""
    return [pred for pred, _ in _teacher_forced(model, tokenizer, prompts, answers, separator, batch_size)]


@dataclass
class EditScores:
    """Mean metrics over a set of edits (``None`` where the records have nothing to measure it on).

    Attributes:
        reliability, generalization, locality: means in [0, 1].
        num_edits, num_paraphrases, num_locality: examples behind each mean.
    """

    reliability: float
    generalization: float | None
    locality: float | None
    num_edits: int
    num_paraphrases: int
    num_locality: int


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_records(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    *,
    locality_before: Sequence[list[int] | None] | None = None,
    separator: str = " ",
    batch_size: int = 32,
) -> EditScores:
    """Reliability, generalization and locality of ``records`` on ``model`` as it is now.

    Args:
        model, tokenizer: the (edited) model.
        records: the edits made.
        locality_before: per record, the unedited model's predictions on its locality prompt
            (:func:`predicted_tokens`); ``None`` skips locality.
        separator: between prompts and answers (the editor's ``target_separator``).
        batch_size: examples per forward.
    """
    if not records:
        raise ValueError("records must hold at least one EditRecord.")
    reliability = token_accuracy(
        model,
        tokenizer,
        [r.prompt for r in records],
        [r.target for r in records],
        separator=separator,
        batch_size=batch_size,
    )
    para_prompts = [p for r in records for p in r.paraphrases]
    para_targets = [r.target for r in records for _ in r.paraphrases]
    generalization = (
        token_accuracy(model, tokenizer, para_prompts, para_targets, separator=separator, batch_size=batch_size)
        if para_prompts
        else []
    )
    locality: list[float] = []
    if locality_before is not None:
        if len(locality_before) != len(records):
            raise ValueError(f"locality_before has {len(locality_before)} entries for {len(records)} records.")
        chosen = [(r, b) for r, b in zip(records, locality_before) if r.locality_prompt and b is not None]
        if chosen:
            after = predicted_tokens(
                model,
                tokenizer,
                [r.locality_prompt for r, _ in chosen],
                [r.locality_answer or "" for r, _ in chosen],
                separator=separator,
                batch_size=batch_size,
            )
            for (_, before), now in zip(chosen, after):
                locality.append(sum(int(a == b) for a, b in zip(before, now)) / len(before))
    return EditScores(
        reliability=_mean(reliability) or 0.0,
        generalization=_mean(generalization),
        locality=_mean(locality),
        num_edits=len(records),
        num_paraphrases=len(para_prompts),
        num_locality=len(locality),
    )


class FineTuneBaseline:
    """Plain fine-tuning of the layer WISE would edit (its main memory, in place), with WISE's training settings.

    Same rows per edit (context templates + target), target cross-entropy, SGD with ``edit_lr`` for at most
    ``n_iter`` steps, early stop and clamp to the original weight ``+- norm_constraint``; no side memory, no gradient
    mask, no routing and no activation margins. Call :meth:`restore` to put the original weight back.

    Args:
        model, tokenizer: the model to fine-tune (modified in place).
        config: a :class:`WISEConfig` (for the layer and the training settings).
        context_templates: the templates of the rows (default: generated like WISE's).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: WISEConfig | None = None,
        context_templates: Sequence[str] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = WISEConfig() if config is None else config
        self.target_module = resolve_target_module(model, self.config)
        self.weight: torch.Tensor = model.get_submodule(self.target_module).weight
        self.original = self.weight.detach().clone()
        if context_templates is None:
            context_templates = self.config.context_templates
        if context_templates is None:
            model.eval()
            context_templates = generate_context_templates(model, tokenizer)
        self.context_templates = list(context_templates) or ["{}"]
        self.num_edits = 0

    def restore(self) -> nn.Module:
        """Put the original weight back; returns the model."""
        with torch.no_grad():
            self.weight.copy_(self.original)
        return self.model

    def edit(
        self,
        prompts: str | Sequence[str],
        targets: str | Sequence[str],
        *,
        paraphrases: Any = None,
        locality_prompts: Any = None,
        source: str | None = None,
        progress: bool = False,
    ) -> list[EditStats]:
        """Fine-tune on each edit in turn (``paraphrases``/``locality_prompts``/``source`` are accepted and unused)."""
        prompts, targets = _as_str_list(prompts, "prompts"), _as_str_list(targets, "targets")
        if len(prompts) != len(targets):
            raise ValueError(f"prompts has {len(prompts)} entries but targets has {len(targets)}.")
        config = self.config
        device = self.weight.device
        low = high = None
        if config.norm_constraint is not None:
            low, high = self.original - config.norm_constraint, self.original + config.norm_constraint
        params = [p for p in self.model.parameters() if p.requires_grad and p is not self.weight]
        was_training = self.model.training
        self.model.eval()
        results = []
        try:
            for p in params:
                p.requires_grad_(False)
            self.weight.requires_grad_(True)
            for prompt, target in zip(prompts, targets):
                start = time.perf_counter()
                batch = build_edit_batch(
                    self.tokenizer,
                    prompt,
                    target,
                    templates=self.context_templates,
                    irrelevant=prompt,
                    separator=config.target_separator,
                )
                ids, mask = batch["input_ids"][:-1].to(device), batch["attention_mask"][:-1].to(device)
                target_mask = batch["target_mask"][:-1].to(device)
                steps, previous, value = 0, None, float("nan")
                for _ in range(config.n_iter):
                    with torch.enable_grad():
                        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                        loss = target_cross_entropy(logits, ids, target_mask)
                    value = float(loss.detach())
                    if (
                        previous is not None
                        and value <= config.early_stop_loss
                        and abs(value - previous) <= config.early_stop_tol
                    ):
                        break
                    (grad,) = torch.autograd.grad(loss, [self.weight])
                    with torch.no_grad():
                        if config.weight_decay:
                            grad = grad + config.weight_decay * self.weight
                        self.weight -= config.edit_lr * grad
                        if low is not None:
                            self.weight.copy_(torch.maximum(torch.minimum(self.weight, high), low))
                    steps += 1
                    previous = value
                results.append(
                    EditStats(
                        index=self.num_edits,
                        prompt=prompt,
                        target=target,
                        steps=steps,
                        loss=value,
                        edit_loss=value,
                        act_loss=0.0,
                        score=0.0,
                        seconds=time.perf_counter() - start,
                        shard=0,
                    )
                )
                self.num_edits += 1
        finally:
            self.weight.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            self.model.train(was_training)
        return results


METHODS = ("WISE-Retrieve", "WISE-Merge", "FT")


def run_sequential(
    method: str,
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    *,
    config: WISEConfig | None = None,
    checkpoints: Sequence[int] = (1, 10, 100),
    irrelevant: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Write ``max(checkpoints)`` edits one after the other; after ``T`` of them evaluate the first ``T`` records.

    The model is restored afterwards (WISE: ``unload()``; FT: original weight back).

    Args:
        method: ``"WISE-Retrieve"``, ``"WISE-Merge"`` (``config.retrieve`` is set accordingly) or ``"FT"``.
        model, tokenizer: the unedited model.
        records: at least ``max(checkpoints)`` edits.
        config: training/routing settings (default :class:`WISEConfig`).
        checkpoints: the values of T.
        irrelevant: per edit, the irrelevant sample WISE trains against (default: the editor's built-in pool).
        batch_size: evaluation batch size.
        progress: progress bars.
        on_row: called with each row as soon as it is measured.

    Returns:
        one row per T: ``{"method", "T", "reliability", "generalization", "locality", "num_paraphrases",
        "num_locality", "seconds_per_edit", "mean_steps", "num_side_memories"}``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}.")
    checkpoints = sorted(set(int(t) for t in checkpoints))
    if not checkpoints or checkpoints[0] < 1:
        raise ValueError(f"checkpoints must be positive ints, got {checkpoints!r}.")
    total = checkpoints[-1]
    if len(records) < total:
        raise ValueError(f"records holds {len(records)} edits, fewer than max(checkpoints)={total}.")
    if irrelevant is not None and len(irrelevant) < total:
        raise ValueError(f"irrelevant holds {len(irrelevant)} texts, fewer than max(checkpoints)={total}.")
    config = WISEConfig() if config is None else config
    retrieve = method != "WISE-Merge"
    config = WISEConfig.from_dict({**config.to_dict(), "retrieve": retrieve, "replay": config.replay and retrieve})
    separator = config.target_separator
    records = list(records[:total])
    model.eval()
    before = predicted_tokens(
        model,
        tokenizer,
        [r.locality_prompt or r.prompt for r in records],
        [r.locality_answer or r.target for r in records],
        separator=separator,
        batch_size=batch_size,
    )
    locality_before = [b if r.locality_prompt else None for r, b in zip(records, before)]
    editor: Any = FineTuneBaseline(model, tokenizer, config) if method == "FT" else WISEEditor(model, tokenizer, config)
    rows: list[dict[str, Any]] = []
    stats: list[EditStats] = []
    iterator: Any = range(total)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=method, unit="edit")
    try:
        for i in iterator:
            record = records[i]
            stats += editor.edit(
                record.prompt,
                record.target,
                paraphrases=[record.paraphrases or None],
                locality_prompts=None if irrelevant is None else [irrelevant[i]],
                source=record.source,
            )
            if i + 1 in checkpoints:
                scores = evaluate_records(
                    model,
                    tokenizer,
                    records[: i + 1],
                    locality_before=locality_before[: i + 1],
                    separator=separator,
                    batch_size=batch_size,
                )
                row = {
                    "method": method,
                    "T": i + 1,
                    "reliability": scores.reliability,
                    "generalization": scores.generalization,
                    "locality": scores.locality,
                    "num_paraphrases": scores.num_paraphrases,
                    "num_locality": scores.num_locality,
                    "seconds_per_edit": sum(s.seconds for s in stats) / len(stats),
                    "mean_steps": sum(s.steps for s in stats) / len(stats),
                    "num_side_memories": len(editor.layer.candidates()) if method != "FT" else 0,
                }
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    finally:
        if method == "FT":
            editor.restore()
        else:
            editor.unload()
    return rows
