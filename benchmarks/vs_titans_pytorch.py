#!/usr/bin/env python
"""Titans neural-memory training step (forward + backward) on CPU: hf_longmem vs titans-pytorch (PyPI), side by side.

titans-pytorch lives in its own venv ``.venv-titans`` (``pip install --no-deps titans-pytorch==0.5.5`` + its pure-python
dependencies, with a ``.pth`` file pointing at our venv's torch); this script runs in our venv and appends that
venv's site-packages to ``sys.path``.

Same configuration on both sides: model width ``dim``, ``heads`` x ``dim_head`` memory heads, a depth-2 MLP memory of
expansion 2, chunk size ``c``, momentum and weight decay, and gradients of each chunk taken at the weights the chunk
starts with (titans-pytorch ``batch_size = chunk_size``, the paper's mini-batch gradient descent). Same input
``[batch, T, dim]``; the loss is the sum of the memory output, so both do a full forward and backward through the
memory update. The two are timed alternately (interleaved repeats, median) in one process with one thread.

    python benchmarks/vs_titans_pytorch.py --repeats 5
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_titans_pytorch():
    for site in glob.glob(str(ROOT / ".venv-titans" / "lib" / "python3*" / "site-packages")):
        if site not in sys.path:
            sys.path.append(site)
    import titans_pytorch
    from titans_pytorch import MemoryMLP, NeuralMemory

    return titans_pytorch, MemoryMLP, NeuralMemory


def build(args):
    from hf_longmem.modeling.titans.cache import TitansLayerState
    from hf_longmem.modeling.titans.configuration_titans import TitansConfig
    from hf_longmem.modeling.titans.layers import NeuralMemory as OurMemory

    titans_pytorch, MemoryMLP, NeuralMemory = _import_titans_pytorch()
    torch.manual_seed(0)
    config = TitansConfig(
        hidden_size=args.dim,
        num_attention_heads=args.heads,
        memory_heads=args.heads,
        memory_head_dim=args.dim_head,
        memory_depth=2,
        memory_expansion=2,
        memory_chunk_size=args.chunk,
        memory_backend="torch",
    )
    ours = OurMemory(config)
    theirs = NeuralMemory(
        dim=args.dim,
        chunk_size=args.chunk,
        batch_size=args.chunk,
        heads=args.heads,
        dim_head=args.dim_head,
        model=MemoryMLP(dim=args.dim_head, depth=2, expansion_factor=2.0),
        momentum=True,
    )
    x = torch.randn(args.batch, args.seq, args.dim)
    lengths = torch.full((args.batch,), args.seq)

    def step_ours():
        out = ours(x, lengths, TitansLayerState())
        out.sum().backward()

    def step_theirs():
        out, _ = theirs(x)
        out.sum().backward()

    info = {
        "hf_longmem_params": sum(p.numel() for p in ours.parameters()),
        "titans_pytorch_params": sum(p.numel() for p in theirs.parameters()),
        "titans_pytorch_version": getattr(titans_pytorch, "__version__", None) or _dist_version("titans-pytorch"),
    }
    return step_ours, step_theirs, info


def _dist_version(name):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        for site in glob.glob(str(ROOT / ".venv-titans" / "lib" / "python3*" / "site-packages")):
            for meta in glob.glob(os.path.join(site, "titans_pytorch-*.dist-info")):
                return meta.rsplit("-", 1)[0].split("titans_pytorch-")[-1].replace(".dist", "")
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim_head", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "vs_titans_pytorch.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    step_ours, step_theirs, info = build(args)
    for step in (step_ours, step_theirs):  # warm-up
        step()
    times = {"hf_longmem": [], "titans_pytorch": []}
    for _ in range(args.repeats):
        for name, step in (("hf_longmem", step_ours), ("titans_pytorch", step_theirs)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": vars(args) | {"output": str(args.output)},
        "median_s": median,
        "times_s": times,
        "speedup_vs_titans_pytorch": median["titans_pytorch"] / median["hf_longmem"],
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **info,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(temporary, args.output)
    print(
        f"train step fwd+bwd, B{args.batch} T{args.seq} dim{args.dim} H{args.heads}x{args.dim_head} chunk{args.chunk}, "
        f"{args.threads} thread(s): hf_longmem {median['hf_longmem'] * 1e3:.1f} ms, titans-pytorch "
        f"{median['titans_pytorch'] * 1e3:.1f} ms -> {result['speedup_vs_titans_pytorch']:.2f}x"
    )
    return result


if __name__ == "__main__":
    main()
