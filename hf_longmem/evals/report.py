"""Results files, text tables and accuracy-vs-memory plots of benchmark rows.

A results file is JSON ``{"meta": {...}, "rows": [...], "records": [...]?}``: ``meta`` says what produced it
(:func:`collect_meta`), ``rows`` are :func:`hf_longmem.evals.runner.run_benchmark` rows (read by
``hf_longmem.hub``), ``records`` optionally keeps the per-turn records. Files are written atomically (a temporary
file in the same folder, then ``os.replace``), so a reader never sees half a file.

Example::

    rows = run_benchmark(model, tok, ["passkey"], [512, 1024], caches)
    save_results("results.json", rows, collect_meta(model_name="tiny"))
    print(format_table(load_results("results.json")["rows"]))
    plot(rows, "accuracy_vs_kv.png")
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from hf_longmem.files import atomic_write_text

from .schema import NUMERIC_ROW_KEYS, ROW_FIELDS, is_number

__all__ = [
    "collect_meta",
    "format_bytes",
    "format_table",
    "load_results",
    "plot",
    "save_results",
]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def collect_meta(
    model_name: str | None = None,
    command: str | Sequence[str] | None = None,
    device: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What produced a results file.

    Args:
        model_name: the evaluated model.
        command: the command line (default: this process's ``sys.argv``).
        device: the device the model ran on (e.g. ``"cpu"``, ``"cuda:0"``).
        **extra: more entries (seed, dtype, options, ...).

    Returns:
        ``{"model", "date" (ISO 8601, UTC), "versions": {package: version}, "command": str, "machine": {...}, **extra}``.
    """
    import torch

    if command is None:
        command = sys.argv
    if not isinstance(command, str):
        command = shlex.join(str(part) for part in command)
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    versions = {name: _version(name) for name in ("hf-longmem", "torch", "transformers", "tokenizers")}
    versions["python"] = platform.python_version()
    return {
        "model": model_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "command": command,
        "machine": machine,
        **extra,
    }


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def save_results(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any] | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Writes ``{"meta", "rows"[, "records"]}`` to ``path`` atomically (creating parent folders).

    Non-finite floats (NaN, inf) are written as ``null`` so the file is strict JSON.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(
            f"`path` {str(path)!r} exists and is not a regular file; results are written atomically by "
            "replacing a regular file"
        )
    payload: dict[str, Any] = {"meta": dict(meta or {}), "rows": [dict(r) for r in rows]}
    if records is not None:
        payload["records"] = [dict(r) for r in records]
    text = json.dumps(_finite(payload), indent=2, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a results file written by :func:`save_results` (a bare list of rows is accepted too).

    Returns:
        ``{"meta": dict, "rows": list[dict], ...}``.

    Raises:
        ValueError: the file is missing, not JSON, or has no ``rows`` list.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"results file {str(path)!r} is a folder; give the JSON file written by `bench --out`")
    if not path.is_file():
        raise ValueError(f"results file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"results file {str(path)!r} is not valid JSON: {error}") from None
    if isinstance(data, list):
        data = {"meta": {}, "rows": data}
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"results file {str(path)!r} must hold {{'meta': ..., 'rows': [...]}}")
    data.setdefault("meta", {})
    if not isinstance(data["meta"], dict):
        raise ValueError(f"results file {str(path)!r}: 'meta' must be an object, got {type(data['meta']).__name__}")
    for index, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise ValueError(f"results file {str(path)!r}: row {index} must be an object, got {row!r}")
        for key in NUMERIC_ROW_KEYS:
            value = row.get(key)
            if value is not None and not is_number(value):
                raise ValueError(f"results file {str(path)!r}: row {index} has a non-numeric {key!r}: {value!r}")
        for key in (f.name for f in ROW_FIELDS if f.kind == "object"):
            if row.get(key) is not None and not isinstance(row[key], dict):
                raise ValueError(f"results file {str(path)!r}: row {index} has a {key!r} that is not an object")
    return data


def format_bytes(num_bytes: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` -> ``"-"``."""
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_MAX_CACHE_LABEL = 48


def _cache_label(row: Mapping[str, Any]) -> str:
    """``"name(k=v,...)"``, cut to :data:`_MAX_CACHE_LABEL` characters (the JSON keeps every option)."""
    kwargs = row.get("cache_kwargs") or {}
    label = str(row.get("cache", "?"))
    if kwargs:
        label += "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    if len(label) > _MAX_CACHE_LABEL:
        label = label[: _MAX_CACHE_LABEL - 4] + "...)"
    return label


def _number(value: Any, fmt: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(float(value) * scale, fmt)


def _interval(row: Mapping[str, Any]) -> str:
    low, high = row.get("accuracy_low"), row.get("accuracy_high")
    if low is None or high is None:
        return "-"
    return f"[{low:.2f}, {high:.2f}]"


def full_cache_bytes(rows: Sequence[Mapping[str, Any]]) -> dict[tuple, float]:
    """``(model, task, length) -> kv_bytes`` of the rows that ran without compression (cache ``full``)."""
    return {
        (r.get("model"), r.get("task"), r.get("context_length")): r["kv_bytes"]
        for r in rows
        if r.get("cache_name", r.get("cache")) == "full" and r.get("kv_bytes") is not None
    }


def share_of_full(row: Mapping[str, Any], full: Mapping[tuple, float]) -> float | None:
    """``kv_bytes`` of ``row`` as a share of the full cache's in the same (model, task, length), or ``None``."""
    reference = full.get((row.get("model"), row.get("task"), row.get("context_length")))
    if not reference or row.get("kv_bytes") is None:
        return None
    return row["kv_bytes"] / reference


def holds_full_cache(row: Mapping[str, Any], full: Mapping[tuple, float]) -> bool:
    """Whether a compressing cache's row held at least as many bytes as the full cache of the same cell."""
    if row.get("cache_name", row.get("cache")) == "full" or row.get("kv_bytes") is None:
        return False
    reference = full.get((row.get("model"), row.get("task"), row.get("context_length")))
    return reference is not None and row["kv_bytes"] >= reference


#: What each column of :func:`format_table` means (printed under the table).
COLUMN_LEGEND = {
    "n": "answers scored (samples x questions)",
    "accuracy": "mean score of those answers (exact match for passkey)",
    "95% CI": "Wilson score interval of the accuracy: a difference inside it is not evidence",
    "KV": "bytes the cache holds at the end of an answer (keys, values and metadata; mean over samples)",
    "vs full": "KV as a share of the full cache's at the same task and length (a budget of 25% should give ~0.25)",
    "peak": "peak memory during the answer (CUDA: allocator peak; CPU: growth of the resident set, a lower bound)",
    "prefill ms": "time to prefill the context, mean",
    "decode tok/s": "greedy decoding speed, mean",
    "top-1": "share of next-token predictions equal to the full cache's (choice tasks, e.g. sort: of the top choice)",
    "KL": "KL divergence of the next-token distribution from the full cache's (choice tasks: of the choice distribution)",
}


def format_table(rows: Sequence[Mapping[str, Any]], *, legend: bool = True) -> str:
    """A plain-text table of benchmark rows, one line per row in the given order, then the legend.

    Columns: task, length, cache (with its options), n (answers scored), accuracy and its 95% Wilson interval, KV
    bytes held, peak memory, prefill ms, decode tokens/s, then top-1 agreement and KL when any row has them, and
    the model when rows hold several models. A row whose cache holds at least the full cache's bytes in the same
    (task, length) is marked ``!``, and the notes say why (the cache's ``memory_note``).

    Args:
        legend: append the meaning of the columns and the notes of marked rows.

    Returns:
        The text without a trailing newline; ``"(no rows)"`` when ``rows`` is empty.
    """
    if not rows:
        return "(no rows)"
    full = full_cache_bytes(rows)
    columns: list[tuple[str, Any]] = []
    if len({row.get("model") for row in rows}) > 1:
        columns.append(("model", lambda r: str(r.get("model"))))
    columns += [
        ("task", lambda r: str(r.get("task", "?"))),
        ("length", lambda r: str(r.get("context_length", "?"))),
        ("cache", lambda r: _cache_label(r) + (" !" if holds_full_cache(r, full) else "")),
        ("n", lambda r: str(r.get("num_turns", r.get("num_samples", "?")))),
        ("accuracy", lambda r: _number(r.get("accuracy"), ".3f")),
        ("95% CI", _interval),
        ("KV", lambda r: format_bytes(r.get("kv_bytes"))),
        ("vs full", lambda r: _number(share_of_full(r, full), ".2f")),
        ("peak", lambda r: format_bytes(r.get("peak_memory_bytes"))),
        ("prefill ms", lambda r: _number(r.get("prefill_s"), ".1f", 1000.0)),
        ("decode tok/s", lambda r: _number(r.get("decode_tokens_per_s"), ".1f")),
    ]
    if any(row.get("top1_agreement") is not None for row in rows):
        columns.append(("top-1", lambda r: _number(r.get("top1_agreement"), ".3f")))
    if any(row.get("kl") is not None for row in rows):
        columns.append(("KL", lambda r: _number(r.get("kl"), ".4f")))
    cells = [[fn(row) for _, fn in columns] for row in rows]
    widths = [max(len(name), *(len(line[i]) for line in cells)) for i, (name, _) in enumerate(columns)]
    numeric = {"length", "n", "accuracy", "KV", "vs full", "peak", "prefill ms", "decode tok/s", "top-1", "KL"}

    def render(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if name in numeric else v.ljust(w) for v, w, (name, _) in zip(values, widths, columns)]
        return "  ".join(parts).rstrip()

    lines = [render([name for name, _ in columns]), "  ".join("-" * w for w in widths)]
    lines += [render(line) for line in cells]
    if legend:
        shown = [name for name, _ in columns if name in COLUMN_LEGEND]
        lines += ["", "columns:"] + [f"  {name}: {COLUMN_LEGEND[name]}" for name in shown]
        marked = {}
        for row in rows:
            if holds_full_cache(row, full):
                name = str(row.get("cache_name", row.get("cache")))
                marked.setdefault(name, row.get("memory_note") or "its options do not reach below the full cache here")
        if marked:
            lines += ["", "! holds at least the full cache's bytes at this length, so it saves no memory here:"]
            lines += [f"  {name}: {note}" for name, note in marked.items()]
    return "\n".join(lines)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def plot(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    lines: str = "length",
    title: str | None = None,
) -> Path:
    """Accuracy against KV bytes: one marker shape per cache, one line per context length (or task), with the
    95% interval of each accuracy as an error bar when the rows have it.

    With ``lines="length"`` there is one panel per task and, in it, one line per context length joining that
    length's caches in order of KV bytes; with ``lines="task"`` one panel per length and one line per task. The
    x axis is logarithmic. Needs matplotlib (``pip install 'hf-longmem[plot]'``).

    Args:
        rows: benchmark rows (``task``, ``cache``, ``context_length``, ``accuracy``, ``kv_bytes``).
        path: image file to write (format from the suffix, e.g. ``.png``, ``.pdf``).
        lines: ``"length"`` or ``"task"``.
        title: figure title.

    Returns:
        The path written.
    """
    if lines not in ("length", "task"):
        raise ValueError(f"`lines` must be 'length' or 'task', got {lines!r}")
    points = [r for r in rows if r.get("kv_bytes") is not None and r.get("accuracy") is not None]
    if not points:
        raise ValueError("`rows` has no row with both 'accuracy' and 'kv_bytes' to plot")
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'hf-longmem[plot]' (or matplotlib)"
        ) from None

    panel_key, line_key = ("task", "context_length") if lines == "length" else ("context_length", "task")
    panels = list(dict.fromkeys(r[panel_key] for r in points))
    caches = list(dict.fromkeys(str(r["cache"]) for r in points))
    marker = {cache: _MARKERS[i % len(_MARKERS)] for i, cache in enumerate(caches)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        in_panel = [r for r in points if r[panel_key] == panel]
        for index, group in enumerate(dict.fromkeys(r[line_key] for r in in_panel)):
            series = sorted((r for r in in_panel if r[line_key] == group), key=lambda r: r["kv_bytes"])
            color = f"C{index % 10}"
            ax.plot(
                [r["kv_bytes"] for r in series],
                [r["accuracy"] for r in series],
                "-",
                color=color,
                alpha=0.6,
                label=f"{line_key.replace('context_', '')} {group}",
            )
            for r in series:
                if r.get("accuracy_low") is not None and r.get("accuracy_high") is not None:
                    ax.errorbar(
                        r["kv_bytes"],
                        r["accuracy"],
                        yerr=[[r["accuracy"] - r["accuracy_low"]], [r["accuracy_high"] - r["accuracy"]]],
                        color=color,
                        alpha=0.5,
                        capsize=3,
                        linewidth=1,
                    )
                ax.plot(r["kv_bytes"], r["accuracy"], marker[str(r["cache"])], color=color, markersize=7)
        ax.set_xscale("log", base=2)  # ticks at powers of two: 128 KiB, 256 KiB, ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_bytes(value).replace(".0 ", " ")))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("KV cache bytes")
        ax.set_title(f"{panel_key.replace('context_', '')}: {panel}")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[0][0].set_ylabel("accuracy")
    handles = [plt.Line2D([], [], linestyle="", marker=marker[c], color="0.3", label=c, markersize=7) for c in caches]
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="cache")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
