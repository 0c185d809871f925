"""KV bytes LongGen's cache holds vs the base model's full cache, on the embedded model.

Converts ``tiny-longmem`` (4 layers) with ``--full_layers`` (default the middle two: half of the layers sparse), then
prefills ``--lengths`` random tokens (bytes do not depend on them) into a ``LongGenCache`` and into the base model's
``DynamicCache`` and prints their KV bytes (and LongGen's bytes with its slot positions) for each sparse pattern.

    python benchmarks/longgen_kv_bytes.py                        # sink_window (window 256) and block_sparse, 4k
    python benchmarks/longgen_kv_bytes.py --lengths 2048 4096 8192 --out benchmarks/results/longgen_kv_bytes.json

Issue 23's criterion: half the layers sparse with window 256 store <= 0.55x the full cache's KV bytes at 4k.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from hf_longmem.default_model import DEFAULT_MODEL_PATH
from hf_longmem.modeling.longgen import LongGenCache, LongGenForCausalLM

PATTERNS = {
    "sink_window": dict(sparse="sink_window", sink_size=4, window=256),
    "block_sparse": dict(sparse="block_sparse", block_size=64, local_blocks=4, vertical_stride=8),
}


def measure(base, full_layers: list[int], length: int) -> list[dict]:
    ids = torch.randint(4, base.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    full = DynamicCache(config=base.config)
    with torch.no_grad():
        base(ids, cache=full, logits_to_keep=1)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    rows = []
    for name, kwargs in PATTERNS.items():
        model = LongGenForCausalLM.from_pretrained_base(base, full_layers=full_layers, **kwargs)
        cache = LongGenCache(model.config)
        with torch.no_grad():
            model(ids, cache=cache, logits_to_keep=1)
        stored = [
            layer.stored_length() if hasattr(layer, "stored_length") else layer.keys.shape[-2] for layer in cache.layers
        ]
        rows.append(
            {
                "pattern": name,
                **kwargs,
                "full_layers": full_layers,
                "length": length,
                "stored_tokens_per_layer": stored,
                "full_kv_bytes": full_bytes,
                "longgen_kv_bytes": cache.kv_bytes(),
                "longgen_memory_bytes": cache.memory_bytes(),
                "kv_ratio": round(cache.kv_bytes() / full_bytes, 4),
                "memory_ratio": round(cache.memory_bytes() / full_bytes, 4),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--full_layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_PATH, dtype=torch.float32).eval()
    rows = [row for length in args.lengths for row in measure(base, args.full_layers, length)]
    print("| pattern | length | stored tokens per layer | full KV bytes | LongGen KV bytes | ratio | with positions |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pattern']} | {r['length']} | {r['stored_tokens_per_layer']} | {r['full_kv_bytes']:,} | "
            f"{r['longgen_kv_bytes']:,} | {r['kv_ratio']} | {r['memory_ratio']} |"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
