"""hf_longmem vs NVIDIA kvpress in ONE process, interleaved run by run: decode speed that background load cannot bias.

``vs_kvpress.py`` runs each side in its own environment and process (kvpress pins an older transformers); on a busy
machine the load at the moment of each run decides the ratio. This script imports kvpress next to hf_longmem
(kvpress 0.5.5 imports and runs under transformers 5.24 when put on ``PYTHONPATH``; its heavy optional dependencies
go in an overlay folder, see below), builds the harness's tiny model twice with the same seed (one copy for kvpress,
whose import patches the SDPA/eager attention functions, one for hf_longmem, whose caches switch the model to the
``hf_longmem`` attention), and then alternates: DynamicCache, kvpress press, hf_longmem cache, again and again.
Each round gives a ratio of two runs taken seconds apart; the table reports the median over rounds.

Timing uses the shared harness's ``run_once`` (prefill, then greedy decoding with the same loop as kvpress's
pipeline). Bytes are ``cache_storage_bytes`` after prefill (every tensor storage reachable from the cache).

On first use the script installs kvpress and the modules it imports (without their dependencies, so our torch and
transformers stay as they are) into an overlay folder, ``.venv-kvpress-overlay`` (``--overlay``), and re-runs itself
with that folder on ``PYTHONPATH``. kvpress 0.5.5 reads the 4.x ``past_key_values``/``cache_position`` attention
kwargs; :func:`alias_cache_kwarg` passes them on kvpress's model copy (nothing else changes).

Example::

    python benchmarks/vs_kvpress_interleaved.py --harness PATH/kvpress_baseline.py --context 2048 --ratio 0.5 \\
        --rounds 11 --out benchmarks/results/vs_kvpress_interleaved.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers  # noqa: F401  (import transformers fully before kvpress patches it: avoids a circular import)

import hf_longmem  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `benchmarks` importable
from benchmarks.vs_kvpress import PAIRS, REPO, add_harness_argument, check_harness  # noqa: E402  (one pairing for both benchmarks)

OVERLAY_PACKAGES = (  # kvpress and what it imports at import time; installed with --no-deps next to our environment
    "kvpress==0.5.5",
    "cachetools",
    "requests",
    "urllib3",
    "certifi",
    "charset_normalizer",
    "idna",
    "datasets",
    "dill",
    "multiprocess",
    "xxhash",
    "pyarrow",
    "fsspec",
    "pandas",
    "python-dateutil",
    "pytz",
    "tzdata",
    "six",
    "fire",
    "termcolor",
)


def load_harness(path: Path):
    spec = importlib.util.spec_from_file_location("kvpress_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvpress_baseline"] = module
    spec.loader.exec_module(module)
    return module


def reexec_with_overlay(overlay: Path) -> None:
    """Installs kvpress into ``overlay`` if needed, then runs this script again with the overlay on PYTHONPATH."""
    if not (overlay / "kvpress").is_dir():
        print(f"installing kvpress into {overlay} (no dependencies: our torch/transformers are used)", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(overlay), "--no-deps", *OVERLAY_PACKAGES],
            check=True,
        )
    if os.environ.get("HF_LONGMEM_KVPRESS_OVERLAY") == str(overlay):
        raise SystemExit(f"kvpress is still not importable with {overlay} on PYTHONPATH")
    path = os.pathsep.join(p for p in (str(overlay), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_LONGMEM_KVPRESS_OVERLAY=str(overlay))
    raise SystemExit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)


def alias_cache_kwarg(model) -> None:
    """kvpress 0.5.5 reads ``past_key_values`` and ``cache_position`` in its attention hooks; transformers 5.x passes
    ``cache=`` and has no ``cache_position``.

    A pre-hook on each attention module passes the same cache object under the old name and the positions of the new
    tokens in the cache (``[seen, seen + q)``, what 4.x passed), so kvpress runs unchanged.
    """

    def pre_hook(module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is not None and "past_key_values" not in kwargs:
            hidden = args[0] if args else kwargs["hidden_states"]
            seen = cache.get_seq_length(module.layer_idx)
            kwargs["past_key_values"] = cache
            kwargs["cache_position"] = torch.arange(seen, seen + hidden.shape[1], device=hidden.device)
        return args, kwargs

    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    add_harness_argument(parser)
    parser.add_argument(
        "--overlay",
        type=Path,
        default=REPO / ".venv-kvpress-overlay",
        help="folder with kvpress and its import-time modules (installed here on first use)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.attn, args.decode_interval = "sdpa", 16
    check_harness(parser, args.harness)
    if importlib.util.find_spec("kvpress") is None:
        reexec_with_overlay(args.overlay)
    if not 0 < args.ratio < 1:
        parser.error("--ratio must be in (0, 1)")

    torch.set_num_threads(args.threads)
    # the harness's `past_key_values=` and the aliases for kvpress are deprecated names: one warning per call otherwise
    warnings.filterwarnings("ignore", category=FutureWarning)
    harness = load_harness(args.harness)
    registry = harness.build_registry("benchmarks.hf_longmem_methods", with_kvpress=True)  # kvpress imported first
    kvpress_model, our_model = harness.build_model(args), harness.build_model(args)
    alias_cache_kwarg(kvpress_model)
    ids = torch.randint(0, args.vocab, (1, args.context), generator=torch.Generator().manual_seed(args.seed))

    def run(name: str, model) -> dict:
        factory = registry[name]
        method = harness._as_method(factory(0.0 if name == "none" else args.ratio, model, args))
        result = harness.run_once(model, method, ids, args.new_tokens, None)
        result.pop("logits")
        return result

    for model in (kvpress_model, our_model):  # warm-up: thread pools, allocator
        harness.run_once(model, harness.Method(), ids[:, :64], 4, None)

    runs: dict[str, list[dict]] = {}
    order = ["none"] + [name for ours in args.methods for name in (PAIRS[ours], ours)]
    started = time.perf_counter()
    for round_index in range(args.rounds):
        for name in order:
            model = our_model if name.startswith("hf_longmem:") else kvpress_model
            runs.setdefault(name, []).append(run(name, model))
        print(f"round {round_index + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    table = []
    for ours in args.methods:
        theirs = PAIRS[ours]
        decode_ratios = [b["ms_per_token"] / a["ms_per_token"] for a, b in zip(runs[ours], runs[theirs])]
        prefill_ratios = [b["prefill_s"] / a["prefill_s"] for a, b in zip(runs[ours], runs[theirs])]
        table.append(
            {
                "hf_longmem": ours,
                "kvpress": theirs,
                "ratio": args.ratio,
                "ms_per_token_ours": med(ours, "ms_per_token"),
                "ms_per_token_kvpress": med(theirs, "ms_per_token"),
                "ms_per_token_dynamic_cache": med("none", "ms_per_token"),
                "decode_speed_ours_over_kvpress": statistics.median(decode_ratios),
                "decode_speed_per_round": decode_ratios,
                "prefill_s_ours": med(ours, "prefill_s"),
                "prefill_s_kvpress": med(theirs, "prefill_s"),
                "prefill_speed_ours_over_kvpress": statistics.median(prefill_ratios),
                "bytes_ours": med(ours, "cache_storage_bytes_after_prefill"),
                "bytes_kvpress": med(theirs, "cache_storage_bytes_after_prefill"),
            }
        )

    mib = 1024 * 1024
    print(
        f"\ncontext={args.context} new_tokens={args.new_tokens} layers={args.layers} hidden={args.hidden} "
        f"heads={args.heads}/{args.kv_heads} dtype={args.dtype} threads={args.threads} rounds={args.rounds}; "
        f"DynamicCache {med('none', 'ms_per_token'):.2f} ms/token (median)\n"
    )
    print(
        "| method | ratio | decode ms/token (ours / kvpress) | decode speed ours/kvpress | prefill s (ours / kvpress) "
        "| KV MiB (ours / kvpress) | bytes ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['hf_longmem'].split(':')[1]} | {r['ratio']} | {r['ms_per_token_ours']:.2f} / "
            f"{r['ms_per_token_kvpress']:.2f} | {r['decode_speed_ours_over_kvpress']:.2f}x | "
            f"{r['prefill_s_ours']:.3f} / {r['prefill_s_kvpress']:.3f} | {r['bytes_ours'] / mib:.2f} / "
            f"{r['bytes_kvpress'] / mib:.2f} | {r['bytes_ours'] / r['bytes_kvpress']:.2f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": table,
            "versions": {
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "kvpress": __import__("importlib.metadata").metadata.version("kvpress"),
            },
        }
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
