"""Decode milliseconds per token of every cache at long context on a GPU (issue 20), one row per (context, batch, cache).

A random model of Llama-3.2-1B's shape in bfloat16; for each context (16k, 32k) and batch (1, 8), a random prompt is
generated from greedily with: transformers' DynamicCache (eager), StaticCache (``generate`` compiles the decode step
of a compileable cache on CUDA), every registered hf_longmem cache eager (``disable_compile=True``) and compiled with
its static layout (``static=True``, where the method has one and it is ``is_compileable``), and kvpress's presses of
the same methods when kvpress is installed.
Rows are written as they finish; a ``--deadline`` (seconds) skips what is left, so a time limit keeps the rows done.

    python benchmarks/gpu_decode.py --out runs/gpu_decode.json                   # on the GPU (gpu_decode.sh OUT)
    python benchmarks/gpu_decode.py --smoke --out runs/gpu_decode_smoke.json     # CPU dry run, tiny sizes

Reported: ``decode_ms`` (median step after the first ``--skip`` steps, which include compilation), ``prefill_s``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` imports
import hf_longmem  # noqa: E402
from benchmarks.gpu_check import StepClock, _sync, cache_options, random_llama
from hf_longmem.files import atomic_write_text

#: kvpress presses of the same methods (class name, hf_longmem name), when kvpress is importable.
KVPRESS = {"snapkv": "SnapKVPress", "streaming": "StreamingLLMPress", "think": "ThinKPress", "kvmerger": None}

ONE_B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000)
SMOKE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=97)


def timed(model, ids, cache, new_tokens: int, skip: int, device, press=None, compiled: bool = False) -> dict:
    """Greedy generation of ``new_tokens + skip`` tokens; decode ms per token over the last ``new_tokens`` steps."""
    clock = StepClock(device)
    kwargs: dict[str, Any] = {} if compiled else {"disable_compile": True}
    if cache is not None:
        kwargs["cache"] = cache
        kwargs.update(getattr(cache, "generate_kwargs", {}))  # EM-LLM: prompts fed in execution blocks
    _sync(device)
    start = time.perf_counter()
    context = press(model) if press is not None else _null()
    with torch.no_grad(), context:
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens + skip + 1,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=[clock],
            **kwargs,
        )
    steps = [1e3 * (b - a) for a, b in zip(clock.times, clock.times[1:])][skip:]
    return {"prefill_s": round(clock.times[0] - start, 4), "decode_ms": round(statistics.median(steps), 3)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def kvpress_press(name: str, ratio: float):
    """kvpress's press for hf_longmem method ``name`` (``None`` if kvpress or the press is missing)."""
    class_name = KVPRESS.get(name)
    if class_name is None:
        return None
    try:
        import kvpress
    except ImportError:
        return None
    cls = getattr(kvpress, class_name, None)
    if cls is None:
        return None
    if name == "think":
        return cls(key_channel_compression_ratio=ratio)
    return cls(compression_ratio=ratio)


def entries(model, context: int, new_tokens: int, budget: int, caches: list[str]):
    """``(label, make_cache, compiled, press)`` of every row of one (context, batch)."""
    yield "dynamic", lambda: DynamicCache(config=model.config), False, None
    yield (
        "static_compiled",
        lambda: StaticCache(config=model.config, max_cache_len=context + new_tokens + 64),
        True,
        None,
    )
    for name in caches:
        options = cache_options(name, budget, model)
        make = lambda name=name, options=options: hf_longmem.make_cache(name, model, **options)  # noqa: E731
        yield name, make, False, None
        # compiled: the static layout where the method has one (static=True), else the cache as it is if compileable
        params = inspect.signature(hf_longmem.get_cache_spec(name).cls.__init__).parameters
        static = dict(options, static=True) if "static" in params else options
        if "max_new_tokens" in params and "static" in static:
            static["max_new_tokens"] = new_tokens + 64  # more than any run here decodes
        make_static = lambda name=name, options=static: hf_longmem.make_cache(name, model, **options)  # noqa: E731
        if make_static().is_compileable:  # an instance's: transformers' Cache.is_compileable asks every layer
            yield f"{name}_compiled", make_static, True, None
        press = kvpress_press(name, 1 - budget / context)
        if press is not None:
            yield f"kvpress_{name}", lambda: None, False, press


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", nargs="*", type=int, default=[16384, 32768])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip", type=int, default=4, help="first decode steps not timed (compilation, warm-up)")
    parser.add_argument("--caches", nargs="*", help="registered names (default: every one but 'full')")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds; rows after it are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (a dry run of the script)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = SMOKE if args.smoke else ONE_B
    caches = args.caches or [n for n in hf_longmem.available_caches() if n != "full"]
    model = random_llama(device, dtype, max_positions=max(131072, 2 * max(args.contexts)), **size)
    rows: list[dict] = []
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": size,
        "dtype": str(dtype),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    # batch 1 of every context first: what matters most is done first if the deadline cuts the run
    for batch in args.batches:
        for context in args.contexts:
            generator = torch.Generator().manual_seed(context + batch)
            ids = torch.randint(3, size["vocab"], (batch, context), generator=generator).to(device)
            for label, make, compiled, press in entries(model, context, args.new_tokens, args.budget, caches):
                row: dict[str, Any] = {"context": context, "batch": batch, "cache": label, "budget": args.budget}
                if time.perf_counter() - start > args.deadline:
                    row["skipped"] = "deadline"
                else:
                    try:
                        row.update(timed(model, ids, make(), args.new_tokens, args.skip, device, press, compiled))
                    except Exception as error:  # a row that fails is reported, the others still run
                        row["error"] = f"{type(error).__name__}: {error}"
                        row["traceback"] = traceback.format_exc(limit=4)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), file=sys.stderr, flush=True)
                atomic_write_text(args.out, json.dumps({**meta, "rows": rows}, indent=1))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    """Markdown: one line per cache, one column per (context, batch), decode ms/token and the ratio to DynamicCache."""
    settings = sorted({(r["context"], r["batch"]) for r in rows}, key=lambda s: (s[1], s[0]))
    base = {(r["context"], r["batch"]): r.get("decode_ms") for r in rows if r["cache"] == "dynamic"}
    labels = list(dict.fromkeys(r["cache"] for r in rows))
    cells = {(r["cache"], r["context"], r["batch"]): r for r in rows}
    lines = [
        "| cache | "
        + " | ".join(f"{c // 1024 if c >= 1024 else c}{'k' if c >= 1024 else ''}, batch {b}" for c, b in settings)
        + " |",
        "|---|" + "---:|" * len(settings),
    ]
    for label in labels:
        out = []
        for context, batch in settings:
            r = cells.get((label, context, batch), {})
            ms, ref = r.get("decode_ms"), base.get((context, batch))
            if ms is None:
                out.append(r.get("skipped") or ("error" if "error" in r else ""))
            else:
                out.append(f"{ms:.2f} ms ({ref / ms:.2f}x)" if ref else f"{ms:.2f} ms")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
