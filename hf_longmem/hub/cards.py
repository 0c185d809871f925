"""Model cards rendered from the templates of :mod:`hf_longmem.model_cards`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .results import (
    HarnessResults,
    _cell,
    _human_count,
    eval_results_from_harness,
    eval_table_markdown,
    load_harness_results,
)

LIBRARY_TAG = "hf-longmem"
#: Cache names that denote the uncompressed baseline in harness rows (never chosen for the usage example).
BASELINE_CACHES = frozenset({"none", "dynamic", "full", "dense", "baseline"})
#: Cache shown in the usage snippet when neither ``example_cache`` nor a compressed evaluated cache is given.
DEFAULT_EXAMPLE_CACHE: tuple[str, dict[str, Any]] = ("snapkv", {"budget": 512})


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
