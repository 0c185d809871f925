"""hf_longmem vs NVIDIA kvpress on the same tiny model, prompt and compression ratio, side by side.

kvpress pins an older transformers, so it runs from its own virtualenv (created on first use: torch==2.13.0 CPU +
kvpress from PyPI). Both sides are measured by the shared harness ``kvpress_baseline.py`` (one fresh process per
configuration, cold run for memory, warm run for timing), alternating between the two environments repeat after
repeat so that background load hits both alike. Each pair is reported as medians with the ratio hf_longmem/kvpress.

KV bytes are ``cache_storage_bytes``: every tensor storage reachable from the cache object after prefill (kvpress's
head-wise presses keep masked keys in place, so their key/value tensors are not smaller).

Example::

    python benchmarks/vs_kvpress.py --harness PATH/kvpress_baseline.py --ratios 0.5 0.75 --runs 3 \\
        --out benchmarks/results/vs_kvpress.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HARNESS_HELP = (
    "path of the kvpress baseline harness `kvpress_baseline.py` (not part of this repository): the script that "
    "builds the tiny model, runs each method and measures it (`build_registry`, `build_model`, `run_once`, "
    "`--plugin`); both sides are measured by it"
)


def add_harness_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--harness", type=Path, required=True, help=HARNESS_HELP)


def check_harness(parser: argparse.ArgumentParser, path: Path) -> None:
    """A clear error, before any work, when ``--harness`` is not a file."""
    if not path.is_file():
        parser.error(f"--harness {path} is not a file; pass the {HARNESS_HELP}")


PAIRS = {  # hf_longmem method -> kvpress press
    "hf_longmem:snapkv": "kvpress:snapkv",
    "hf_longmem:think": "kvpress:think",
    "hf_longmem:duo_attention": "kvpress:duo_attention",
    "hf_longmem:streaming": "kvpress:streaming_llm",
}
MODEL_ARGS = ("context", "new_tokens", "layers", "hidden", "heads", "kv_heads", "threads", "dtype")


def ensure_kvpress_venv(path: Path, kvpress_version: str) -> Path:
    """The kvpress environment's python, creating the venv on first use."""
    python = path / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {path} (torch==2.13.0, kvpress{kvpress_version})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"kvpress{kvpress_version}"], check=True)
    return python


def run_harness(python: Path, harness: Path, methods: list[str], args, plugin: str | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [str(python), str(harness), "--methods", *methods, "--ratios", *map(str, args.ratios), "--runs", "1"]
        cmd += ["--out", str(out), "--max-bg-load", str(args.max_bg_load)]
        for key in MODEL_ARGS:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        if plugin:
            cmd += ["--plugin", plugin]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"harness failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())["rows"]


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.75])
    parser.add_argument("--runs", type=int, default=3, help="repeats, alternating the two environments")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-bg-load", type=float, default=0.5)
    add_harness_argument(parser)
    parser.add_argument("--kvpress-venv", type=Path, default=REPO / ".venv-kvpress")
    parser.add_argument("--kvpress-version", default="==0.5.5")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    check_harness(parser, args.harness)

    kvpress_python = ensure_kvpress_venv(args.kvpress_venv, args.kvpress_version)
    ours, theirs = {}, {}
    for rep in range(args.runs):
        print(f"repeat {rep + 1}/{args.runs}", file=sys.stderr)
        for row in run_harness(kvpress_python, args.harness, [PAIRS[m] for m in args.methods], args, None):
            theirs.setdefault((row["method"], row["ratio"]), []).append(row)
        for row in run_harness(Path(sys.executable), args.harness, args.methods, args, "benchmarks.hf_longmem_methods"):
            ours.setdefault((row["method"], row["ratio"]), []).append(row)

    table = []
    for method in args.methods:
        for ratio in args.ratios:
            a, b = ours.get((method, ratio), []), theirs.get((PAIRS[method], ratio), [])
            row = {"hf_longmem": method, "kvpress": PAIRS[method], "ratio": ratio}
            for key in ("prefill_s", "decode_tok_s", "cache_storage_bytes_after_prefill", "token_agreement", "mean_kl"):
                row[f"{key}_ours"], row[f"{key}_kvpress"] = median(a, key), median(b, key)
            row["errors"] = [r["error"] for r in a + b if "error" in r]
            table.append(row)
    reference = {
        "ours": median(ours.get(("none", 0.0), []), "decode_tok_s"),
        "kvpress": median(theirs.get(("none", 0.0), []), "decode_tok_s"),
    }

    mib = 1024 * 1024
    print(
        f"\ncontext={args.context} new_tokens={args.new_tokens} layers={args.layers} hidden={args.hidden} "
        f"heads={args.heads}/{args.kv_heads} dtype={args.dtype} threads={args.threads} runs={args.runs} (medians)"
    )
    print(
        f"uncompressed DynamicCache decode tok/s: hf_longmem env {reference['ours']:.1f}, "
        f"kvpress env {reference['kvpress']:.1f}\n"
    )
    print(
        "| method | ratio | prefill s (ours / kvpress) | decode tok/s (ours / kvpress) | decode ratio | "
        "KV MiB (ours / kvpress) | bytes ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in table:
        if r["errors"]:
            print(f"| {r['hf_longmem']} | {r['ratio']} | error: {r['errors'][0][:100]} |||||")
            continue
        print(
            f"| {r['hf_longmem'].split(':')[1]} | {r['ratio']} | {r['prefill_s_ours']:.3f} / {r['prefill_s_kvpress']:.3f} | "
            f"{r['decode_tok_s_ours']:.1f} / {r['decode_tok_s_kvpress']:.1f} | "
            f"{r['decode_tok_s_ours'] / r['decode_tok_s_kvpress']:.2f}x | "
            f"{r['cache_storage_bytes_after_prefill_ours'] / mib:.2f} / {r['cache_storage_bytes_after_prefill_kvpress'] / mib:.2f} | "
            f"{r['cache_storage_bytes_after_prefill_ours'] / r['cache_storage_bytes_after_prefill_kvpress']:.2f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "reference": reference, "rows": table}, indent=1
            )
        )
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
