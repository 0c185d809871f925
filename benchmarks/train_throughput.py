#!/usr/bin/env python
"""Training throughput of the embedded-model recipe on this machine: model steps and data generation, in tokens/s.

    python benchmarks/train_throughput.py --config recipes/configs/train_tiny_v4.yaml --threads 2

Model: forward + backward + AdamW of the config's Llama on random ids, ``tokens_per_batch`` tokens per step, at each
``--lengths`` (median of ``--steps`` steps after one warm-up). Data: tokens per second of the recipe's task mixture
(``hf_longmem.evals.mixture.TaskMixture``, the text generators and the closed tokenizer) in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import train_tiny  # noqa: E402

from hf_longmem.evals.mixture import TaskMixture  # noqa: E402


def model_tokens_per_s(config, tokenizer, length: int, steps: int) -> float:
    model = train_tiny.build_model(config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(4, len(tokenizer), (max(1, config.tokens_per_batch // length), length))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


def data_tokens_per_s(config, tokenizer, length: int, min_tokens: int) -> float:
    mixture = TaskMixture(tokenizer, config.tasks, config.task_options, seed=0)
    start, tokens = time.perf_counter(), 0
    while tokens < min_tokens:
        tokens += len(mixture.sample(length).input_ids)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/configs/train_tiny_v4.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = train_tiny.parse_config(["--config", args.config])
    tokenizer = train_tiny.build_tokenizer(extended=config.extended_vocabulary)
    rows = []
    for length in args.lengths:
        rows.append(
            {
                "length": length,
                "threads": args.threads,
                "model_tokens_per_s": round(model_tokens_per_s(config, tokenizer, length, args.steps)),
                "data_tokens_per_s": round(data_tokens_per_s(config, tokenizer, length, 4 * config.tokens_per_batch)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
