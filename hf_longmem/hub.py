"""Publish checkpoints to the Hugging Face Hub with a model card, remote code and evaluation results.

The flow of :func:`publish` is the one ``model.push_to_hub`` would follow if it kept our card:

1. stage everything in a temporary folder: ``model.save_pretrained`` (which also copies the remote-code files of
   classes registered with ``register_for_auto_class``), ``tokenizer.save_pretrained``, ``extra_files`` and a
   ``README.md`` rendered from a template of :mod:`hf_longmem.model_cards`;
2. ``api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)``;
3. ``api.upload_folder(repo_id=repo_id, folder_path=stage, commit_message=...)``.

``model.push_to_hub`` is not used: it replaces ``README.md`` with the card found on the Hub or a default one.

``api`` is any object with ``create_repo`` and ``upload_folder`` methods shaped like those of
:class:`huggingface_hub.HfApi` (the default). :class:`LocalFolderApi` implements them by copying into a local folder,
for dry runs and tests::

    >>> from hf_longmem.hub import LocalFolderApi, publish
    >>> publish(model, "me/tiny-snapkv", eval_results="results.json", api=LocalFolderApi("/tmp/hub"))
    '/tmp/hub/me/tiny-snapkv'
    >>> AutoModelForCausalLM.from_pretrained("/tmp/hub/me/tiny-snapkv")

Evaluation results come from the evaluation harness, whose JSON is ``{"meta": {...}, "rows": [row, ...]}`` with rows
such as ``{"model": "tiny", "task": "passkey", "cache": "snapkv", "cache_kwargs": {"budget": 256},
"context_length": 1024, "num_samples": 50, "accuracy": 0.96, "kv_bytes": 123456, "prefill_s": 0.1,
"decode_tokens_per_s": 500.0, "peak_memory_bytes": 0, "top1_agreement": 0.99, "kl": 0.01}``. They become the
``model-index`` of the card metadata (:func:`eval_results_from_harness`) and a table in its body
(:func:`eval_table_markdown`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from hf_longmem.evals.report import format_bytes
from hf_longmem.files import atomic_write_bytes

__all__ = [
    "HarnessResults",
    "HubApi",
    "LocalFolderApi",
    "LIBRARY_TAG",
    "eval_results_from_harness",
    "eval_table_markdown",
    "list_card_templates",
    "load_harness_results",
    "publish",
    "render_model_card",
]

logger = logging.getLogger(__name__)

#: Tag added to every card published by hf_longmem.
LIBRARY_TAG = "hf-longmem"
#: Cache names that denote the uncompressed baseline in harness rows (never chosen for the usage example).
BASELINE_CACHES = frozenset({"none", "dynamic", "full", "dense", "baseline"})
#: Cache shown in the usage snippet when neither ``example_cache`` nor a compressed evaluated cache is given.
DEFAULT_EXAMPLE_CACHE: tuple[str, dict[str, Any]] = ("snapkv", {"budget": 512})
#: Harness row keys that become ``EvalResult`` metrics by default (skipped where the row holds ``null``).
DEFAULT_EVAL_METRICS: tuple[str, ...] = ("accuracy", "top1_agreement", "kl")

_REQUIRED_ROW_KEYS = ("task", "cache", "context_length", "accuracy")
_OPTIONAL_NUMBER_KEYS = (
    "num_samples",
    "kv_bytes",
    "prefill_s",
    "decode_tokens_per_s",
    "peak_memory_bytes",
    "top1_agreement",
    "kl",
)
_CARD_FILE = "README.md"
_CONFIG_FILES_WITH_AUTO_MAP = ("config.json", "tokenizer_config.json", "processor_config.json")


# ----------------------------------------------------------------------------------------------------------------------
# Harness results
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class HarnessResults:
    """Validated output of the evaluation harness.

    Attributes:
        rows: one dict per (model, task, cache, context length) measurement, in the harness's order; every row has
            the keys ``task`` (str), ``cache`` (str), ``cache_kwargs`` (dict, ``{}`` when absent), ``context_length``
            (int) and ``accuracy`` (float in [0, 1]); the optional numeric keys are numbers or ``None``.
        meta: the run's ``meta`` dict (``{}`` when absent): versions, device, dtype, seed, ...
    """

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_row(row: Any, index: int) -> dict[str, Any]:
    where = f"eval_results row {index}"
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(row).__name__}.")
    for key in _REQUIRED_ROW_KEYS:
        if key not in row:
            raise ValueError(f"{where} is missing the required key {key!r} (keys: {sorted(row)}).")
    out = dict(row)
    for key in ("task", "cache"):
        if not isinstance(out[key], str) or not out[key]:
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {out[key]!r}.")
    if "model" in out and out["model"] is not None and not isinstance(out["model"], str):
        raise ValueError(f"{where}: 'model' must be a string, got {out['model']!r}.")
    length = out["context_length"]
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"{where}: 'context_length' must be a non-negative int, got {length!r}.")
    accuracy = out["accuracy"]
    if not _is_number(accuracy) or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"{where}: 'accuracy' must be a number in [0, 1], got {accuracy!r}.")
    kwargs = out.get("cache_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"{where}: 'cache_kwargs' must be a dict with string keys, got {kwargs!r}.")
    out["cache_kwargs"] = dict(kwargs)
    for key in _OPTIONAL_NUMBER_KEYS:
        value = out.get(key)
        if value is not None and not _is_number(value):
            raise ValueError(f"{where}: {key!r} must be a finite number or null, got {value!r}.")
    return out


def _read_results_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"eval_results file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"eval_results file {str(path)!r} is not valid JSON: {err}") from err


def load_harness_results(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike,
    *,
    model: str | None = None,
) -> HarnessResults:
    """Read and validate the evaluation harness's output.

    Args:
        results: the harness JSON as a dict ``{"meta": {...}, "rows": [...]}``, a list of rows, or the path of a
            ``.json`` file holding either (or of a ``.jsonl`` file with one row per line).
        model: keep only the rows whose ``"model"`` equals this (the harness may evaluate several models in one run).

    Returns:
        :class:`HarnessResults` with validated copies of the rows (``cache_kwargs`` defaulted to ``{}``).

    Raises:
        ValueError: malformed input; the message names the offending row and key.
        FileNotFoundError: ``results`` is a path that does not exist.
    """
    if isinstance(results, (str, os.PathLike)):
        results = _read_results_file(Path(results))
    meta: Any = {}
    if isinstance(results, Mapping):
        if "rows" not in results:
            raise ValueError(f"eval_results is missing the key 'rows' (keys: {sorted(results)}).")
        meta = results.get("meta")
        meta = {} if meta is None else meta
        rows = results["rows"]
        if not isinstance(meta, Mapping):
            raise ValueError(f"eval_results 'meta' must be a dict, got {type(meta).__name__}.")
    else:
        rows = results
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise ValueError(f"eval_results rows must be a list of dicts, got {type(rows).__name__}.")
    validated = [_validate_row(row, i) for i, row in enumerate(rows)]
    if model is not None:
        validated = [row for row in validated if row.get("model") == model]
        if not validated:
            raise ValueError(f"eval_results has no row with model={model!r}.")
    return HarnessResults(rows=validated, meta=dict(meta))


def _format_kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _cache_label(row: Mapping[str, Any]) -> str:
    kwargs = row.get("cache_kwargs") or {}
    return f"{row['cache']} ({_format_kwargs(kwargs)})" if kwargs else str(row["cache"])


def eval_results_from_harness(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike | HarnessResults,
    *,
    metrics: Sequence[str] = DEFAULT_EVAL_METRICS,
    model: str | None = None,
    task_type: str = "text-generation",
) -> list[EvalResult]:
    """Turn harness rows into :class:`huggingface_hub.EvalResult` entries (the card's ``model-index``).

    One row gives one ``EvalResult`` per metric in ``metrics`` whose value is not ``null``:

    - task: ``task_type`` (default ``"text-generation"``), ``task_name`` = the row's ``task``;
    - dataset: ``dataset_type`` = ``task``, ``dataset_name`` = ``"<task> (<context_length> tokens)"``,
      ``dataset_config`` = ``"len<context_length>"``, ``dataset_args`` = ``{"context_length", "num_samples"}``;
      so the Hub groups the caches evaluated on one task and length into one result;
    - metric: ``metric_type`` = the row key (``"accuracy"``, ``"top1_agreement"``, ``"kl"``, ...),
      ``metric_name`` = ``"<metric> [<cache> (<kwargs>)]"``, ``metric_config`` = the cache name,
      ``metric_args`` = the ``cache_kwargs`` (``None`` when empty).

    Args:
        results: anything :func:`load_harness_results` accepts, or its result.
        metrics: numeric row keys to report.
        model: keep only the rows of this model.
        task_type: Hub task id of the results.

    Returns:
        list of ``EvalResult``, ``len <= len(rows) * len(metrics)``, in row order.

    Raises:
        ValueError: malformed results, or a metric that is not a numeric row key.
    """
    if isinstance(metrics, str) or not metrics:
        raise ValueError(f"metrics must be a non-empty sequence of row keys, got {metrics!r}.")
    numeric_keys = {"accuracy", *_OPTIONAL_NUMBER_KEYS}
    for metric in metrics:
        if metric not in numeric_keys:
            raise ValueError(f"metrics: {metric!r} is not a numeric harness row key (one of {sorted(numeric_keys)}).")
    if not isinstance(results, HarnessResults):
        results = load_harness_results(results, model=model)
    elif model is not None:
        results = HarnessResults([r for r in results.rows if r.get("model") == model], results.meta)
    out: list[EvalResult] = []
    for row in results.rows:
        length = row["context_length"]
        dataset_args = {"context_length": length}
        if row.get("num_samples") is not None:
            dataset_args["num_samples"] = row["num_samples"]
        for metric in metrics:
            value = row.get(metric)
            if value is None:
                continue
            out.append(
                EvalResult(
                    task_type=task_type,
                    task_name=row["task"],
                    dataset_type=row["task"],
                    dataset_name=f"{row['task']} ({length} tokens)",
                    dataset_config=f"len{length}",
                    dataset_args=dataset_args,
                    metric_type=metric,
                    metric_name=f"{metric} [{_cache_label(row)}]",
                    metric_value=value,
                    metric_config=row["cache"],
                    metric_args=dict(row["cache_kwargs"]) or None,
                )
            )
    return out


def _human_bytes(n: float | None) -> str:
    """Card cells: the harness table's byte format, with an en dash for a missing value."""
    return "–" if n is None else format_bytes(n)


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def eval_table_markdown(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike | HarnessResults,
) -> str:
    """Render harness rows as a markdown table, in row order.

    Columns: Task, Cache (with its kwargs), Context length, Samples, Accuracy, KV bytes, Decode (tok/s); a Model
    column is added first when the rows hold several models, and Top-1 agreement / KL columns when any row has them.
    ``null`` values print as ``–``.

    Args:
        results: anything :func:`load_harness_results` accepts, or its result.

    Returns:
        the table (header, separator and one line per row, no trailing newline); ``""`` when there are no rows.
    """
    if not isinstance(results, HarnessResults):
        results = load_harness_results(results)
    rows = results.rows
    if not rows:
        return ""
    models = {row.get("model") for row in rows}
    columns: list[tuple[str, Any]] = []
    if len(models) > 1:
        columns.append(("Model", lambda r: r.get("model") or "–"))
    columns += [
        ("Task", lambda r: r["task"]),
        ("Cache", _cache_label),
        ("Context length", lambda r: f"{r['context_length']:,}"),
        ("Samples", lambda r: "–" if r.get("num_samples") is None else r["num_samples"]),
        ("Accuracy", lambda r: f"{r['accuracy']:.3f}"),
        ("KV bytes", lambda r: _human_bytes(r.get("kv_bytes"))),
        (
            "Decode (tok/s)",
            lambda r: "–" if r.get("decode_tokens_per_s") is None else f"{r['decode_tokens_per_s']:,.1f}",
        ),
    ]
    if any(row.get("top1_agreement") is not None for row in rows):
        columns.append(
            ("Top-1 agreement", lambda r: "–" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.3f}")
        )
    if any(row.get("kl") is not None for row in rows):
        columns.append(("KL", lambda r: "–" if r.get("kl") is None else f"{r['kl']:.4g}"))
    right_aligned = {"Context length", "Samples", "Accuracy", "KV bytes", "Decode (tok/s)", "Top-1 agreement", "KL"}
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "|".join("---:" if name in right_aligned else "---" for name, _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(fmt(row)) for _, fmt in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Model cards
# ----------------------------------------------------------------------------------------------------------------------


def _templates_dir() -> Any:
    return resources.files("hf_longmem.model_cards")


def list_card_templates() -> list[str]:
    """Names of the card templates shipped in :mod:`hf_longmem.model_cards` (``"default"``, ...), sorted."""
    names = set()
    for entry in _templates_dir().iterdir():
        name = entry.name
        if entry.is_file() and name.endswith((".md", ".jinja")) and not name.startswith("_"):
            names.add(name.rsplit(".", 1)[0])
    return sorted(names)


def _resolve_template(template: str | os.PathLike | None) -> str:
    """Return the text of ``template``: a shipped template name, or the path of a Jinja2 markdown file."""
    if template is None:
        template = "default"
    path = Path(template)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if isinstance(template, str) and "/" not in template and os.sep not in template:
        base = template.rsplit(".", 1)[0] if template.endswith((".md", ".jinja")) else template
        for suffix in (".md", ".jinja"):
            entry = _templates_dir().joinpath(base + suffix)
            if entry.is_file():
                return entry.read_text(encoding="utf-8")
    raise ValueError(
        f"template={str(template)!r} is neither a file nor a template of hf_longmem.model_cards "
        f"(available: {list_card_templates()})."
    )


def _as_str_list(value: str | Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a string or a sequence of non-empty strings, got {value!r}.")
    return list(value)


def _check_repo_id(repo_id: Any, name: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{name}={repo_id!r} is not a valid Hub repo id: {err}") from err
    if not repo_id:
        raise ValueError(f"{name} must be a non-empty repo id such as 'org/name'.")


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ValueError(f"config must be a PretrainedConfig or a dict, got {type(config).__name__}.")


def _details(config: Mapping[str, Any], num_parameters: int | None) -> list[tuple[str, str]]:
    details: list[tuple[str, str]] = []
    if config.get("architectures"):
        details.append(("Architecture", ", ".join(f"`{a}`" for a in config["architectures"])))
    if config.get("model_type"):
        details.append(("Model type", f"`{config['model_type']}`"))
    if num_parameters is not None:
        details.append(("Parameters", _human_count(int(num_parameters))))
    shape = [
        ("layers", config.get("num_hidden_layers")),
        ("hidden size", config.get("hidden_size")),
        ("attention heads", config.get("num_attention_heads")),
        ("KV heads", config.get("num_key_value_heads")),
        ("vocabulary", config.get("vocab_size")),
    ]
    shape_text = ", ".join(f"{k} {v}" for k, v in shape if v is not None)
    if shape_text:
        details.append(("Shape", shape_text))
    if config.get("max_position_embeddings"):
        details.append(("Max positions", str(config["max_position_embeddings"])))
    if config.get("longmem_cache"):
        details.append(("Default memory cache", f"`{json.dumps(config['longmem_cache'], sort_keys=True)}`"))
    return details


def _pick_example_cache(rows: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    candidates = [r for r in rows if r["cache"].lower() not in BASELINE_CACHES]
    if not candidates:
        return DEFAULT_EXAMPLE_CACHE[0], dict(DEFAULT_EXAMPLE_CACHE[1])
    best = max(candidates, key=lambda r: (r["accuracy"], -(r.get("kv_bytes") or 0)))
    return best["cache"], dict(best["cache_kwargs"])


def _hf_longmem_version() -> str:
    try:
        from importlib.metadata import version

        return version("hf-longmem")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. run from a plain checkout)
        return "unknown"


def _meta_items(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    items = []
    for key, value in meta.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            items.append((str(key), _cell(value)))
        elif isinstance(value, (list, tuple, Mapping)):
            text = json.dumps(value, sort_keys=True, default=str)
            if len(text) <= 200:
                items.append((str(key), f"`{text}`"))
    return items


def render_model_card(
    model_id: str,
    *,
    config: Any = None,
    eval_results: Mapping[str, Any] | Sequence[Any] | str | os.PathLike | HarnessResults | None = None,
    base_model: str | Sequence[str] | None = None,
    tags: str | Sequence[str] | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    pipeline_tag: str | None = "text-generation",
    template: str | os.PathLike | None = None,
    description: str | None = None,
    tokenizer_source: str | None = None,
    example_cache: tuple[str, Mapping[str, Any]] | None = None,
    num_parameters: int | None = None,
    remote_code_files: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    **template_kwargs: Any,
) -> ModelCard:
    """Render a model card from a template of :mod:`hf_longmem.model_cards` (or any Jinja2 markdown file).

    The metadata header is ``ModelCardData(library_name="transformers", pipeline_tag=..., base_model=..., tags=
    ["hf-longmem", *tags], license=..., language=..., eval_results=[...], model_name=<last part of model_id>)``;
    ``eval_results`` becomes its ``model-index``. The body of the default template has a model summary, a usage
    snippet (``from_pretrained`` with ``trust_remote_code=True`` when ``config`` has an ``auto_map``, and
    ``generate(..., cache=hf_longmem.make_cache(...))``) and the table of the evaluation rows.

    Args:
        model_id: repo id or local path shown in the usage snippet; its last part names the model.
        config: the model's ``PretrainedConfig`` or its dict (``config.json``), for the summary and ``auto_map``.
        eval_results: harness output (anything :func:`load_harness_results` accepts) or a list of ready
            ``EvalResult`` (metadata only, no table).
        base_model: Hub id(s) of the model(s) this one derives from.
        tags: extra tags; ``"hf-longmem"`` is always added first.
        license: Hub license id, e.g. ``"apache-2.0"``.
        language: ISO 639 code(s).
        pipeline_tag: Hub pipeline tag.
        template: a shipped template name (see :func:`list_card_templates`, default ``"default"``) or a file path.
        description: paragraph under the title (the template's default text otherwise).
        tokenizer_source: repo id or path that ``AutoTokenizer`` loads in the snippet; ``None`` prints a placeholder.
        example_cache: ``(name, kwargs)`` for the ``make_cache`` line; default: the compressed cache with the best
            accuracy in ``eval_results``, else ``("snapkv", {"budget": 512})``.
        num_parameters: parameter count shown in the summary.
        remote_code_files: the ``.py`` files shipped for ``trust_remote_code`` (listed in the card).
        metadata: further card metadata fields (``datasets``, ``license_name``, ...); may not repeat an argument.
        **template_kwargs: further variables for a custom template.

    Returns:
        the :class:`huggingface_hub.ModelCard`; ``card.save(path)`` writes it, ``card.data`` holds the metadata.

    Raises:
        ValueError: an invalid argument (named in the message), malformed ``eval_results`` or an unknown template.
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}.")
    base_models = _as_str_list(base_model, "base_model")
    for bm in base_models:
        _check_repo_id(bm, "base_model")
    tag_list = list(dict.fromkeys([LIBRARY_TAG, *_as_str_list(tags, "tags")]))
    languages = _as_str_list(language, "language")
    if license is not None and (not isinstance(license, str) or not license):
        raise ValueError(f"license must be a non-empty string such as 'apache-2.0', got {license!r}.")
    metadata = dict(metadata or {})
    reserved = {"base_model", "tags", "license", "language", "library_name", "pipeline_tag", "eval_results"}
    reserved |= {"model_name", "model-index"}
    clash = sorted(reserved & set(metadata))
    if clash:
        raise ValueError(f"metadata may not set {clash}: pass them as arguments.")
    template_text = _resolve_template(template)

    harness: HarnessResults | None = None
    card_eval_results: list[EvalResult] | None = None
    if eval_results is not None:
        if isinstance(eval_results, list) and eval_results and all(isinstance(r, EvalResult) for r in eval_results):
            card_eval_results = list(eval_results)
        else:
            harness = eval_results if isinstance(eval_results, HarnessResults) else load_harness_results(eval_results)
            card_eval_results = eval_results_from_harness(harness) or None

    if example_cache is None:
        example_cache = _pick_example_cache(harness.rows if harness else [])
    if (
        not isinstance(example_cache, (tuple, list))
        or len(example_cache) != 2
        or not isinstance(example_cache[0], str)
        or not isinstance(example_cache[1], Mapping)
        or not all(isinstance(k, str) and k.isidentifier() for k in example_cache[1])
    ):
        raise ValueError(f"example_cache must be (name, kwargs) with identifier keys, got {example_cache!r}.")
    cache_name, cache_kwargs = example_cache[0], dict(example_cache[1])

    config_dict = _config_dict(config)
    model_name = PurePosixPath(model_id.replace(os.sep, "/").rstrip("/")).name or model_id
    card_data = ModelCardData(
        language=languages or None,
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        tags=tag_list,
        eval_results=card_eval_results,
        model_name=model_name,
        **metadata,
    )
    variables: dict[str, Any] = {
        "model_id": model_id,
        "model_name": model_name,
        "description": description,
        "base_model_list": base_models,
        "details": _details(config_dict, num_parameters),
        "hf_longmem_version": _hf_longmem_version(),
        "trust_remote_code": bool(config_dict.get("auto_map")),
        "remote_code_files": list(remote_code_files or []),
        "tokenizer_source": tokenizer_source,
        "example_cache_name": cache_name,
        "example_cache_kwargs": "".join(f", {k}={v!r}" for k, v in cache_kwargs.items()),
        "eval_table": eval_table_markdown(harness) if harness else "",
        "eval_rows": harness.rows if harness else [],
        "eval_meta": _meta_items(harness.meta) if harness else [],
    }
    variables.update(template_kwargs)
    return ModelCard.from_template(card_data, template_str=template_text, **variables)


# ----------------------------------------------------------------------------------------------------------------------
# Hub-like APIs
# ----------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class HubApi(Protocol):
    """The part of :class:`huggingface_hub.HfApi` that :func:`publish` uses."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | os.PathLike, **kwargs: Any) -> Any: ...


def _clean_path_in_repo(path_in_repo: str | None, name: str, *, allow_root: bool) -> str:
    if path_in_repo is None or path_in_repo in ("", ".", "/"):
        if allow_root:
            return ""
        raise ValueError(f"{name} must name a file in the repo, got {path_in_repo!r}.")
    if not isinstance(path_in_repo, str):
        raise ValueError(f"{name} must be a string, got {type(path_in_repo).__name__}.")
    parts = PurePosixPath(path_in_repo.replace("\\", "/").strip("/")).parts
    if not parts or any(p in ("..", ".") for p in parts):
        raise ValueError(f"{name}={path_in_repo!r} must be a relative path inside the repo without '..'.")
    return "/".join(parts)


class LocalFolderApi:
    """A local stand-in for :class:`huggingface_hub.HfApi`: repositories are folders ``<root>/<repo_id>``.

    Implements ``create_repo``, ``upload_folder`` and ``upload_file`` with the Hub's semantics (upload adds or
    replaces files, ``delete_patterns`` removes others, ``.git`` and ``.cache/huggingface`` are never uploaded), so
    that :func:`publish` can run dry and tests can reload the result with ``from_pretrained(<root>/<repo_id>)``.
    Datasets and Spaces live under ``<root>/datasets/`` and ``<root>/spaces/``, as in Hub URLs.

    Writes are atomic: ``upload_folder`` builds the new repo state in a temporary sibling folder (hard-linking the
    unchanged files) and swaps it in with two renames; ``upload_file`` writes a temporary file and ``os.replace``\\ s
    it. A reader thus sees the old or the new revision, never a half-copied one. There are no branches, pull requests
    or history: ``revision`` other than ``"main"`` and ``create_pr=True`` raise ``ValueError``; ``private`` and
    ``token`` are accepted and ignored.

    Args:
        root: folder holding the repositories; created on first use.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def repo_path(self, repo_id: str, repo_type: str | None = None) -> Path:
        """Folder of ``repo_id`` (validated like on the Hub); ``repo_type`` is ``None``/``"model"``, ``"dataset"``
        or ``"space"``."""
        _check_repo_id(repo_id, "repo_id")
        if repo_type in (None, "model"):
            return self.root / repo_id
        if repo_type in ("dataset", "space"):
            return self.root / f"{repo_type}s" / repo_id
        raise ValueError(f"repo_type must be 'model', 'dataset' or 'space', got {repo_type!r}.")

    def _existing_repo(self, repo_id: str, repo_type: str | None) -> Path:
        path = self.repo_path(repo_id, repo_type)
        if not path.is_dir():
            raise FileNotFoundError(f"Repository {repo_id!r} does not exist in {str(self.root)!r}: call create_repo.")
        return path

    @staticmethod
    def _check_revision(revision: str | None, create_pr: bool | None) -> None:
        if revision not in (None, "main"):
            raise ValueError(f"revision={revision!r}: LocalFolderApi has a single 'main' revision.")
        if create_pr:
            raise ValueError("create_pr=True: LocalFolderApi has no pull requests.")

    def create_repo(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        repo_type: str | None = None,
        exist_ok: bool = False,
        **kwargs: Any,
    ) -> str:
        """Create ``<root>/<repo_id>``.

        Returns:
            the repo folder, as a string (the Hub returns the repo URL).

        Raises:
            ValueError: invalid ``repo_id``/``repo_type``.
            FileExistsError: the repo exists and ``exist_ok`` is False (the Hub answers 409).
        """
        path = self.repo_path(repo_id, repo_type)
        if path.exists() and not exist_ok:
            raise FileExistsError(f"Repository {repo_id!r} already exists in {str(self.root)!r}.")
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def upload_folder(
        self,
        *,
        repo_id: str,
        folder_path: str | os.PathLike,
        path_in_repo: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        token: str | bool | None = None,
        repo_type: str | None = None,
        revision: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
    ) -> str:
        """Copy the files of ``folder_path`` into the repo under ``path_in_repo``, atomically.

        ``allow_patterns``/``ignore_patterns`` filter the uploaded files and ``delete_patterns`` selects existing
        files under ``path_in_repo`` to remove (files being uploaded are kept), as in ``HfApi.upload_folder``.

        Returns:
            the repo folder, as a string (the Hub returns the commit URL).
        """
        self._check_revision(revision, create_pr)
        repo_dir = self._existing_repo(repo_id, repo_type)
        folder = Path(folder_path)
        if not folder.is_dir():
            raise ValueError(f"folder_path={str(folder_path)!r} is not a directory.")
        prefix = _clean_path_in_repo(path_in_repo, "path_in_repo", allow_root=True)
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        local_files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        to_add = list(
            filter_repo_objects(
                local_files, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS
            )
        )
        targets = {f"{prefix}/{rel}" if prefix else rel: folder / rel for rel in to_add}

        def build(new_dir: Path) -> None:
            if delete_patterns:
                base = new_dir / prefix if prefix else new_dir
                existing = (
                    sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
                    if base.is_dir()
                    else []
                )
                for rel in filter_repo_objects(existing, allow_patterns=delete_patterns):
                    full = f"{prefix}/{rel}" if prefix else rel
                    if full not in targets:
                        (base / rel).unlink()
            for rel, src in targets.items():
                dst = new_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists() or dst.is_symlink():
                    dst.unlink()  # may be a hard link into the live repo: never write through it
                shutil.copy2(src, dst)

        self._replace_tree(repo_dir, build)
        return str(repo_dir)

    def upload_file(
        self,
        *,
        path_or_fileobj: str | os.PathLike | bytes | Any,
        path_in_repo: str,
        repo_id: str,
        token: str | bool | None = None,
        repo_type: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        create_pr: bool | None = None,
    ) -> str:
        """Write one file into the repo, atomically (temporary file + ``os.replace``).

        Args:
            path_or_fileobj: a local file path, the bytes, or a binary file object.
            path_in_repo: relative destination path, e.g. ``"README.md"``.

        Returns:
            the path of the written file, as a string (the Hub returns the commit URL).
        """
        self._check_revision(revision, create_pr)
        repo_dir = self._existing_repo(repo_id, repo_type)
        rel = _clean_path_in_repo(path_in_repo, "path_in_repo", allow_root=False)
        if isinstance(path_or_fileobj, (str, os.PathLike)):
            src = Path(path_or_fileobj)
            if not src.is_file():
                raise ValueError(f"path_or_fileobj={str(src)!r} is not a file.")
            data = src.read_bytes()
        elif isinstance(path_or_fileobj, (bytes, bytearray)):
            data = bytes(path_or_fileobj)
        elif hasattr(path_or_fileobj, "read"):
            data = path_or_fileobj.read()
            if not isinstance(data, bytes):
                raise ValueError("path_or_fileobj must be opened in binary mode.")
        else:
            raise ValueError(
                f"path_or_fileobj must be a path, bytes or a binary file object, got {type(path_or_fileobj).__name__}."
            )
        dst = repo_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dst, data)
        return str(dst)

    @staticmethod
    def _replace_tree(repo_dir: Path, build: Any) -> None:
        """Copy ``repo_dir`` (hard links where possible) to a temporary sibling, let ``build`` edit the copy, then
        swap it in. On any error the live repo is untouched and the temporary folder is removed."""
        work = Path(tempfile.mkdtemp(prefix=f".{repo_dir.name}.upload-", dir=repo_dir.parent))
        try:
            new_dir, old_dir = work / "new", work / "old"
            shutil.copytree(repo_dir, new_dir, symlinks=True, copy_function=_link_or_copy)
            build(new_dir)
            os.rename(repo_dir, old_dir)
            try:
                os.rename(new_dir, repo_dir)
            except BaseException:
                os.rename(old_dir, repo_dir)
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ----------------------------------------------------------------------------------------------------------------------
# publish
# ----------------------------------------------------------------------------------------------------------------------


def _normalize_extra_files(
    extra_files: Mapping[str, str | os.PathLike] | Iterable[str | os.PathLike] | None,
) -> dict[str, Path]:
    """``{path_in_repo: local file}``; a list puts each file at the repo root under its own name."""
    if extra_files is None:
        return {}
    if isinstance(extra_files, (str, os.PathLike)):
        extra_files = [extra_files]
    if isinstance(extra_files, Mapping):
        pairs = [(_clean_path_in_repo(k, "extra_files key", allow_root=False), Path(v)) for k, v in extra_files.items()]
    else:
        pairs = [(Path(p).name, Path(p)) for p in extra_files]
    out: dict[str, Path] = {}
    for dest, src in pairs:
        if not src.is_file():
            raise ValueError(f"extra_files: {str(src)!r} is not a file.")
        if dest == _CARD_FILE:
            raise ValueError(f"extra_files may not contain {_CARD_FILE!r}: the model card is rendered by publish.")
        if dest in out:
            raise ValueError(f"extra_files: two files go to {dest!r}.")
        out[dest] = src
    return out


def _auto_map_modules(auto_map: Mapping[str, Any]) -> set[str]:
    """Module names (``"modeling_x"``) referenced by an ``auto_map``, skipping code hosted in other repos."""
    modules = set()
    for ref in auto_map.values():
        refs = ref if isinstance(ref, (list, tuple)) else [ref]
        for r in refs:
            if isinstance(r, str) and "--" not in r and "." in r:
                modules.add(r.rsplit(".", 1)[0])
    return modules


def _check_remote_code(stage: Path) -> tuple[dict[str, Any], list[str]]:
    """Check that every module named by an ``auto_map`` (and its relative imports) is staged.

    Returns:
        the staged ``config.json`` as a dict (``{}`` if absent) and the sorted remote-code files.
    """
    from transformers.dynamic_module_utils import get_relative_imports

    config: dict[str, Any] = {}
    needed: set[str] = set()
    for name in _CONFIG_FILES_WITH_AUTO_MAP:
        path = stage / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if name == "config.json":
            config = data
        needed |= _auto_map_modules(data.get("auto_map") or {})
    seen: set[str] = set()
    while needed:
        module = needed.pop()
        seen.add(module)
        file = stage / f"{module.replace('.', '/')}.py"
        if not file.is_file():
            raise ValueError(
                f"auto_map refers to {file.name!r}, which is not in the staged folder: register the classes with "
                "register_for_auto_class() so save_pretrained copies their code, or pass the file in extra_files."
            )
        needed |= set(get_relative_imports(file)) - seen
    return config, sorted(f"{m.replace('.', '/')}.py" for m in seen)


def _check_offline(api: Any) -> None:
    if isinstance(api, HfApi) and hf_constants.is_offline_mode():
        raise OfflineModeIsEnabled(
            "Cannot publish to the Hub: offline mode is enabled (HF_HUB_OFFLINE=1). Unset it, or pass "
            "api=LocalFolderApi(root) to publish into a local folder, or dry_run=True to only stage."
        )


def _move_into_place(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.rmdir()  # checked empty up-front
    os.rename(src, dst)


def publish(
    model: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    eval_results: Mapping[str, Any] | Sequence[Any] | str | os.PathLike | HarnessResults | None = None,
    base_model: str | Sequence[str] | None = None,
    tags: str | Sequence[str] | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    private: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    template: str | os.PathLike | None = None,
    description: str | None = None,
    example_cache: tuple[str, Mapping[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str | os.PathLike] | Iterable[str | os.PathLike] | None = None,
    save_kwargs: Mapping[str, Any] | None = None,
    api: Any = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    delete_patterns: list[str] | str | None = None,
    staging_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
) -> str:
    """Stage a checkpoint with its model card and upload it to a model repository.

    Staging (in a temporary folder): ``model.save_pretrained`` (with ``save_kwargs``; it also copies the remote-code
    files of classes registered with ``register_for_auto_class`` and writes their ``auto_map``),
    ``tokenizer.save_pretrained``, ``extra_files`` and ``README.md`` rendered by :func:`render_model_card`. Every
    module named by an ``auto_map`` must then be in the folder, else ``ValueError``. Then
    ``api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)`` and ``api.upload_folder(...)``.

    Nothing is created on the Hub, in ``api`` or in ``staging_dir`` before all arguments are checked and the folder
    is fully staged; the temporary folder is always removed, and ``staging_dir`` is only filled when the whole call
    succeeds. ``model.push_to_hub`` is not used, since it would replace
    the card.

    Args:
        model: anything with ``save_pretrained(dir, **kwargs)``: a ``PreTrainedModel``, a PEFT model, ...
        repo_id: ``"namespace/name"`` (or ``"name"``) of the model repository.
        tokenizer: optional tokenizer/processor with ``save_pretrained``; the usage snippet then loads it from
            ``repo_id`` (else from ``base_model``).
        eval_results: harness output: ``{"meta": ..., "rows": [...]}``, a list of rows, or a ``.json``/``.jsonl`` path
            (see :func:`load_harness_results`); becomes the card's ``model-index`` and evaluation table.
        base_model, tags, license, language: card metadata (``"hf-longmem"`` is always among the tags).
        private: visibility of the repository if it is created.
        commit_message: default ``"Upload <ModelClass> with hf_longmem"``.
        commit_description: optional longer commit description.
        template, description, example_cache, metadata: passed to :func:`render_model_card`.
        extra_files: more files to ship: a list of paths (copied to the repo root under their names) or a mapping
            ``{path_in_repo: local_path}``. They may not overwrite a file ``save_pretrained`` wrote, nor README.md.
        save_kwargs: keyword arguments of ``model.save_pretrained`` (e.g. ``max_shard_size``).
        api: ``HfApi``-like object with ``create_repo`` and ``upload_folder`` (e.g. :class:`LocalFolderApi`);
            default ``HfApi(token=token)``.
        token: Hub token for the default ``api`` (pass it to your own ``api`` object otherwise).
        revision, create_pr, delete_patterns: passed to ``upload_folder`` when set; e.g.
            ``delete_patterns="*.safetensors"`` removes shards of an older upload that this one does not replace.
        staging_dir: if given, the complete staged folder is kept there after a successful call (it must not exist
            or be an empty folder).
        dry_run: only stage (requires ``staging_dir``); ``api`` is not called.

    Returns:
        with ``dry_run``, the staging folder; otherwise what ``api.upload_folder`` returns as a string: the commit URL
        for ``HfApi`` (a ``CommitInfo``, which is a ``str``), the repo folder for :class:`LocalFolderApi`.

    Raises:
        ValueError: an invalid argument (named in the message), malformed ``eval_results``, or remote code missing.
        huggingface_hub.errors.OfflineModeIsEnabled: the default ``HfApi`` with ``HF_HUB_OFFLINE=1`` (raised before
            anything is staged).
    """
    # ---- validate everything before writing anything ----
    _check_repo_id(repo_id, "repo_id")
    if not callable(getattr(model, "save_pretrained", None)):
        raise ValueError(f"model must have a save_pretrained method (a PreTrainedModel), got {type(model).__name__}.")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ValueError(f"tokenizer must have a save_pretrained method, got {type(tokenizer).__name__}.")
    if not isinstance(private, bool):
        raise ValueError(f"private must be a bool, got {private!r}.")
    if commit_message is not None and (not isinstance(commit_message, str) or not commit_message.strip()):
        raise ValueError(f"commit_message must be a non-empty string, got {commit_message!r}.")
    harness = None
    if eval_results is not None and not (
        isinstance(eval_results, list) and eval_results and all(isinstance(r, EvalResult) for r in eval_results)
    ):
        harness = eval_results if isinstance(eval_results, HarnessResults) else load_harness_results(eval_results)
    extras = _normalize_extra_files(extra_files)
    save_kwargs = dict(save_kwargs or {})
    if "push_to_hub" in save_kwargs:
        raise ValueError("save_kwargs may not contain 'push_to_hub': publish uploads the staged folder itself.")
    if dry_run and staging_dir is None:
        raise ValueError("dry_run=True needs staging_dir: the folder where the staged repository is kept.")
    staging_path = Path(staging_dir) if staging_dir is not None else None
    if staging_path is not None and staging_path.exists():
        if not staging_path.is_dir() or any(staging_path.iterdir()):
            raise ValueError(f"staging_dir={str(staging_path)!r} must not exist or be an empty folder.")
    if api is None and not dry_run:
        api = HfApi(token=token)
    elif api is not None and token is not None:
        raise ValueError("token is only used for the default HfApi: pass it to your api object instead.")
    if not dry_run:
        for method in ("create_repo", "upload_folder"):
            if not callable(getattr(api, method, None)):
                raise ValueError(
                    f"api must have a {method} method (like huggingface_hub.HfApi), got {type(api).__name__}."
                )
        _check_offline(api)
    # Render once up-front with the model's in-memory config so template/metadata errors surface before staging.
    card_args = {
        "eval_results": harness if harness is not None else eval_results,
        "base_model": base_model,
        "tags": tags,
        "license": license,
        "language": language,
        "template": template,
        "description": description,
        "example_cache": example_cache,
        "metadata": metadata,
    }
    render_model_card(repo_id, config=getattr(model, "config", None), **card_args)

    # ---- stage ----
    created_parents: list[Path] = []
    if staging_path is not None:
        parent = staging_path.absolute().parent
        while not parent.exists():
            created_parents.append(parent)
            parent = parent.parent
        staging_path.absolute().parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{staging_path.name}.staging-", dir=staging_path.absolute().parent))
    else:
        work = Path(tempfile.mkdtemp(prefix="hf_longmem_publish_"))
    stage = work / "repo"
    kept = False
    try:
        stage.mkdir()
        model.save_pretrained(stage, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        for dest, src in extras.items():
            target = stage / dest
            if target.exists():
                raise ValueError(f"extra_files: {dest!r} would overwrite a file written by save_pretrained.")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        config, remote_files = _check_remote_code(stage)
        if (stage / _CARD_FILE).exists():
            logger.info("Replacing the README.md written by save_pretrained with the hf_longmem model card.")
        num_parameters = model.num_parameters() if callable(getattr(model, "num_parameters", None)) else None
        first_base = _as_str_list(base_model, "base_model")[:1]
        tokenizer_source = repo_id if tokenizer is not None else (first_base[0] if first_base else None)
        card = render_model_card(
            repo_id,
            config=config or getattr(model, "config", None),
            tokenizer_source=tokenizer_source,
            num_parameters=num_parameters,
            remote_code_files=remote_files,
            **card_args,
        )
        card.save(stage / _CARD_FILE)

        if dry_run:
            _move_into_place(stage, staging_path)
            kept = True
            return str(staging_path)

        # ---- upload ----
        if commit_message is None:
            commit_message = f"Upload {type(model).__name__} with hf_longmem"
        upload_kwargs: dict[str, Any] = {"commit_message": commit_message}
        if commit_description is not None:
            upload_kwargs["commit_description"] = commit_description
        if revision is not None:
            upload_kwargs["revision"] = revision
        if create_pr:
            upload_kwargs["create_pr"] = True
        if delete_patterns is not None:
            upload_kwargs["delete_patterns"] = delete_patterns
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        result = api.upload_folder(repo_id=repo_id, folder_path=str(stage), **upload_kwargs)
        if staging_path is not None:
            _move_into_place(stage, staging_path)
            kept = True
        return str(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not kept:
            for parent in created_parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
