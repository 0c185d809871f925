"""The architecture x cache matrix of issue 15: every decoder architecture of the installed transformers x every
registered cache x the checks of the rule (``tests/helpers/architecture_rule.py``).

Writes ``benchmarks/results/architecture_matrix.json`` (every check's verdict per cell, the skipped architectures with
their reasons, timings) and the support table ``docs/support.md`` (architecture x cache: ✓ / refused with the reason /
✗ FAIL with what, and pass / refused / fail counts per cache).

    HF_HUB_OFFLINE=1 python benchmarks/architecture_matrix.py                    # the complete matrix
    python benchmarks/architecture_matrix.py --archs llama,gemma2 --caches snapkv --checks ac
    python benchmarks/architecture_matrix.py --resume                          # keep the cells already in --out

Run from the repository root (it imports ``tests.helpers``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402

import hf_longmem  # noqa: E402
from tests.helpers.architecture_rule import CHECK_NAMES, CHECKS, Case, cell_verdict, run_check  # noqa: E402
from tests.helpers.architectures import HARD_FEATURES, architecture_names, build_skip_reason  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "architecture_matrix.json"
DEFAULT_TABLE = ROOT / "docs" / "support.md"


def matrix_rows(archs: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """``(rows, skipped)``: the buildable architectures + hard-feature variants, and ``{model_type: reason}``."""
    names = architecture_names()
    wanted = archs or names + list(HARD_FEATURES)
    rows, skipped = [], {}
    for name in tqdm(wanted, desc="building architectures", unit="arch"):
        if name in HARD_FEATURES:
            rows.append(name)
            continue
        if name not in names:
            raise SystemExit(f"unknown architecture {name!r}")
        reason = build_skip_reason(name)
        if reason is None:
            rows.append(name)
        else:
            skipped[name] = reason
    return rows, skipped


def run_matrix(
    rows, caches, checks, results: dict, out: Path, skipped: dict, meta: dict, recheck: bool = False
) -> None:
    """Fills ``results[arch][cache] = {"checks": {check: verdict}, "verdict": ..., "seconds": ...}``, saving as it goes.

    Cells that already hold every check are kept unless ``recheck`` (then ``checks`` run again, the others stay)."""
    todo = [(arch, cache) for arch in rows for cache in caches if recheck or not _done(results, arch, cache, checks)]
    bar = tqdm(total=len(todo), desc="matrix", unit="cell")
    for arch in rows:
        cells = [cache for cache in caches if (arch, cache) in set(todo)]
        if not cells:
            continue
        case = Case(arch)
        try:
            case.prepare(checks)
        except Exception as error:  # noqa: BLE001 - the DynamicCache references themselves fail: report every cell
            for cache in cells:
                verdicts = {check: f"FAIL: reference run failed: {type(error).__name__}: {error}" for check in checks}
                results.setdefault(arch, {})[cache] = {
                    "checks": verdicts,
                    "verdict": cell_verdict(verdicts),
                    "seconds": 0.0,
                }
                bar.update(1)
            continue
        for cache in cells:
            bar.set_postfix_str(f"{arch} x {cache}")
            start = time.perf_counter()
            verdicts = dict(results.get(arch, {}).get(cache, {}).get("checks", {}))
            for check in checks:
                verdicts[check] = run_check(case, cache, check)
            results.setdefault(arch, {})[cache] = {
                "checks": verdicts,
                "verdict": cell_verdict(verdicts),
                "seconds": round(time.perf_counter() - start, 2),
            }
            bar.update(1)
        save(out, results, skipped, meta)
        del case
        gc.collect()  # once per architecture (a collection costs about a second with transformers loaded)
    bar.close()


def _done(results, arch, cache, checks) -> bool:
    cell = results.get(arch, {}).get(cache)
    return bool(cell) and all(check in cell["checks"] for check in checks)


def save(out: Path, results: dict, skipped: dict, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "skipped": skipped, "results": results}, indent=1, ensure_ascii=False))
    tmp.replace(out)


def counts(results: dict, caches: list[str]) -> dict[str, dict[str, int]]:
    """Per cache: how many cells pass, are refused, fail."""
    table = {cache: {"pass": 0, "refused": 0, "fail": 0} for cache in caches}
    for cells in results.values():
        for cache, cell in cells.items():
            if cache not in table:
                continue
            verdict = cell["verdict"]
            key = "pass" if verdict == "pass" else "refused" if verdict.startswith("refused") else "fail"
            table[cache][key] += 1
    return table


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _cause(verdict: str) -> str:
    """A verdict with its numbers replaced by ``N``, so that one cause seen with different sizes is one note."""
    return re.sub(r"(?<![A-Za-z_\d.])-?\d+(\.\d+)?(e-?\d+)?", "N", verdict)


def _grouped(checks: dict, prefix: str, note) -> str:
    """``"ac[3] b[5]"``: the checks whose verdict starts with ``prefix``, grouped by note."""
    by_note: dict[int, str] = {}
    for check, verdict in checks.items():
        if verdict.startswith(prefix):
            number = note(_cause(verdict))
            by_note[number] = by_note.get(number, "") + check
    return " ".join(f"{letters}[{number}]" for number, letters in by_note.items())


def _cell_text(cell: dict, note) -> str:
    """``✓``, ``refused abcdef[3]`` or ``✗ b[1] c[4]``: the checks that failed (or were refused), with their notes."""
    checks = cell["checks"]
    refused = _grouped(checks, "refused", note)
    if cell["verdict"] == "pass":
        return "✓" + (f" (refused {refused})" if refused else "")
    if cell["verdict"].startswith("refused"):
        return f"refused {refused}"
    return "✗ " + _grouped(checks, "FAIL", note) + (f" (refused {refused})" if refused else "")


def write_table(path: Path, results: dict, skipped: dict, caches: list[str], checks: str, meta: dict) -> None:
    """``docs/support.md``: the support table, each failing / refused check of a cell pointing to a numbered note
    (one note per cause: the verdict with its numbers elided; the exact messages are in the JSON)."""
    notes: dict[str, int] = {}

    def note(text: str) -> int:
        return notes.setdefault(text, len(notes) + 1)

    lines = [
        "# Support table: architectures x caches",
        "",
        "Written by `python benchmarks/architecture_matrix.py` (do not edit by hand): a tiny random model of every",
        "decoder-only architecture of the installed transformers, run with every registered cache through the rule of",
        "issue 15. A cell is ✓ when every check passes, *refused* when the cache raises a `ValueError` when it is built",
        "(at the latest before the first token), ✗ when any check gives wrong output or raises another error; the",
        "letters are the checks, the numbers the notes below (exact messages: `benchmarks/results/architecture_matrix.json`).",
        "",
        f"transformers {meta['transformers']}, torch {meta['torch']}. Checks: "
        + "; ".join(f"({c}) {CHECK_NAMES[c]}" for c in checks)
        + ".",
        "",
        "| cache | ✓ pass | refused | ✗ fail |",
        "|---|---|---|---|",
    ]
    for cache, count in counts(results, caches).items():
        lines.append(f"| {cache} | {count['pass']} | {count['refused']} | {count['fail']} |")
    lines += ["", "| architecture | " + " | ".join(caches) + " |", "|---" * (len(caches) + 1) + "|"]
    for arch in sorted(results, key=lambda name: (name in HARD_FEATURES, name)):
        cells = results[arch]
        row = [_cell_text(cells[cache], note) if cache in cells else "" for cache in caches]
        lines.append(f"| {arch} | " + " | ".join(row) + " |")
    lines += ["", "## Notes", ""]
    lines += [f"{number}. {_md(text)}" for text, number in notes.items()]
    lines += ["", "## Architectures not in the matrix", ""]
    lines += [f"- `{name}`: {_md(reason)}" for name, reason in sorted(skipped.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caches", help="comma-separated cache names (default: every registered cache)")
    parser.add_argument("--archs", help="comma-separated model types / hard-feature variants (default: all)")
    parser.add_argument("--checks", default="".join(CHECKS), help="which checks, e.g. 'ac' (default: abcdefg)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="Markdown support table")
    parser.add_argument("--resume", action="store_true", help="keep the cells already in --out, run the rest")
    parser.add_argument("--recheck", action="store_true", help="with --resume: run --checks again in kept cells")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    caches = args.caches.split(",") if args.caches else hf_longmem.available_caches()
    unknown = [c for c in caches if c not in hf_longmem.available_caches()]
    if unknown:
        parser.error(f"unknown cache(s) {unknown}; available: {hf_longmem.available_caches()}")
    checks = "".join(c for c in CHECKS if c in args.checks)
    if not checks or set(args.checks) - set(CHECKS):
        parser.error(f"--checks must be letters of {''.join(CHECKS)}")
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "checks": checks, "caches": caches}
    results, previous = {}, {"skipped": {}, "meta": {}}
    if args.resume and args.out.exists():
        previous = json.loads(args.out.read_text())
        results = previous["results"]
        for cells in results.values():
            for cell in cells.values():
                cell["verdict"] = cell_verdict(cell["checks"])
        meta["checks"] = "".join(c for c in CHECKS if c in checks + previous["meta"].get("checks", ""))
    start = time.perf_counter()
    rows, skipped = matrix_rows(args.archs.split(",") if args.archs else None)
    skipped = {**{k: v for k, v in previous["skipped"].items() if k not in rows}, **skipped}
    run_matrix(rows, caches, checks, results, args.out, skipped, meta, recheck=args.recheck)
    meta["seconds"] = round(time.perf_counter() - start, 1)  # this run
    meta["seconds_all_runs"] = round(meta["seconds"] + previous["meta"].get("seconds_all_runs", 0.0), 1)
    # the table and the counts cover every cache in the results (a run with --caches adds to them)
    shown = [c for c in hf_longmem.available_caches() if any(c in cells for cells in results.values())]
    meta["caches"] = shown
    save(args.out, results, skipped, meta)
    write_table(args.table, results, skipped, shown, meta["checks"], meta)
    for cache, count in counts(results, shown).items():
        print(f"{cache:14s} pass {count['pass']:4d}  refused {count['refused']:4d}  fail {count['fail']:4d}")
    print(f"{len(rows)} architectures, {len(skipped)} skipped, {meta['seconds']} s -> {args.out}, {args.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
