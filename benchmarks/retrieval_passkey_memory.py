"""Pass-key (or multi-key needle) accuracy, prefill time and memory parts of InfLLM / EM-LLM / full cache by length, prompts fed in chunks.

``hf-longmem bench`` feeds each prompt in ONE forward. EM-LLM segments events from the surprise of each execution
block before the next one (the official code asserts chunked input; ``make_cache('emllm', model)`` sets the
model's ``prefill_chunk_size`` so that ``generate`` does this), so in one forward its prompt falls back to fixed
blocks. This script feeds every prompt in chunks of ``--chunk`` tokens (as ``generate(prefill_chunk_size=...)``)
and then decodes greedily, and records per length and cache: accuracy, prefill seconds and the bytes of every
memory part (``memory_parts()``: window, initial tokens, blocks, LRU, representatives, segmentation) with where each
part lives (resident on the compute device / offloaded to CPU).

    python benchmarks/retrieval_passkey_memory.py --lengths 1024,4096,16384 --num-samples 10 \\
        --out benchmarks/results/retrieval_passkey_memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone

import torch

INFLLM = dict(
    n_init=64,
    n_local=256,
    block_size=2,
    topk=128,
    repr_topk=2,
    exc_block_size=64,
    max_cached_blocks=128,
    offload=True,
    offload_representatives=True,
)
EMLLM = dict(
    n_init=64,
    n_local=256,
    n_mem=512,
    min_block_size=1,
    max_block_size=2,
    repr_topk=2,
    exc_block_size=64,
    offload=True,
    offload_representatives=True,
)


def run(model, tokenizer, name: str, options: dict, sample, chunk: int) -> dict:
    from hf_longmem import make_cache
    from hf_longmem.evals.profiling import greedy_generate

    context = tokenizer.encode(sample.context, add_special_tokens=True)
    query = tokenizer.encode(sample.turns[0].query, add_special_tokens=False)
    prompt = torch.tensor([context + query])
    cache = make_cache(name, model, **options)
    start = time.perf_counter()
    with torch.inference_mode():
        fed = (prompt.shape[1] - 1) // chunk * chunk  # the last piece goes with the first decoding step
        for begin in range(0, fed, chunk):
            model(
                input_ids=prompt[:, begin : begin + chunk],
                cache=cache,
                use_cache=True,
                position_ids=torch.arange(begin, begin + chunk)[None],
                logits_to_keep=1,
            )
        out = greedy_generate(
            model,
            prompt[:, fed:],
            cache,
            max_new_tokens=sample.turns[0].max_new_tokens,
            past_length=fed,
            eos_token_id=tokenizer.eos_token_id,
        )
    prefill = time.perf_counter() - start - out.decode_s
    text = tokenizer.decode(out.sequences[0, : out.lengths[0]].tolist(), skip_special_tokens=True).strip()
    if hasattr(cache, "memory_parts"):
        parts = cache.memory_parts()
    else:  # DynamicCache: every key and value, on the compute device
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        parts = {"kv": ("resident", held)}
    if hasattr(cache, "close"):
        cache.close()
    return {
        "correct": float(text.split(" ")[0] == sample.turns[0].answers[0]) if text else 0.0,
        "prefill_s": prefill,
        "kv_bytes": sum(size for _, size in parts.values()),
        "parts": {key: list(value) for key, value in parts.items()},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--caches", default="full,infllm,emllm")
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="passkey", choices=["passkey", "multikey_needle"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hf_longmem.default_model import load_default_model
    from hf_longmem.evals.tasks import generate_task

    model, tokenizer = load_default_model()
    options = {"full": {}, "infllm": INFLLM, "emllm": EMLLM}
    began = time.perf_counter()
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        samples = generate_task(args.task, tokenizer, length, args.num_samples, args.seed)
        for name in args.caches.split(","):
            results = [run(model, tokenizer, name, options[name], sample, args.chunk) for sample in samples]
            parts = {}
            for result in results:
                for key, (where, size) in result["parts"].items():
                    parts.setdefault(key, [where, []])[1].append(size)
            row = {
                "task": args.task,
                "context_length": length,
                "cache": name,
                "cache_kwargs": options[name],
                "num_samples": len(results),
                "accuracy": sum(r["correct"] for r in results) / len(results),
                "prefill_s": sum(r["prefill_s"] for r in results) / len(results),
                "kv_bytes": round(sum(r["kv_bytes"] for r in results) / len(results)),
                "parts": {key: [where, round(sum(s) / len(s))] for key, (where, s) in parts.items()},
            }
            for where in ("resident", "offloaded"):
                row[f"kv_{where}_bytes"] = sum(size for place, size in row["parts"].values() if place == where)
            rows.append(row)
            print(
                json.dumps({k: row[k] for k in ("task", "context_length", "cache", "accuracy", "prefill_s")}),
                flush=True,
            )
    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": {"device": "cpu", "torch_threads": args.threads, "cpu_count": __import__("os").cpu_count()},
        "prefill": f"chunks of {args.chunk} tokens (as generate(prefill_chunk_size={args.chunk}))",
        "wall_time_s": round(time.perf_counter() - began, 1),
    }
    with open(args.out, "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
