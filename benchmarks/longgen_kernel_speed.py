"""LongGen sparse attention speed: the Triton block-sparse kernel vs the torch mask-based reference vs full causal SDPA.

Training-shaped calls (``q = n`` tokens, positions ``0..n-1``), forward alone and forward + backward, for both
patterns (``sink_window``: sinks 4 + window 256; ``block_sparse``: blocks 64, 4 local, stride 8). On a GPU (bf16,
``Hq=32``, ``Hkv=8``, ``d=128`` by default) all three run; on CPU only the torch paths, on small shapes. Prints median
milliseconds and writes JSON. Not run on a GPU yet (no device in the session that wrote it).

    python benchmarks/longgen_kernel_speed.py                              # GPU: 4k, 16k; CPU: 1k, 2k
    python benchmarks/longgen_kernel_speed.py --lengths 4096 16384 32768 --out runs/longgen_kernel_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import _time_ms  # noqa: E402  (same timing as the decode-kernel benchmark)

from hf_longmem.kernels import sparse_attention, triton_available  # noqa: E402
from hf_longmem.kernels.sparse_attention import SparsePattern  # noqa: E402

PATTERNS = {
    "sink_window": SparsePattern("sink_window", sink_size=4, window=256),
    "block_sparse": SparsePattern("block_sparse", block_size=64, local_blocks=4, vertical_stride=8),
}


def bench(n: int, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype).requires_grad_()

    q = tensor(1, args.q_heads, n, args.head_dim)
    k, v = tensor(1, args.kv_heads, n, args.head_dim), tensor(1, args.kv_heads, n, args.head_dim)
    positions = torch.arange(n, device=device)[None]
    scaling = args.head_dim**-0.5
    calls = {"sdpa_full_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    backends = ["torch"] + (["triton"] if device.type == "cuda" and triton_available() else [])
    for name, pattern in PATTERNS.items():
        for backend in backends:
            calls[f"{name}_{backend}"] = lambda p=pattern, b=backend: sparse_attention(
                q, k, v, positions, positions, scaling, p, backend=b
            )[0]
    rows = []
    for label, call in calls.items():
        forward = _time_ms(call, device, args.warmup, args.iters)
        backward = _time_ms(lambda c=call: c().float().sum().backward(), device, args.warmup, args.iters)
        rows.append({"call": label, "n": n, "forward_ms": round(forward, 3), "forward_backward_ms": round(backward, 3)})
        print(f"| {label} | {n} | {forward:.3f} | {backward:.3f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384] if cuda else [1024, 2048])
    parser.add_argument("--q_heads", type=int, default=32 if cuda else 4)
    parser.add_argument("--kv_heads", type=int, default=8 if cuda else 2)
    parser.add_argument("--head_dim", type=int, default=128 if cuda else 32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    print("| call | n | forward ms | forward + backward ms |\n|---|---|---|---|")
    rows = [row for n in args.lengths for row in bench(n, args, device, dtype)]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": str(device), "dtype": str(dtype), "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
