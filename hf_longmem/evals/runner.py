"""The evaluation runner: answers samples through a cache and aggregates accuracy, KV bytes, latency and fidelity.

Modes (SCBench's context/query split, see ``reference/evals-agents.md``):

* ``"single"``: every turn is answered on its own. ``context + query`` is prefilled into a fresh cache in one
  forward (so the cache compresses the whole prompt, query included, as query-aware methods expect), then decoded
  greedily. Batches of ``batch_size`` prompts are left-padded.
* ``"rollback"`` (multi-request): the context is prefilled once and compressed without seeing any question; each
  turn then answers from a ``copy.deepcopy`` of that cache (our caches drop tokens and cannot be cropped), so the
  turns do not see each other and the base cache is never modified.
* ``"append"`` (multi-turn): the context is prefilled once, then each query and its answer are appended to the same
  cache, turn after turn. ``history="generated"`` appends the model's own answer (its last token, e.g. EOS, is fed
  with the next query); ``history="golden"`` appends ``" " + answers[0]`` and EOS instead, as the tiny model was
  trained on.

Tokenisation: the context is encoded with the tokenizer's special tokens (BOS), every query and appended answer
without them, and the pieces are concatenated as token ids; so the three modes feed the same tokens to a full cache
and give the same answers with it.

Example::

    from hf_longmem import load_default_model
    from hf_longmem.evals import evaluate, generate_task, run_benchmark
    model, tok = load_default_model()
    samples = generate_task("passkey", tok, length=1024, num_samples=4)
    records = evaluate(model, tok, samples, "streaming", {"budget": 256})
    rows = run_benchmark(model, tok, ["passkey"], [512, 1024], {"full": ("full", {}),
                         "streaming": ("streaming", {"budget": 256})}, num_samples=4, fidelity=True)
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_longmem.cache_classes.base import cache_memory_bytes
from hf_longmem.registry import get_cache_spec, make_cache

from .choices import evaluate_choices, is_choice_task
from .fidelity import Reference, compare_to_reference, reference_continuation
from .metrics import metric_for, metric_options, score, wilson_interval
from .profiling import PeakMemory, eos_token_ids, greedy_generate, model_device, prefill
from .schema import ROW_KEYS, Sample, Turn

__all__ = [
    "HISTORY_MODES",
    "MODES",
    "ROW_KEYS",
    "aggregate_records",
    "answer_turns",
    "cache_accepts",
    "evaluate",
    "model_name_of",
    "resolve_cache_options",
    "run_benchmark",
]

MODES = ("single", "rollback", "append")
HISTORY_MODES = ("generated", "golden")

CacheOptions = Mapping[str, Any] | Callable[[int], Mapping[str, Any]]


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def model_name_of(model: Any) -> str:
    """A readable model name: ``name_or_path`` of the model or its config, else the class name."""
    for value in (getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if value:
            return str(value)
    return type(model).__name__


def cache_accepts(name: str, option: str) -> bool:
    """Whether the cache registered as ``name`` takes the constructor option ``option`` (``config`` excluded)."""
    if option == "config":
        return False
    params = inspect.signature(get_cache_spec(name).cls.__init__).parameters
    return option in params and params[option].kind not in (params[option].VAR_POSITIONAL, params[option].VAR_KEYWORD)


def resolve_cache_options(options: CacheOptions | None, length: int) -> dict[str, Any]:
    """The options of a cache at context ``length``: ``options(length)`` when callable, else a copy of it."""
    if options is None:
        return {}
    if callable(options):
        options = options(length)
    if not isinstance(options, Mapping):
        raise ValueError(f"cache options must be a dict (or a callable returning one), got {type(options).__name__}")
    return dict(options)


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if ids and isinstance(ids[0], list):  # some tokenizers return a batch for a single string
        ids = ids[0]
    return list(ids)


def _check_mode(mode: str, history: str, batch_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if history not in HISTORY_MODES:
        raise ValueError(f"`history` must be one of {HISTORY_MODES}, got {history!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    if batch_size > 1 and mode != "single":
        raise ValueError(
            f"`batch_size` > 1 is supported in mode='single' only (mode={mode!r} feeds queries of different lengths "
            "after a shared context, which would put padding between real tokens)"
        )


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(kept) / len(kept) if kept else None


class _Decoder:
    """Tokenizer-side state shared by the turns: EOS ids, pad id and detokenisation."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.eos = eos_token_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(model.config, "pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.device = model_device(model)

    def text(self, tokens: list[int]) -> str:
        if tokens and tokens[-1] in self.eos:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)


def _turn_record(
    decoder: _Decoder, sample: Sample, index: int, turn: Turn, tokens: list[int], metric: str | None
) -> dict[str, Any]:
    prediction = decoder.text(tokens)
    name = metric or metric_for(sample.task, sample.meta, turn)
    return {
        "sample_id": sample.id,
        "task": sample.task,
        "turn": index,
        "context_length": sample.meta.get("length"),
        "prediction": prediction,
        "answers": list(turn.answers),
        "metric": name,
        "score": score(prediction, turn.answers, name, **metric_options(sample.meta, name)),
        "num_new_tokens": len(tokens),
        "stopped_at_eos": bool(tokens) and tokens[-1] in decoder.eos,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Answering turns
# ----------------------------------------------------------------------------------------------------------------------


def answer_turns(
    model: Any,
    cache: Any,
    context_ids: list[int],
    query_ids: Sequence[list[int]],
    max_new_tokens: Sequence[int],
    *,
    mode: str = "rollback",
    history: str = "generated",
    golden_ids: Sequence[list[int]] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Prefills ``context_ids`` into ``cache`` once and answers each query in ``"rollback"`` or ``"append"`` mode.

    In rollback mode ``cache`` ends holding the context only (every turn works on a deep copy). In append mode with
    generated history it ends holding the whole conversation but the last generated token (fed with the next
    query). With golden history each turn answers on a deep copy, and the next turn first appends the query and its
    golden answer (``golden_ids``) to ``cache`` in one forward; ``cache`` ends holding all turns but the last.

    Args:
        model: the causal LM.
        cache: an empty cache.
        context_ids: context tokens (BOS included).
        query_ids: tokens of each query.
        max_new_tokens: generation budget of each turn.
        mode: ``"rollback"`` or ``"append"``.
        history: in append mode, ``"generated"`` or ``"golden"`` answers are appended.
        golden_ids: tokens appended after each turn with ``history="golden"`` (answer and EOS).
        eos_token_id: ids that end an answer (default: the model's).

    Returns:
        ``(turns, context)``: per turn ``{"tokens": list[int], "prefill_s", "decode_s", "decode_tokens_per_s",
        "num_prompt_tokens", "num_cached_tokens", "kv_bytes", "peak_memory_bytes", "peak_memory_kind"}``, and for
        the context ``{"prefill_s", "kv_bytes", "peak_memory_bytes", "num_tokens"}``.
    """
    if mode not in ("rollback", "append"):
        raise ValueError(f"`mode` must be 'rollback' or 'append' for a shared context, got {mode!r}")
    if history not in HISTORY_MODES:
        raise ValueError(f"`history` must be one of {HISTORY_MODES}, got {history!r}")
    if len(max_new_tokens) != len(query_ids):
        raise ValueError(f"`max_new_tokens` has {len(max_new_tokens)} entries for {len(query_ids)} queries")
    if mode == "append" and history == "golden" and (golden_ids is None or len(golden_ids) != len(query_ids)):
        raise ValueError("history='golden' needs `golden_ids` with one entry per query")
    device = model_device(model)
    eos = eos_token_ids(model, eos_token_id=eos_token_id)
    with PeakMemory(device) as peak:
        _, context_s = prefill(model, torch.tensor([context_ids], device=device), cache)
    context = {
        "prefill_s": context_s,
        "kv_bytes": cache_memory_bytes(cache),
        "peak_memory_bytes": peak.peak_bytes,
        "num_tokens": len(context_ids),
    }
    seen = len(context_ids)
    pending: list[int] = []
    turns = []
    for index, (query, budget) in enumerate(zip(query_ids, max_new_tokens)):
        if mode == "append" and history == "golden":
            # Append the previous query and its golden answer, then answer this query on a copy.
            if pending:
                prefill(model, torch.tensor([pending], device=device), cache, past_length=seen)
                seen += len(pending)
            pending = []
        fed = pending + list(query)
        work = cache if mode == "append" and history == "generated" else copy.deepcopy(cache)
        with PeakMemory(device) as peak:
            out = greedy_generate(
                model,
                torch.tensor([fed], device=device),
                work,
                max_new_tokens=budget,
                eos_token_id=eos,
                past_length=seen,
            )
        tokens = out.tokens(0)
        turns.append(
            {
                "tokens": tokens,
                "prefill_s": out.prefill_s,
                "decode_s": out.decode_s,
                "decode_tokens_per_s": out.decode_tokens_per_s,
                "num_prompt_tokens": len(fed),
                "num_cached_tokens": seen,
                "kv_bytes": cache_memory_bytes(work),
                **_memory_split(work),
                "peak_memory_bytes": max(peak.peak_bytes, context["peak_memory_bytes"]),
                "peak_memory_kind": peak.kind,
            }
        )
        if mode == "append":
            if history == "generated":
                seen += len(fed) + len(tokens) - 1
                pending = tokens[-1:]
            else:
                pending = list(query) + list(golden_ids[index])
    return turns, context


# ----------------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------------


def evaluate(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Sample],
    cache_name: str,
    cache_options: Mapping[str, Any] | None = None,
    *,
    mode: str = "single",
    history: str = "generated",
    batch_size: int = 1,
    metric: str | None = None,
    cache_label: str | None = None,
    fidelity: bool = False,
    references: dict[str, Reference] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Answers every turn of ``samples`` through fresh caches ``make_cache(cache_name, model, **cache_options)``.

    Args:
        model: a Hugging Face causal LM (in eval mode, on its device).
        tokenizer: its tokenizer.
        samples: the samples (see :mod:`hf_longmem.evals.schema`).
        cache_name: a registry name from :func:`hf_longmem.available_caches`.
        cache_options: the cache's options, e.g. ``{"budget": 256}``.
        mode: ``"single"``, ``"rollback"`` or ``"append"`` (see the module docstring).
        history: append mode only: ``"generated"`` or ``"golden"`` answers are appended.
        batch_size: prompts per forward in single mode (left padding); 1 elsewhere.
        metric: metric name for every turn (default: per task, see :func:`hf_longmem.evals.metrics.metric_for`).
        cache_label: the name recorded as ``"cache"`` (default: ``cache_name``).
        fidelity: also compare against the full cache on ``context + turns[0].query`` of each sample (top-1
            agreement and KL over the full cache's greedy answer, see :mod:`hf_longmem.evals.fidelity`); in the
            shared-context modes the context is prefilled (and compressed) before the query, as those modes do.
        references: memo of full-cache references by sample id, filled and reused (share it between calls on the
            same samples so the full cache runs once per sample).
        progress: show a tqdm bar.

    Returns:
        One record per (sample, turn): ``sample_id``, ``task``, ``turn``, ``mode``, ``cache``, ``cache_name``,
        ``cache_kwargs``, ``context_length`` (the sample's target length), ``prediction``, ``answers``, ``metric``,
        ``score``, ``num_new_tokens``, ``stopped_at_eos``, ``num_prompt_tokens`` (fed this turn),
        ``num_cached_tokens`` (seen by the cache before), ``prefill_s`` (time to first token of this turn),
        ``decode_s``, ``decode_tokens_per_s`` (``None`` if a single token), ``context_prefill_s`` (shared-context
        modes), ``kv_bytes`` (held after the turn; a batch's bytes split evenly between its rows),
        ``peak_memory_bytes``, ``peak_memory_kind``, ``batch_size``, ``top1_agreement`` and ``kl`` (first turn with
        ``fidelity``, else ``None``).
    """
    _check_mode(mode, history, batch_size)
    samples = list(samples)
    if is_choice_task(samples):  # ranking tasks (SORT): scored by log-likelihood through the cache, not generated
        return evaluate_choices(
            model,
            tokenizer,
            samples,
            cache_name,
            cache_options,
            mode=mode,
            metric=metric,
            cache_label=cache_label,
            fidelity=fidelity,
            references=references,
        )
    options = dict(cache_options or {})
    make_cache(cache_name, model, **options)  # fail fast on bad options, before any work
    decoder = _Decoder(model, tokenizer)
    label = cache_label or cache_name
    common = {"mode": mode, "cache": label, "cache_name": cache_name, "cache_kwargs": options}
    records: list[dict[str, Any]] = []
    samples = list(samples)
    encoded = [
        (_encode(tokenizer, s.context, special=True), [_encode(tokenizer, t.query, special=False) for t in s.turns])
        for s in samples
    ]
    bar = tqdm(total=len(samples), desc=f"{label} ({mode})", unit="sample", disable=not progress, leave=False)
    if mode == "single":
        items = [(si, ti) for si, sample in enumerate(samples) for ti in range(len(sample.turns))]
        done_samples: set[int] = set()
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            prompts = [encoded[si][0] + encoded[si][1][ti] for si, ti in batch]
            budget = max(samples[si].turns[ti].max_new_tokens for si, ti in batch)
            cache = make_cache(cache_name, model, **options)
            input_ids, mask = _left_pad(prompts, decoder.pad, decoder.device)
            with PeakMemory(decoder.device) as peak:
                out = greedy_generate(
                    model,
                    input_ids,
                    cache,
                    max_new_tokens=budget,
                    eos_token_id=decoder.eos,
                    pad_token_id=decoder.pad,
                    attention_mask=mask,
                )
            kv_bytes = cache_memory_bytes(cache) / len(batch)
            split = _memory_split(cache, len(batch))
            for row, (si, ti) in enumerate(batch):
                sample, turn = samples[si], samples[si].turns[ti]
                tokens = out.tokens(row)[: turn.max_new_tokens]
                record = _turn_record(decoder, sample, ti, turn, tokens, metric)
                record.update(
                    common,
                    num_prompt_tokens=len(prompts[row]),
                    num_cached_tokens=0,
                    prefill_s=out.prefill_s,
                    decode_s=out.decode_s,
                    decode_tokens_per_s=out.decode_tokens_per_s,
                    context_prefill_s=None,
                    kv_bytes=int(round(kv_bytes)),
                    **split,
                    peak_memory_bytes=peak.peak_bytes,
                    peak_memory_kind=peak.kind,
                    batch_size=len(batch),
                    top1_agreement=None,
                    kl=None,
                )
                records.append(record)
            new = {si for si, _ in batch} - done_samples
            done_samples |= new
            bar.update(len(new))
    else:
        for si, sample in enumerate(samples):
            context_ids, query_ids = encoded[si]
            golden = [_encode(tokenizer, " " + t.answers[0], special=False) + decoder.eos[:1] for t in sample.turns]
            turns, context = answer_turns(
                model,
                make_cache(cache_name, model, **options),
                context_ids,
                query_ids,
                [t.max_new_tokens for t in sample.turns],
                mode=mode,
                history=history,
                golden_ids=golden,
                eos_token_id=decoder.eos,
            )
            for ti, (turn, result) in enumerate(zip(sample.turns, turns)):
                record = _turn_record(decoder, sample, ti, turn, result["tokens"], metric)
                record.update(common)
                record.update({k: v for k, v in result.items() if k != "tokens"})
                record.update(context_prefill_s=context["prefill_s"], batch_size=1, top1_agreement=None, kl=None)
                records.append(record)
            bar.update(1)
    bar.close()
    if fidelity:
        _add_fidelity(model, samples, encoded, records, cache_name, options, decoder, references, progress, label, mode)
    return records


def _left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[batch, max_len]`` left-padded ids and the attention mask (``None`` for one prompt: no padding)."""
    if len(prompts) == 1:
        return torch.tensor(prompts, dtype=torch.long, device=device), None
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _add_fidelity(
    model: Any,
    samples: list[Sample],
    encoded: list[tuple[list[int], list[list[int]]]],
    records: list[dict[str, Any]],
    cache_name: str,
    options: dict[str, Any],
    decoder: _Decoder,
    references: dict[str, Reference] | None,
    progress: bool,
    label: str,
    mode: str,
) -> None:
    """Adds ``top1_agreement`` and ``kl`` to the first record of each sample (the compressed cache is filled as the
    mode fills it: context and first query in one forward in single mode, the context first otherwise)."""
    memo = references if references is not None else {}
    first_record = {}
    for record in records:
        first_record.setdefault(record["sample_id"], record)
    for si, sample in enumerate(tqdm(samples, desc=f"{label} fidelity", leave=False, disable=not progress)):
        context_ids, query_ids = encoded[si]
        prompt = decoder.tensor(context_ids + query_ids[0])
        reference = memo.get(sample.id)
        if reference is None or not torch.equal(reference.input_ids.cpu(), prompt.cpu()):
            reference = reference_continuation(
                model, prompt, max_new_tokens=sample.turns[0].max_new_tokens, eos_token_id=decoder.eos
            )
            memo[sample.id] = reference
        split = len(context_ids) if mode != "single" else None
        result = compare_to_reference(model, reference, make_cache(cache_name, model, **options), context_length=split)
        first_record[sample.id].update(top1_agreement=result.top1_agreement, kl=result.kl)


# ----------------------------------------------------------------------------------------------------------------------
# run_benchmark
# ----------------------------------------------------------------------------------------------------------------------


def _memory_split(cache: Any, rows: int = 1) -> dict[str, int]:
    """``kv_resident_bytes``/``kv_offloaded_bytes`` of a cache whose budget bounds the bytes on the compute device
    (``memory_saving = "resident"``: InfLLM/EM-LLM memory blocks offloaded to CPU), per row, from its
    ``memory_breakdown()``; ``{}`` for other caches (every byte they hold is resident)."""
    if getattr(cache, "memory_saving", None) != "resident" or not hasattr(cache, "memory_breakdown"):
        return {}
    split = cache.memory_breakdown()
    return {
        "kv_resident_bytes": int(round(split.get("resident", 0) / rows)),
        "kv_offloaded_bytes": int(round(split.get("offloaded", 0) / rows)),
    }


def aggregate_records(
    records: Sequence[Mapping[str, Any]],
    *,
    model: str,
    task: str,
    cache: str,
    cache_name: str,
    cache_kwargs: Mapping[str, Any],
    context_length: int,
    num_samples: int,
) -> dict[str, Any]:
    """One benchmark row from the records of one (task, length, cache).

    ``accuracy``, ``kv_bytes``, ``prefill_s``, ``decode_tokens_per_s``, ``top1_agreement`` and ``kl`` are means over
    the records that have them (``None`` when none has), ``peak_memory_bytes`` is the maximum;
    ``accuracy_low``/``accuracy_high`` bound the 95% Wilson interval of the accuracy over the ``num_turns`` scored
    answers (:func:`~hf_longmem.evals.metrics.wilson_interval`). Extra keys:
    ``mode``, ``num_turns``, ``mean_prompt_tokens``, ``context_prefill_s`` (shared-context modes),
    ``peak_memory_kind`` and, for caches with a ``memory_breakdown()`` (InfLLM, EM-LLM), ``kv_resident_bytes`` and
    ``kv_offloaded_bytes`` (means; their sum is ``kv_bytes``).
    """
    if not records:
        raise ValueError(f"no records to aggregate for task={task!r}, cache={cache!r}, length={context_length}")
    kv = _mean([r["kv_bytes"] for r in records])
    kinds = sorted({r["peak_memory_kind"] for r in records})
    accuracy = _mean([r["score"] for r in records])
    low, high = (None, None) if accuracy is None else wilson_interval(accuracy, len(records))
    return {
        "model": model,
        "task": task,
        "cache": cache,
        "cache_name": cache_name,
        "cache_kwargs": dict(cache_kwargs),
        "context_length": int(context_length),
        "num_samples": int(num_samples),
        "accuracy": accuracy,
        "accuracy_low": low,
        "accuracy_high": high,
        "kv_bytes": None if kv is None else int(round(kv)),
        "prefill_s": _mean([r["prefill_s"] for r in records]),
        "decode_tokens_per_s": _mean([r["decode_tokens_per_s"] for r in records]),
        "peak_memory_bytes": max(int(r["peak_memory_bytes"]) for r in records),
        "top1_agreement": _mean([r.get("top1_agreement") for r in records]),
        "kl": _mean([r.get("kl") for r in records]),
        "mode": records[0]["mode"],
        "num_turns": len(records),
        "mean_prompt_tokens": _mean([r["num_prompt_tokens"] + r["num_cached_tokens"] for r in records]),
        "context_prefill_s": _mean([r.get("context_prefill_s") for r in records]),
        "peak_memory_kind": ",".join(kinds),
        **{
            key: int(round(_mean([r[key] for r in records])))
            for key in ("kv_resident_bytes", "kv_offloaded_bytes")
            if all(r.get(key) is not None for r in records)
        },
    }


def run_benchmark(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | Mapping[str, Mapping[str, Any]],
    lengths: Sequence[int],
    caches: Mapping[str, tuple[str, CacheOptions]],
    num_samples: int = 4,
    seed: int = 0,
    fidelity: bool = False,
    *,
    mode: str | None = None,
    history: str = "generated",
    batch_size: int = 1,
    model_name: str | None = None,
    task_generator: Callable[..., list[Sample]] | None = None,
    records: list[dict[str, Any]] | None = None,
    progress: bool = True,
    completed_rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy vs KV bytes vs latency (and optionally fidelity) of several caches over tasks and lengths.

    For every task and length the samples are generated once and answered by every cache.

    Args:
        model: a Hugging Face causal LM.
        tokenizer: its tokenizer.
        tasks: task names of :data:`hf_longmem.evals.tasks.TASKS`, or a mapping name -> generator options.
        lengths: context lengths in tokens of ``tokenizer``.
        caches: label -> ``(registry name, options)``; options may be a callable ``length -> dict`` (e.g. a budget
            proportional to the length).
        num_samples: samples per (task, length).
        seed: generator seed.
        fidelity: also measure top-1 agreement and KL against the full cache.
        mode: ``"single"``, ``"rollback"`` or ``"append"``; ``None`` picks ``"single"`` for single-turn samples and
            ``"rollback"`` for multi-turn ones.
        history: append mode: ``"generated"`` or ``"golden"``.
        batch_size: prompts per forward in single mode.
        model_name: recorded as ``"model"`` (default: the model's ``name_or_path``).
        task_generator: ``(name, tokenizer, length, num_samples, seed, **options) -> list[Sample]``; default
            :func:`hf_longmem.evals.tasks.generate_task`.
        records: if given, every per-turn record is appended to it (with ``"model"`` added).
        progress: show tqdm bars.
        completed_rows: if given, each row is appended to it as soon as it is complete, so that a caller keeps the
            finished rows when the run is interrupted (Ctrl-C).

    Returns:
        One row per (task, length, cache) in that nesting order, with the keys of
        :data:`~hf_longmem.evals.schema.ROW_KEYS` (the fields: :data:`~hf_longmem.evals.schema.ROW_FIELDS`; see
        :func:`aggregate_records`).
    """
    if not lengths:
        raise ValueError("`lengths` must list at least one context length")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"`lengths` must be positive ints, got {length!r}")
    if not caches:
        raise ValueError("`caches` must map at least one label to (cache name, options)")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}")
    if mode is not None:
        _check_mode(mode, history, batch_size)
    task_options = dict(tasks) if isinstance(tasks, Mapping) else {name: {} for name in tasks}
    if not task_options:
        raise ValueError("`tasks` must name at least one task")
    for label, entry in caches.items():
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"`caches[{label!r}]` must be a (cache name, options) tuple, got {entry!r}")
        get_cache_spec(entry[0])
        for length in lengths:  # fail fast on bad options
            make_cache(entry[0], model, **resolve_cache_options(entry[1], length))
    if task_generator is None:
        from .tasks import generate_task as task_generator
    name = model_name or model_name_of(model)
    rows: list[dict[str, Any]] = [] if completed_rows is None else completed_rows
    combos = [(task, length) for task in task_options for length in lengths]
    outer = tqdm(total=len(combos) * len(caches), desc="benchmark", unit="run", disable=not progress)
    for task, length in combos:
        samples = task_generator(task, tokenizer, length, num_samples, seed, **dict(task_options[task]))
        if not samples:
            raise ValueError(f"task {task!r} produced no samples at length {length}")
        # Auto: single for one-question tasks, rollback for several and for ranking tasks (their context is compressed
        # before the question, the realistic setting; SCBench / kvpress).
        single = all(len(s.turns) == 1 for s in samples) and not is_choice_task(samples)
        task_mode = mode or ("single" if single else "rollback")
        references: dict[str, Reference] = {}
        for label, (cache_name, options) in caches.items():
            outer.set_postfix_str(f"{task} {length} {label}")
            opts = resolve_cache_options(options, length)
            recs = evaluate(
                model,
                tokenizer,
                samples,
                cache_name,
                opts,
                mode=task_mode,
                history=history,
                batch_size=batch_size if task_mode == "single" else 1,
                cache_label=label,
                fidelity=fidelity,
                references=references,
                progress=progress,
            )
            if records is not None:
                records.extend({"model": name, **r} for r in recs)
            row = aggregate_records(
                recs,
                model=name,
                task=task,
                cache=label,
                cache_name=cache_name,
                cache_kwargs=opts,
                context_length=length,
                num_samples=len(samples),
            )
            note = getattr(get_cache_spec(cache_name).cls, "memory_note", None)
            if note:  # why this method may hold as much as the full cache (shown when it does)
                row["memory_note"] = note
            rows.append(row)
            outer.update(1)
    outer.close()
    return rows
