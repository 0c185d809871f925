"""Decode-attention kernel benchmark: Triton flash-decoding vs the torch reference vs PyTorch SDPA.

(Not named ``kernels.py``: run as a script, that file would shadow the ``kernels`` package transformers probes.)

    python benchmarks/kernel_speed.py                       # GPU: full sweep; CPU: the torch path on small shapes
    python benchmarks/kernel_speed.py --batch 1 8 --lengths 4096 32768 --out runs/kernels.json

Rows (one new query per sequence, ``Hq=32``, ``Hkv=8``, ``d=128``, bf16 by default):

* ``decode``: :func:`hf_longmem.kernels.decode_attention` (Triton, keys not repeated) vs its torch reference vs
  ``scaled_dot_product_attention(..., enable_gqa=True)``;
* ``channel``: :func:`hf_longmem.kernels.channel_attention` with ThinK keys keeping ``--keep`` of the channels
  (default 0.6) vs full-width SDPA over the unpruned keys;
* ``gdn_fwd`` / ``gdn_fwd_bwd`` (only with ``--gated-delta``: the first call compiles the backward kernels, which
  takes minutes): the gated delta rule over ``n`` tokens (``--gdn-heads`` heads, ``K = V = --gdn-head-dim``), forward
  alone and forward + backward, for the chunked Triton kernel (``triton_chunk``,
  :func:`hf_longmem.kernels.gated_delta.chunk_gated_delta_rule`), the recurrent Triton kernel
  (``triton_recurrent``, :func:`~hf_longmem.kernels.gated_delta.fused_recurrent_gated_delta_rule`) and the chunked
  torch path (``torch_chunk``). Its GB/s counts reading q, k, v and writing o once.

    python benchmarks/kernel_speed.py --gated-delta --batch 1 4 --lengths 4096 16384

Prints a table (median ms, and the effective K/V read bandwidth in GB/s) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_longmem.kernels import channel_attention, decode_attention, triton_available


def _time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bench_shape(batch: int, n: int, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    gen = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(batch, hq, 1, d, device=device, dtype=dtype, generator=gen)
    keys = torch.randn(batch, hkv, n, d, device=device, dtype=dtype, generator=gen)
    values = torch.randn(batch, hkv, n, d, device=device, dtype=dtype, generator=gen)
    d_keep = max(1, round(args.keep * d))
    index = torch.randperm(d, device=device)[:d_keep].sort().values.expand(batch, hkv, d_keep).contiguous()
    keys_pruned = keys.gather(-1, index[:, :, None, :].expand(-1, -1, n, -1)).contiguous()
    elem = torch.finfo(dtype).bits // 8
    full_bytes = 2 * batch * hkv * n * d * elem
    pruned_bytes = batch * hkv * n * (d_keep + d) * elem

    providers = {
        ("decode", "sdpa"): (
            lambda: F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True),
            full_bytes,
        ),
        ("decode", "torch"): (lambda: decode_attention(query, keys, values, scale, backend="torch"), full_bytes),
        ("channel", "sdpa_full_width"): (
            lambda: F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True),
            full_bytes,
        ),
        ("channel", "torch"): (
            lambda: channel_attention(query, keys_pruned, index, values, scale, backend="torch"),
            pruned_bytes,
        ),
    }
    if device.type == "cuda" and triton_available():
        providers[("decode", "triton")] = (
            lambda: decode_attention(query, keys, values, scale, backend="triton"),
            full_bytes,
        )
        providers[("channel", "triton")] = (
            lambda: channel_attention(query, keys_pruned, index, values, scale, backend="triton"),
            pruned_bytes,
        )
        # correctness guard before timing: Triton vs the torch reference
        for op in ("decode", "channel"):
            ref = providers[(op, "torch")][0]()[0].float()
            tri = providers[(op, "triton")][0]()[0].float()
            err = (ref - tri).abs().max().item()
            if err > 2e-2:
                raise AssertionError(f"{op} b={batch} n={n}: Triton differs from the torch reference by {err:.3g}")

    rows = []
    for (op, provider), (fn, nbytes) in providers.items():
        ms = _time_ms(fn, device, args.warmup, args.iters)
        rows.append(
            {
                "op": op,
                "provider": provider,
                "batch": batch,
                "n": n,
                "q_heads": hq,
                "kv_heads": hkv,
                "head_dim": d,
                "d_keep": d_keep if op == "channel" and provider != "sdpa_full_width" else d,
                "dtype": str(dtype).removeprefix("torch."),
                "ms": round(ms, 4),
                "gb_per_s": round(nbytes / ms / 1e6, 1),
            }
        )
    return rows


def _bench_gated_delta(batch: int, n: int, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from hf_longmem.kernels.gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, l2norm

    heads, d = args.gdn_heads, args.gdn_head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    q, k = l2norm(randn(batch, heads, n, d)).to(dtype), l2norm(randn(batch, heads, n, d)).to(dtype)
    v = randn(batch, heads, n, d).to(dtype)
    g, beta = F.logsigmoid(randn(batch, heads, n) + 4).to(dtype), torch.sigmoid(randn(batch, heads, n)).to(dtype)
    do = randn(batch, heads, n, d).to(dtype)
    ops = {"torch_chunk": lambda *x: chunk_gated_delta_rule(*x, backend="torch")}
    if device.type == "cuda" and triton_available():
        ops["triton_chunk"] = lambda *x: chunk_gated_delta_rule(*x, backend="triton")
        ops["triton_recurrent"] = lambda *x: fused_recurrent_gated_delta_rule(*x, backend="triton")
        ref = ops["torch_chunk"](q, k, v, g, beta)[0].float()
        for name in ("triton_chunk", "triton_recurrent"):  # correctness guard before timing, relative to |ref|
            err = ((ops[name](q, k, v, g, beta)[0].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            if err > (1e-4 if dtype == torch.float32 else 3e-2):
                raise AssertionError(f"gated delta {name} b={batch} n={n}: differs from torch by {err:.3g} (relative)")

    def fwd_bwd(op):
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v, g, beta)]
        op(*leaves)[0].backward(do)

    elem = torch.finfo(dtype).bits // 8
    nbytes = 4 * batch * heads * n * d * elem
    rows = []
    for provider, op in ops.items():
        for kind, fn in (("gdn_fwd", lambda op=op: op(q, k, v, g, beta)), ("gdn_fwd_bwd", lambda op=op: fwd_bwd(op))):
            ms = _time_ms(fn, device, args.warmup, args.iters)
            rows.append(
                {
                    "op": kind,
                    "provider": provider,
                    "batch": batch,
                    "n": n,
                    "q_heads": heads,
                    "kv_heads": heads,
                    "head_dim": d,
                    "d_keep": d,
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms": round(ms, 4),
                    "gb_per_s": round(nbytes / ms / 1e6, 1),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (GPU default 1 4 8)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="cache lengths (GPU default 4k..32k)")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--keep", type=float, default=0.6, help="share of key channels ThinK keeps")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--gated-delta", action="store_true", help="also time the gated delta rule kernels")
    parser.add_argument("--gdn-heads", type=int, default=8)
    parser.add_argument("--gdn-head-dim", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernel_speed.json"))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu:
        print("No CUDA device: the Triton kernels need a GPU. Timing the torch paths only, on small shapes.")
    args.batch = args.batch or ([1, 4, 8] if on_gpu else [1])
    args.lengths = args.lengths or ([4096, 8192, 16384, 32768] if on_gpu else [4096])
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    args.iters = args.iters if args.iters is not None else (50 if on_gpu else 3)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))

    rows = []
    for batch in args.batch:
        for n in args.lengths:
            rows += _bench_shape(batch, n, args, device, dtype)
            if args.gated_delta:
                rows += _bench_gated_delta(batch, n, args, device, dtype)

    header = f"{'op':<12} {'provider':<16} {'b':>3} {'n':>6} {'d_keep':>6} {'ms':>9} {'GB/s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['op']:<12} {r['provider']:<16} {r['batch']:>3} {r['n']:>6} {r['d_keep']:>6} {r['ms']:>9.3f} "
            f"{r['gb_per_s']:>8.1f}"
        )
    report = {
        "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "command": " ".join(["python", "benchmarks/kernel_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return rows


def _triton_version() -> str | None:
    if not triton_available():
        return None
    import triton

    return triton.__version__


if __name__ == "__main__":
    main()
