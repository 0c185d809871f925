"""Replay: a reservoir buffer, the fixed-fraction replay of continual pre-training, and view-batch replay.

- :class:`ReservoirBuffer`: Vitter's algorithm R over the stream of training rows (uniform sample of everything
  seen, bounded size), with its own checkpointed RNG.
- :class:`Replay`: replaces a fixed fraction of every batch by earlier data (Ibrahim et al. 2024: 5% replay for a
  weak distribution shift, 25% for a strong one). The fraction is exact over time: at global step ``s`` the batch of
  ``B`` rows holds ``floor((s + 1) r B) - floor(s r B)`` replayed rows. Sources: ``"all"`` (any example of any earlier
  task, as in the paper, which replays the earlier datasets) or ``"reservoir"`` (a bounded reservoir buffer).
- :class:`ViewBatchReplay`: "Do Your Best and Get Enough Rest for Continual Learning" (Kim et al., CVPR 2025,
  arXiv 2503.18371): each drawn example is repeated ``num_views`` times in the same batch, so a batch holds
  ``B / num_views`` unique examples and an example's recall interval grows ``num_views``-fold at the same number of
  iterations. For text, the views are token-dropout views (``view_dropout``): each repeat replaces a random
  fraction of its prompt tokens (never BOS, never the answer) by the pad token — the data-augmentation role the
  paper's image views play.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .base import Row, Strategy, check_number, register_strategy

__all__ = ["Replay", "ReservoirBuffer", "ViewBatchReplay"]


class ReservoirBuffer:
    """Uniform bounded sample of a stream (algorithm R).

    Args:
        capacity: maximum number of items.
        seed: seed of the buffer's own generator (its state is part of :meth:`state_dict`).
    """

    def __init__(self, capacity: int, seed: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.items: list[Any] = []
        self.num_seen = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: Any) -> None:
        """Offer one item: kept with probability ``capacity / num_seen`` (always while the buffer is not full)."""
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            j = int(self.rng.integers(0, self.num_seen + 1))
            if j < self.capacity:
                self.items[j] = item
        self.num_seen += 1

    def sample(self, n: int, rng: np.random.Generator) -> list[Any]:
        """``n`` items drawn uniformly with ``rng`` (without replacement when possible)."""
        if not self.items or n <= 0:
            return []
        replace = n > len(self.items)
        return [self.items[i] for i in rng.choice(len(self.items), size=n, replace=replace)]

    def state_dict(self) -> dict[str, Any]:
        return {"items": list(self.items), "num_seen": self.num_seen, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = [tuple(i) if isinstance(i, list) else i for i in state["items"]]
        self.num_seen = int(state["num_seen"])
        self.rng.bit_generator.state = state["rng"]


def replay_count(step: int, ratio: float, batch_size: int) -> int:
    """Replayed rows at global step ``step`` so that the running fraction is exactly ``ratio``."""
    return math.floor((step + 1) * ratio * batch_size + 1e-9) - math.floor(step * ratio * batch_size + 1e-9)


@register_strategy
class Replay(Strategy):
    """Replace a fraction ``ratio`` of each batch's rows by replayed earlier rows.

    Args:
        ratio: replayed fraction of the training rows, in ``[0, 1)`` (paper: 0.05 or 0.25).
        source: ``"all"`` (uniform over all examples of all earlier tasks) or ``"reservoir"``.
        buffer_size: capacity of the reservoir (``source="reservoir"``).
        seed: seed of the replay draws (combined with the global step, so draws are resumable).
    """

    name = "replay"

    def __init__(self, ratio: float = 0.05, source: str = "all", buffer_size: int = 200, seed: int = 0):
        self.ratio = check_number("ratio", ratio, low=0.0, high=1.0)
        if ratio >= 1:
            raise ValueError(f"ratio must be < 1, got {ratio!r}")
        if source not in ("all", "reservoir"):
            raise ValueError(f"source must be 'all' or 'reservoir', got {source!r}")
        self.source = source
        self.buffer = ReservoirBuffer(buffer_size, seed=seed)
        self.seed = seed

    def select_rows(self, rows: list[Row]) -> list[Row]:
        task = self.trainer.task_index
        if task == 0 or self.ratio == 0:
            return rows
        step = self.trainer.global_step
        new = [r for r in rows if r[2] == 0]
        n = min(replay_count(step, self.ratio, len(new)), len(new))
        if n == 0:
            return rows
        rng = np.random.default_rng([self.seed, 7, step])
        if self.source == "all":
            sizes = [len(self.trainer.tasks[t].examples) for t in range(task)]
            flat = rng.choice(sum(sizes), size=n, replace=sum(sizes) < n)
            offsets = np.cumsum([0, *sizes])
            old = []
            for f in flat:
                t = int(np.searchsorted(offsets, f, side="right") - 1)
                old.append((t, int(f - offsets[t]), 0))
        else:
            old = [(t, i, 0) for t, i, *_ in self.buffer.sample(n, rng) if t < task]
            n = len(old)
        # replace the last n new rows (the batch's other rows are a uniform draw, so which ones does not matter)
        return new[: len(new) - n] + old + [r for r in rows if r[2] != 0]

    def after_step(self, rows: list[Row]) -> None:
        if self.source == "reservoir":
            for t, i, group in rows:
                if group == 0 and t == self.trainer.task_index:
                    self.buffer.add((t, i))

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])


@register_strategy
class ViewBatchReplay(Strategy):
    """View-batch replay: ``num_views`` repeats of each drawn example in one batch (recall interval x ``num_views``).

    The trainer's batch of ``B`` rows becomes ``B / num_views`` unique rows, each repeated ``num_views`` times
    (``repeat_interleave``, as the reference sampler does). Over a task the model thus sees every example
    ``num_views`` times per visit and visits it ``num_views`` times less often, at the same iteration count.

    Args:
        num_views: repeats per example (the paper's README uses 4); must divide the per-process batch size.
        view_dropout: fraction of each repeat's prompt tokens replaced by the pad token (views 1..r-1; view 0 is
            the clean example).
        seed: seed of the view noise.
    """

    name = "view_batch"

    def __init__(self, num_views: int = 4, view_dropout: float = 0.1, seed: int = 0):
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be a positive integer, got {num_views!r}")
        self.num_views = num_views
        self.view_dropout = check_number("view_dropout", view_dropout, low=0.0, high=1.0)
        self.seed = seed

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if trainer.config.batch_size % self.num_views:
            raise ValueError(f"num_views={self.num_views} must divide batch_size={trainer.config.batch_size}")

    def select_rows(self, rows: list[Row]) -> list[Row]:
        new = [r for r in rows if r[2] == 0]
        unique = new[: len(new) // self.num_views]
        return [r for r in unique for _ in range(self.num_views)] + [r for r in rows if r[2] != 0]

    def before_forward(self, batch: dict[str, torch.Tensor]) -> None:
        if self.view_dropout == 0 or self.num_views == 1:
            return
        ids, labels = batch["input_ids"], batch["labels"]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.trainer.global_step)
        prompt = (batch["answer_mask"].cumsum(1) == 0) & (batch["attention_mask"] > 0)
        prompt[:, 0] = False  # keep BOS
        view = torch.arange(ids.shape[0]) % self.num_views != 0
        drop = (
            (torch.rand(ids.shape, generator=gen) < self.view_dropout).to(ids.device)
            & prompt
            & view[:, None].to(ids.device)
        )
        ids.masked_fill_(drop, self.trainer.pad_token_id)
        labels.masked_fill_(drop, -100)
