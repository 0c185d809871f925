#!/usr/bin/env python
"""Train the small Llama that ships as hf_longmem's embedded default model.

Builds the closed word-level tokenizer of ``hf_longmem.evals.vocab``, then trains a seeded
``LlamaForCausalLM`` (GQA, RoPE) on an infinite stream of generated passkey / multi-key needle / variable
tracking / shared-context samples with a curriculum over lengths, and saves model (safetensors),
tokenizer and ``training_metadata.json`` into ``output_dir``.

    accelerate launch recipes/train_tiny.py --config recipes/configs/train_tiny.yaml
    python recipes/train_tiny.py --config recipes/configs/train_tiny.yaml --max_steps 3 --output_dir /tmp/x

Every scalar config key can be overridden on the command line (``--learning_rate 1e-3``).

On a GPU set ``num_workers`` (batches are generated and collated in background processes),
``mixed_precision: bf16`` and optionally ``max_time_s`` (a wall-time budget: the LR schedule and the length
curriculum follow ``progress = max(step / max_steps, elapsed / max_time_s)``, so a run stopped by the clock has
fully decayed its learning rate and visited every curriculum stage). ``recipes/device_train_tiny.sh`` is the GPU run.

A long CPU run can be split over several processes: ``--checkpoint_every N`` writes a resumable checkpoint
(``output_dir/checkpoints/step-N``: weights and optimizer state as safetensors + JSON, nothing pickled),
``--session_time_s S`` checkpoints and exits after ``S`` seconds of this process, and ``--resume auto`` continues
from the latest checkpoint. The batch of step ``s`` depends on ``(seed, s)`` only, so a resumed run trains on
exactly the batches an uninterrupted run would have seen.

The log shows, per task, the fraction of recent training samples whose answer tokens are all predicted
(argmax, teacher forced): that equals greedy exact match on these fresh samples.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _config import parse_recipe_config
from accelerate.utils import set_seed
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from hf_longmem.continual.state_io import load_tree, save_tree
from hf_longmem.evals.mixture import TaskMixture, collate
from hf_longmem.evals.tasks import KEY_WORDS
from hf_longmem.evals.vocab import build_tokenizer
from hf_longmem.training.distributed import any_process, build_accelerator, unsharded_model


@dataclass
class TrainConfig:
    """Recipe configuration (YAML keys; scalars can be overridden with ``--key value``).

    ``curriculum`` is a list of stages ``{until, min_length, max_length}``: a step ``s`` uses the first stage
    with ``s / max_steps < until`` and draws its length uniformly in ``[min_length, max_length]`` (multiples
    of ``length_multiple``); the batch holds ``tokens_per_batch // length`` samples of that length.

    ``copy_*``: every step also trains on ``copy_batch_size`` sequences ``x + x`` of ``copy_length`` random tokens
    (loss on the repeat only, weighted ``copy_loss_weight``; 0 turns it off). Dense copy targets grow the
    induction heads retrieval needs within ~100 steps; without them the needle tasks sat on a loss plateau for
    1000+ steps in our pilots (their answers are a few tokens in hundreds of predictable filler tokens).
    With a fixed offset between a token and its repeat, the copy can be learned by a head that attends ``copy_length``
    positions back, which helps no retrieval task: ``copy_gap > 0`` puts ``0..copy_gap`` random tokens (drawn per
    row) between the two copies, so only content-based induction (find the earlier occurrence of the current token,
    predict what followed it) solves it; the loss is then on the repeat after its first token.
    ``copy_digit_fraction`` of the copy rows draw their tokens from the ten digits only: there one previous token does
    not say what comes next, so they train the multi-token prefix matching that continuing a 7-digit value needs.

    ``recall_*``: every step also trains on ``recall_batch_size`` dense multi-key recall sequences (0 weight turns it
    off, the default): ``recall_pairs`` records ``key v_1..v_L`` (distinct random keys, ``L = recall_value_length``
    random value tokens), then every key once more in shuffled order as a query ``key g_1..g_G v_1..v_L`` with the
    same ``G = recall_gap`` random gap tokens after each key (loss on the queried values only, weighted
    ``recall_loss_weight``). Plain induction cannot answer the first value (the key is ``G`` tokens back), which is
    what the multi-key needle asks ("... for KEY mentioned in the provided text is"). ``recall_record_gap`` random
    tokens (the same in every record of a row) sit between each record's key and its values, as " is:" does in the
    needle "for KEY is: VALUE". ``recall_keys = "keywords"`` builds the records like the needles instead: keys are
    the needle key words (:data:`hf_longmem.evals.tasks.KEY_WORDS`), values digits (``" 4" "0" "9"``, as a needle
    value tokenizes), and each record and each query gets its own number of gap words, uniform in
    ``[0, recall_record_gap]`` and ``[0, recall_gap]`` (random words that are neither keys nor digits). With the
    distance varying per record no fixed-offset head finds the key: the model has to find "the last key word" by
    content, which is the circuit the needle needs (its key is 3 tokens before the value and 6 before the answer).
    A curriculum stage may set ``recall_gap`` / ``recall_record_gap`` (a distance curriculum: 0 first, where
    recall is plain induction, then growing). ``recall_advance_below > 0`` makes that curriculum follow competence
    instead of the clock: the gaps start at 0 and grow one level (of ``max(recall_record_gap, 1)``, both gaps in
    proportion) whenever the mean recall loss between two log steps is below it (the level is checkpointed; keep
    ``checkpoint_every`` a multiple of ``log_every`` for a resume that equals the uninterrupted run).

    ``num_workers``: background processes generating and collating the task batches (``torch.utils.data``
    ``DataLoader`` over :class:`BatchStream`; ``prefetch_batches`` each); 0 generates them in the training process
    (bit-for-bit the historical stream). Worker ``w`` produces the steps ``s`` with ``s % num_workers == w`` from
    its own seeds (``1000 * (w + 1) + seed + process_index``), so a run is reproducible for a fixed
    ``num_workers`` up to the wall-clock curriculum of ``max_time_s``.

    ``mixed_precision``: ``"no"`` or ``"bf16"`` / ``"fp16"``, passed to ``Accelerator`` (autocast; weights and
    the saved model stay fp32). ``num_threads`` sets the training process's CPU threads (workers use 1 each).

    ``max_time_s``: wall-time budget of the training loop in seconds (0 = none). Training stops after the first
    step that ends past it, then saves as usual (``training_metadata.json`` records ``steps`` done and
    ``stopped_by``). The learning rate (linear warm-up over ``warmup_steps``, then cosine to ``min_lr_rate``) and
    the curriculum follow ``progress = max(step / max_steps, elapsed / max_time_s)`` instead of ``step / max_steps``,
    so whichever budget ends first ends the schedule; with ``max_time_s = 0`` this is the step-based schedule.

    ``checkpoint_every``: steps between resumable checkpoints in ``output_dir/checkpoints`` (0: only when
    ``session_time_s`` ends the process); the last ``keep_checkpoints`` are kept. ``session_time_s``: wall time of
    this process's training loop (0 = none); when it has passed, the run writes a checkpoint and exits without the
    final save (``stopped_by = "session_time_s"``); ``max_time_s`` still counts the time of every session.
    ``resume``: ``"auto"`` continues from the latest checkpoint of ``output_dir`` if there is one, a path continues
    from that checkpoint, ``""`` starts fresh. A checkpoint whose training options differ from the config (anything
    but the output and speed options of :data:`RUNTIME_OPTIONS`) is refused with a ``ValueError`` naming them.

    ``first_answer_loss_weight``: weight of each answer's first token (0: ``answer_loss_weight``), where a
    retrieval task selects its fact.

    ``extended_vocabulary``: build the tokenizer with ``build_tokenizer(extended=True)`` (RULER's multi-value and
    multi-query phrasing, ``fact_qa`` and the WISE fictional facts; a superset of the v1 vocabulary).

    ``init_from``: a saved model directory (e.g. the v1 embedded model) to fine-tune instead of a fresh
    ``model`` (whose keys are then ignored); its vocabulary must be the tokenizer's.
    """

    output_dir: str = "runs/tiny-longmem"
    seed: int = 0
    num_threads: int = 2
    max_steps: int = 2000
    tokens_per_batch: int = 8192
    length_multiple: int = 32
    learning_rate: float = 2e-3
    min_lr_rate: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    answer_loss_weight: float = 5.0
    first_answer_loss_weight: float = 0.0
    copy_batch_size: int = 16
    copy_length: int = 24
    copy_loss_weight: float = 1.0
    copy_digit_fraction: float = 0.0
    copy_gap: int = 0
    recall_batch_size: int = 8
    recall_pairs: int = 8
    recall_value_length: int = 4
    recall_gap: int = 3
    recall_record_gap: int = 0
    recall_keys: str = "random"
    recall_advance_below: float = 0.0
    recall_loss_weight: float = 0.0
    log_every: int = 25
    save_every: int = 0
    num_workers: int = 0
    prefetch_batches: int = 4
    mixed_precision: str = "no"
    max_time_s: float = 0.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    session_time_s: float = 0.0
    resume: str = ""
    init_from: str = ""
    extended_vocabulary: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=lambda: {"passkey": 1.0})
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    curriculum: list[dict[str, Any]] = field(
        default_factory=lambda: [{"until": 1.0, "min_length": 128, "max_length": 512}]
    )


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Read ``--config`` YAML, then apply scalar ``--key value`` overrides."""
    config, _ = parse_recipe_config(TrainConfig, argv, __doc__.split("\n\n")[0])
    for stage in config.curriculum:
        if not 0 < stage["min_length"] <= stage["max_length"]:
            raise ValueError(f"curriculum stage needs 0 < min_length <= max_length, got {stage}")
    if config.max_steps < 1 or config.tokens_per_batch < 1:
        raise ValueError(
            f"max_steps and tokens_per_batch must be >= 1, got {config.max_steps}, {config.tokens_per_batch}"
        )
    if config.num_workers < 0 or config.prefetch_batches < 1:
        raise ValueError(
            f"num_workers must be >= 0 and prefetch_batches >= 1, got {config.num_workers}, {config.prefetch_batches}"
        )
    if config.max_time_s < 0:
        raise ValueError(f"max_time_s must be >= 0 (0 = no time budget), got {config.max_time_s}")
    if config.checkpoint_every < 0 or config.keep_checkpoints < 1 or config.session_time_s < 0:
        raise ValueError(
            "checkpoint_every and session_time_s must be >= 0 and keep_checkpoints >= 1, got "
            f"{config.checkpoint_every}, {config.session_time_s}, {config.keep_checkpoints}"
        )
    if config.recall_advance_below < 0:
        raise ValueError(f"recall_advance_below must be >= 0 (0 = off), got {config.recall_advance_below}")
    if config.recall_keys not in ("random", "keywords"):
        raise ValueError(f"recall_keys must be 'random' or 'keywords', got {config.recall_keys!r}")
    if not 0 <= config.copy_digit_fraction <= 1:
        raise ValueError(f"copy_digit_fraction must be in [0, 1], got {config.copy_digit_fraction}")
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {config.mixed_precision!r}")
    return config


class Progress:
    """Training progress in ``[0, 1]``: ``max(step / max_steps, elapsed / max_time_s)`` (see :class:`TrainConfig`).

    ``value`` is the progress at the last :meth:`update`; it lives in shared memory (``multiprocessing.Value``) when
    ``shared`` so that :class:`BatchStream` workers follow the same curriculum as the training loop.
    """

    def __init__(self, config: TrainConfig, shared: bool = False) -> None:
        self.max_steps, self.max_time_s = config.max_steps, config.max_time_s
        self._shared = torch.multiprocessing.get_context("fork").Value("d", 0.0, lock=False) if shared else None
        self._value, self.start = 0.0, time.time()

    @property
    def value(self) -> float:
        return self._shared.value if self._shared is not None else self._value

    def elapsed(self) -> float:
        return time.time() - self.start

    def update(self, step: int) -> float:
        """Set and return the progress after ``step`` completed steps."""
        value = step / self.max_steps
        if self.max_time_s:
            value = max(value, self.elapsed() / self.max_time_s)
        value = min(value, 1.0)
        if self._shared is not None:
            self._shared.value = value
        self._value = value
        return value


def lr_factor(step: int, progress: float, config: TrainConfig) -> float:
    """Multiplier of ``learning_rate`` after ``step`` steps at ``progress`` (linear warm-up, cosine to min).

    With ``max_time_s = 0`` (``progress = step / max_steps``) this is transformers'
    ``get_cosine_with_min_lr_schedule_with_warmup``; with a time budget the cosine runs over the progress after
    warm-up, ``(progress - w) / (1 - w)`` with ``w = warmup_steps / max_steps``.
    """
    if step < config.warmup_steps:
        return step / max(1, config.warmup_steps)
    warm = config.warmup_steps / config.max_steps
    if config.max_time_s:
        fraction = (progress - warm) / max(1e-9, 1 - warm)
    else:
        fraction = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    fraction = min(max(fraction, 0.0), 1.0)
    return config.min_lr_rate + (1 - config.min_lr_rate) * 0.5 * (1 + math.cos(math.pi * fraction))


def stage_length(config: TrainConfig, progress: float, rng: random.Random) -> tuple[int, int]:
    """``(length, batch_size)`` of one step at ``progress``, drawn from the curriculum stage it falls in."""
    m = config.length_multiple
    stage = next((s for s in config.curriculum if progress < s["until"]), config.curriculum[-1])
    length = m * rng.randint(-(-stage["min_length"] // m), stage["max_length"] // m)
    return length, max(1, config.tokens_per_batch // length)


RUNTIME_OPTIONS = frozenset(
    {"output_dir", "num_threads", "num_workers", "prefetch_batches", "log_every", "save_every", "checkpoint_every"}
    | {"keep_checkpoints", "session_time_s", "resume"}
)
"""Config keys that change how a run is executed or saved but not what it trains: free to differ on resume."""


def step_seed(config: TrainConfig, process_index: int, step: int) -> int:
    """The seed of everything step ``step`` (0-based) draws: its length, its samples, its copy and recall batches."""
    return ((config.seed * 1_000_003 + process_index) << 32) + step


def length_schedule(config: TrainConfig) -> Iterator[tuple[int, int]]:
    """``(length, batch_size)`` per step, following the curriculum (seeded by :func:`step_seed`)."""
    for step in range(config.max_steps):
        yield stage_length(config, step / config.max_steps, random.Random(step_seed(config, 0, step)))


class BatchStream(IterableDataset):
    """Infinite stream of collated task batches (``dict`` of tensors plus ``"tasks"``: the samples' task names).

    The batch of step ``s`` is drawn from :func:`step_seed` ``(config, process_index, s)`` alone: its length from
    ``random.Random(seed)``, its samples from ``TaskMixture(seed=seed)``. The stream therefore does not depend on
    ``num_workers`` and a run resumed at step ``s`` (``start_step``) sees the batches an uninterrupted run would. In
    DataLoader worker ``w`` of ``n`` it yields the batches of steps ``start_step + w, start_step + w + n, ...``; the
    DataLoader interleaves workers round-robin, so step order is preserved. The curriculum of step ``s`` follows
    ``s / max_steps``, or with a time budget ``max(s / max_steps, progress.value)`` (the shared progress the training
    loop published last; workers run up to ``n * prefetch_batches`` steps ahead of it).
    """

    def __init__(
        self, config: TrainConfig, tokenizer: Any, process_index: int, progress: Progress, start_step: int = 0
    ) -> None:
        self.config, self.tokenizer, self.process_index, self.progress = config, tokenizer, process_index, progress
        self.start_step = start_step

    def batch(self, step: int) -> dict[str, Any]:
        """The collated batch of step ``step`` (0-based)."""
        config = self.config
        seed = step_seed(config, self.process_index, step)
        progress = step / config.max_steps  # the step this batch is for: reproducible
        if config.max_time_s:  # the clock, as the training loop last published it
            progress = max(progress, self.progress.value)
        length, batch_size = stage_length(config, progress, random.Random(seed))
        mixture = TaskMixture(self.tokenizer, config.tasks, config.task_options, seed=seed)
        samples = [mixture.sample(length) for _ in range(batch_size)]
        first = config.first_answer_loss_weight or None
        batch = collate(samples, self.tokenizer.pad_token_id, config.answer_loss_weight, first)
        batch["tasks"] = [sample.task for sample in samples]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += num_workers


def batch_loader(
    config: TrainConfig, tokenizer: Any, process_index: int, progress: Progress, pin: bool, start_step: int = 0
) -> Any:
    """The batches of :class:`BatchStream` from ``start_step``: in process (``num_workers = 0``) or from a ``DataLoader``."""
    stream = BatchStream(config, tokenizer, process_index, progress, start_step)
    if config.num_workers == 0:
        return iter(stream)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=config.num_workers,
        prefetch_factor=config.prefetch_batches,
        pin_memory=pin,
        multiprocessing_context="fork",
    )
    return iter(loader)


def build_model(config: TrainConfig, tokenizer: Any) -> LlamaForCausalLM:
    """Seeded Llama from ``config.model`` with the tokenizer's vocabulary and special ids."""
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config.model,
    )
    set_seed(config.seed)
    if config.init_from:
        model = LlamaForCausalLM.from_pretrained(config.init_from, local_files_only=True)
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(f"init_from={config.init_from} has vocab {model.config.vocab_size}, not {len(tokenizer)}")
        return model
    return LlamaForCausalLM(model_config)


def weighted_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted next-token cross entropy, per-sample answer exactness and the mean answer-token loss.

    Args:
        logits: ``(B, T, V)``.
        batch: output of :func:`hf_longmem.evals.mixture.collate`.

    Returns:
        ``(loss, exact, answer_loss)``: scalar loss; ``exact`` ``(B,)`` bool, True where every answer target
        is the argmax; ``answer_loss`` the mean cross entropy over answer targets (a detached scalar tensor, for
        logging; not read back each step, so a GPU run does not synchronize).
    """
    logits = logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    weights, answer = batch["loss_weights"], batch["answer_mask"]
    loss = (ce * weights).sum() / weights.sum()
    exact = ((logits.argmax(-1) == targets) | ~answer).all(-1)
    answer_loss = (ce.detach() * answer).sum() / answer.sum().clamp(min=1)  # no boolean indexing: no sync
    return loss, exact, answer_loss


def save(model: Any, tokenizer: Any, output_dir: Path, metadata: dict[str, Any]) -> None:
    """Write model (safetensors), generation config, tokenizer and ``training_metadata.json``.

    Atomically per file: everything is written to a temporary folder next to ``output_dir``, then each file is
    moved in with ``os.replace`` (``training_metadata.json`` last), so a run stopped during a (partial, ``save_every``)
    save never leaves a truncated file, and the metadata names a checkpoint whose files are all in place.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.saving-") as staging:
        staging = Path(staging)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "training_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        written = sorted(staging.iterdir(), key=lambda path: path.name == "training_metadata.json")
        if any(not path.is_file() for path in written):
            raise RuntimeError(f"save expected files only, got folders in {[p.name for p in written]}")
        for path in written:
            os.replace(path, output_dir / path.name)


CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the largest step in ``output_dir/checkpoints`` (``None`` if none)."""
    root = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := CHECKPOINT_PATTERN.fullmatch(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(
    model: Any,
    optimizer_state: dict[str, Any],
    output_dir: Path,
    state: dict[str, Any],
    keep: int,
    tokenizer: Any = None,
) -> Path:
    """Write a resumable checkpoint ``output_dir/checkpoints/step-<step>`` and prune all but the last ``keep``.

    Holds ``model.safetensors`` (the weights of the whole ``model``), ``optimizer.json`` + ``optimizer.safetensors``
    (``optimizer_state``: the optimizer's full state keyed by parameter name, :func:`optimizer_state`;
    :func:`hf_longmem.continual.state_io.save_tree`: nothing pickled) and ``trainer_state.json``
    (``state``: step, tokens, elapsed time, config, log), plus the model's ``config.json`` and the ``tokenizer``'s
    files, so that the checkpoint also loads with ``AutoModelForCausalLM.from_pretrained`` (``recipes/eval_tiny.py
    --model <checkpoint>``, or ``init_from``). The folder is written under a temporary name and renamed, so a
    checkpoint that exists is complete.
    """
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:09d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".saving-"))
    try:
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        save_tree(optimizer_state, staging, "optimizer")
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        if final.exists():  # the same step again (a resumed run that stops at once): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    found = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := CHECKPOINT_PATTERN.fullmatch(p.name)))
    for _, old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter name (``torch.distributed.checkpoint``'s full optimizer state
    dict, on CPU): the same for a plain and an FSDP-sharded model (every process of a sharded run must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load :func:`optimizer_state`'s dict into ``optimizer`` (after ``accelerator.prepare``: a sharded run keeps its
    own shards of it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state, options=options)


def by_parameter_name(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """An ``optimizer.state_dict()`` of a checkpoint written before optimizer states were keyed by name (its
    parameters are numbered in ``model.parameters()`` order, the order the optimizer was built with) in the form of
    :func:`optimizer_state`."""
    names = [name for name, _ in model.named_parameters()]
    numbered = [str(i).isdigit() for g in state["param_groups"] for i in g["params"]]
    if not any(numbered):
        return state
    return {
        "state": {names[int(k)]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }


def load_checkpoint(path: Path, config: TrainConfig, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the weights of a :func:`save_checkpoint` folder into ``model`` (before ``accelerator.prepare``); returns
    its trainer state and its optimizer state (:func:`optimizer_state`'s form, for :func:`load_optimizer_state`).

    Raises:
        ValueError: the folder is not a checkpoint, or it was trained with other options than ``config`` (the
            message names them; :data:`RUNTIME_OPTIONS` may differ).
    """
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise ValueError(f"{path} is not a train_tiny checkpoint (no trainer_state.json)")
    state = json.loads(state_file.read_text())
    saved, current = state["config"], json.loads(json.dumps(asdict(config)))
    differing = sorted(
        k for k in saved.keys() | current.keys() if k not in RUNTIME_OPTIONS and saved.get(k) != current.get(k)
    )
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}" for k in differing)
        raise ValueError(
            f"{path} was trained with other options ({details}). Resume with the checkpoint's options, or start "
            "fresh in another output_dir"
        )
    load_model(model, str(path / "model.safetensors"))
    return state, by_parameter_name(model, load_tree(path, "optimizer"))


def copy_loss(model: Any, config: TrainConfig, tokenizer: Any, generator: torch.Generator, device) -> torch.Tensor:
    """Cross entropy of repeating ``copy_length`` random (non-special) tokens, on the repeat only."""
    special = set(tokenizer.all_special_ids)
    choices = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    x = choices[torch.randint(len(choices), (config.copy_batch_size, config.copy_length), generator=generator)]
    num_digit_rows = round(config.copy_digit_fraction * config.copy_batch_size)
    if num_digit_rows:
        digits = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")))
        x[:num_digit_rows] = digits[torch.randint(10, (num_digit_rows, config.copy_length), generator=generator)]
    b, n = config.copy_batch_size, config.copy_length
    bos = torch.full((b, 1), tokenizer.bos_token_id)
    if not config.copy_gap:
        ids = torch.cat((bos, x, x), dim=1).to(device)
        logits = model(input_ids=ids).logits[:, n:-1].float()  # predicts the repeat
        return F.cross_entropy(logits.flatten(0, 1), ids[:, n + 1 :].flatten())
    # [BOS, x, g_b random tokens, x, padding]: the repeat starts at a different offset in every row.
    gap_lengths = torch.randint(config.copy_gap + 1, (b, 1), generator=generator)
    width = 1 + 2 * n + config.copy_gap
    ids = torch.cat((bos, x, choices[torch.randint(len(choices), (b, width - 1 - n), generator=generator)]), dim=1)
    repeat = 1 + n + gap_lengths + torch.arange(n)  # [b, n] columns of the repeat
    ids.scatter_(1, repeat, x)
    ids[torch.arange(width) >= repeat[:, -1:] + 1] = tokenizer.pad_token_id
    ids = ids.to(device)
    logits = model(input_ids=ids).logits.float()
    predicted = logits.gather(1, repeat[:, :-1, None].to(device).expand(-1, -1, logits.shape[-1]))
    return F.cross_entropy(predicted.flatten(0, 1), x[:, 1:].flatten().to(device))


def recall_levels(config: TrainConfig) -> int:
    """Number of gap levels above 0 of the competence-driven recall curriculum (``recall_advance_below``)."""
    return max(config.recall_record_gap, 1)


def recall_gaps(config: TrainConfig, progress: float, level: int | None = None) -> tuple[int, int]:
    """``(recall_record_gap, recall_gap)`` at ``progress``: the curriculum stage's if it sets them, else the config's;
    with ``recall_advance_below`` those of gap ``level`` (``0..recall_levels``)."""
    if config.recall_advance_below and level is not None:
        levels = recall_levels(config)
        return round(config.recall_record_gap * level / levels), round(config.recall_gap * level / levels)
    stage = next((s for s in config.curriculum if progress < s["until"]), config.curriculum[-1])
    return stage.get("recall_record_gap", config.recall_record_gap), stage.get("recall_gap", config.recall_gap)


def recall_loss(
    model: Any,
    config: TrainConfig,
    tokenizer: Any,
    generator: torch.Generator,
    device,
    progress: float = 0.0,
    level: int | None = None,
) -> torch.Tensor:
    """Cross entropy of the queried values of dense multi-key recall sequences (see :class:`TrainConfig`)."""
    if config.recall_keys == "keywords":
        return keyword_recall_loss(model, config, tokenizer, generator, device, progress, level)
    special = set(tokenizer.all_special_ids)
    choices = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    b, n, v = config.recall_batch_size, config.recall_pairs, config.recall_value_length
    r, g = recall_gaps(config, progress, level)

    def draw(*shape: int) -> torch.Tensor:
        return choices[torch.randint(len(choices), shape, generator=generator)]

    keys = choices[torch.rand(b, len(choices), generator=generator).argsort(-1)[:, :n]]  # distinct per row
    values = draw(b, n, v)
    order = torch.rand(b, n, generator=generator).argsort(-1)
    query_keys, query_values = keys.gather(1, order), values.gather(1, order[..., None].expand(b, n, v))
    gaps = draw(b, 1, g).expand(b, n, g)
    record_gaps = draw(b, 1, r).expand(b, n, r)
    records = torch.cat((keys[..., None], record_gaps, values), dim=-1).flatten(1)
    queries = torch.cat((query_keys[..., None], gaps, query_values), dim=-1)
    bos = torch.full((b, 1), tokenizer.bos_token_id)
    ids = torch.cat((bos, records, queries.flatten(1)), dim=1).to(device)
    is_value = torch.zeros(n, 1 + g + v, dtype=torch.bool)
    is_value[:, 1 + g :] = True
    target = torch.cat((torch.zeros(1 + records.shape[1], dtype=torch.bool), is_value.flatten()))[1:]
    positions = target.nonzero()[:, 0].to(device)  # index on the host: no device synchronization
    logits = model(input_ids=ids).logits[:, :-1][:, positions].float()
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:][:, positions].flatten())


def keyword_recall_loss(
    model: Any, config: TrainConfig, tokenizer: Any, generator: torch.Generator, device, progress: float, level=None
) -> torch.Tensor:
    """:func:`recall_loss` with needle-like records: key words, digit values, a random gap per record and query.

    Row layout: ``BOS, (key, gap_i, v_1..v_L) x n, (key, gap_j, v_1..v_L) x n`` (queries in shuffled order), right
    padded; the loss is on the queried values.
    """
    vocab = tokenizer.get_vocab()
    keys = torch.tensor([vocab[" " + word] for word in KEY_WORDS])
    spaced_digits = torch.tensor([vocab[" " + d] for d in "0123456789"])
    digits = torch.tensor([vocab[d] for d in "0123456789"])
    key_words = set(KEY_WORDS)
    words = torch.tensor(
        sorted(
            i for piece, i in vocab.items() if piece[:1] == " " and piece[1:].isalpha() and piece[1:] not in key_words
        )
    )
    b, n, v = config.recall_batch_size, config.recall_pairs, config.recall_value_length
    record_gap, query_gap = recall_gaps(config, progress, level)

    def randint(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, shape, generator=generator)

    row_keys = keys[torch.rand(b, len(keys), generator=generator).argsort(-1)[:, :n]]  # distinct per row
    values = torch.cat((spaced_digits[randint(10, b, n, 1)], digits[randint(10, b, n, v - 1)]), dim=-1)
    order = torch.rand(b, n, generator=generator).argsort(-1)
    record_lengths, query_lengths = randint(record_gap + 1, b, n), randint(query_gap + 1, b, n)
    rows: list[list[int]] = []
    targets: list[list[bool]] = []
    for row in range(b):
        ids, target = [tokenizer.bos_token_id], [False]
        for pair in range(n):
            gap = words[randint(len(words), int(record_lengths[row, pair]))].tolist()
            ids += [int(row_keys[row, pair]), *gap, *values[row, pair].tolist()]
        target += [False] * (len(ids) - 1)
        for pair in order[row].tolist():
            gap = words[randint(len(words), int(query_lengths[row, pair]))].tolist()
            ids += [int(row_keys[row, pair]), *gap, *values[row, pair].tolist()]
            target += [False] * (1 + len(gap)) + [True] * v
        rows.append(ids)
        targets.append(target)
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((b, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for row, (ids, target) in enumerate(zip(rows, targets)):
        input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), torch.tensor(target)
    logits = model(input_ids=input_ids.to(device)).logits[:, :-1].float()
    mask, input_ids = mask[:, 1:].to(device), input_ids[:, 1:].to(device)
    return F.cross_entropy(logits[mask], input_ids[mask])


def train(config: TrainConfig) -> dict[str, Any]:
    """Run the recipe; returns the metadata written next to the model (or, when ``session_time_s`` ends this process,
    the metadata of the checkpoint it wrote)."""
    torch.set_num_threads(config.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers fork after the tokenizer was used
    accelerator = build_accelerator(mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    tokenizer = build_tokenizer(extended=config.extended_vocabulary)
    model = build_model(config, tokenizer)
    fused = {"fused": True} if accelerator.device.type == "cuda" else {}  # one kernel per step on a GPU
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay, **fused
    )
    output_dir = Path(config.output_dir)
    if not config.resume and latest_checkpoint(output_dir) is not None:
        raise ValueError(
            f"{output_dir} holds checkpoints of an earlier run ({latest_checkpoint(output_dir).name}); continue it "
            "with --resume auto, or start fresh in another output_dir (a fresh run there would mix its checkpoints "
            "with the old ones)"
        )
    resume_from = latest_checkpoint(output_dir) if config.resume == "auto" else Path(config.resume or ".")
    resumed, resumed_optimizer = (
        load_checkpoint(resume_from, config, model) if config.resume and resume_from else (None, None)
    )
    step = resumed["step"] if resumed else 0
    tokens_seen = resumed["tokens_seen"] if resumed else 0
    history: list[dict[str, Any]] = resumed["history"] if resumed else []
    recall_level = resumed.get("recall_level", 0) if resumed else 0
    recall_window: list[torch.Tensor] = []  # recall losses since the last log step (read back there only)
    progress = Progress(config, shared=config.num_workers > 0)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed_optimizer is not None:  # after prepare: a sharded run takes its own shards of it
        load_optimizer_state(accelerator.unwrap_model(model), optimizer, resumed_optimizer)
        del resumed_optimizer
    processes = accelerator.num_processes

    def whole_model() -> Any:
        """The model on the main process (``None`` elsewhere); every process calls it (FSDP gathers the shards)."""
        return unsharded_model(accelerator, model)

    recent: dict[str, deque[bool]] = {name: deque(maxlen=200) for name in config.tasks}
    pending: list[tuple[list[str], torch.Tensor]] = []  # (tasks, exact) not yet read back (no per-step sync)
    pin = accelerator.device.type == "cuda"
    stopped_by = "max_steps"
    bar = tqdm(
        total=config.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train_tiny", mininterval=5
    )
    session_start = time.time()
    progress.start = session_start - (resumed["elapsed_s"] if resumed else 0.0)
    progress.update(step)
    batches = batch_loader(config, tokenizer, accelerator.process_index, progress, pin, start_step=step)
    last_log = (step, tokens_seen, session_start)  # step, tokens, time
    if resumed and accelerator.is_main_process:
        tqdm.write(json.dumps({"resumed_from": str(resume_from), "step": step}), file=sys.stdout)

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "tokens_seen": tokens_seen,
            "elapsed_s": progress.elapsed(),
            "config": asdict(config),
            "history": history,
            "recall_level": recall_level,
        }

    model.train()
    while step < config.max_steps:
        host = next(batches)
        seed = step_seed(config, accelerator.process_index, step)
        lr = config.learning_rate * lr_factor(step, progress.value, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step += 1
        tasks = host.pop("tasks")
        batch = {k: v.to(accelerator.device, non_blocking=pin) for k, v in host.items()}
        loss, exact, answer_loss = weighted_loss(model(input_ids=batch["input_ids"]).logits, batch)
        total = loss
        copy = recall = None
        if config.copy_loss_weight:
            generator = torch.Generator().manual_seed(seed + 1)
            copy = copy_loss(model, config, tokenizer, generator, accelerator.device)
            total = total + config.copy_loss_weight * copy
        if config.recall_loss_weight:
            generator = torch.Generator().manual_seed(seed + 2)
            recall = recall_loss(model, config, tokenizer, generator, accelerator.device, progress.value, recall_level)
            total = total + config.recall_loss_weight * recall
            recall_window.append(recall.detach())
        accelerator.backward(total)
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        progress.update(step)
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += int(batch["input_ids"].numel())
        pending.append((tasks, exact))
        bar.update(1)
        # clocks differ between processes: any one out of time stops them all at this step
        out_of_time = any_process(bool(config.max_time_s) and progress.elapsed() >= config.max_time_s, accelerator)
        session_over = bool(config.session_time_s) and time.time() - session_start >= config.session_time_s
        end_of_session = any_process(session_over, accelerator)
        if step % config.log_every == 0 or step == config.max_steps or out_of_time or end_of_session:
            for names, flags in pending:
                for name, ok in zip(names, flags.tolist()):
                    recent[name].append(ok)
            pending.clear()
            now = time.time()
            rate = (step - last_log[0]) / max(now - last_log[2], 1e-9)
            row = {
                "step": step,
                "loss": round(loss.item(), 4),
                "answer_loss": round(answer_loss.item(), 4),
                "copy_loss": None if copy is None else round(copy.item(), 4),
                "recall_loss": None if recall is None else round(recall.item(), 4),
                "lr": lr,
                "progress": round(progress.value, 4),
                "length": batch["input_ids"].shape[1],
                "elapsed_s": round(progress.elapsed(), 1),
                "steps_per_s": round(rate, 2),
                "tokens_per_s": round((tokens_seen - last_log[1]) / max(now - last_log[2], 1e-9)),
                "answer_exact": {k: round(sum(v) / len(v), 3) for k, v in recent.items() if v},
            }
            if config.recall_advance_below and recall_window:
                # the mean over processes: every process advances at the same step
                mean_recall = accelerator.reduce(torch.stack(recall_window).mean(), reduction="mean").item()
                row["recall_gaps"] = list(recall_gaps(config, progress.value, recall_level))
                if mean_recall < config.recall_advance_below and recall_level < recall_levels(config):
                    recall_level += 1
            recall_window.clear()
            last_log = (step, tokens_seen, now)
            history.append(row)
            bar.set_postfix(loss=row["loss"])
            if accelerator.is_main_process:
                tqdm.write(json.dumps(row), file=sys.stdout)
                sys.stdout.flush()
        checkpoint_due = config.checkpoint_every and step % config.checkpoint_every == 0
        if checkpoint_due or (end_of_session and not out_of_time):
            states = optimizer_state(accelerator.unwrap_model(model), optimizer)  # every process
            whole = whole_model()
            if accelerator.is_main_process:
                save_checkpoint(whole, states, output_dir, trainer_state(), config.keep_checkpoints, tokenizer)
            del states, whole
            accelerator.wait_for_everyone()
        if config.save_every and step % config.save_every == 0:
            whole = whole_model()
            if accelerator.is_main_process:
                save(whole, tokenizer, output_dir, {"step": step, "partial": True})
            del whole
        if out_of_time:
            stopped_by = "max_time_s"
            break
        if end_of_session and step < config.max_steps:
            bar.close()
            del batches  # stops the DataLoader workers
            accelerator.wait_for_everyone()
            return {**trainer_state(), "stopped_by": "session_time_s"}
    bar.close()
    del batches  # stops the DataLoader workers
    metadata = {
        "config": asdict(config),
        "steps": step,
        "stopped_by": stopped_by,
        "tokens_seen": tokens_seen * processes,
        "distributed": {"type": accelerator.distributed_type.value, "num_processes": processes},
        "wall_time_s": round(progress.elapsed(), 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "command": " ".join(sys.argv),
        "device": str(accelerator.device) + ("" if not pin else f" ({torch.cuda.get_device_name()})"),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "history": history,
    }
    whole = whole_model()
    if accelerator.is_main_process:
        save(whole, tokenizer, output_dir, metadata)
    accelerator.wait_for_everyone()
    return metadata


if __name__ == "__main__":
    train(parse_config())
