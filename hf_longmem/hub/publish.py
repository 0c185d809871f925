"""``publish``: stage a checkpoint with its card, remote code and results, then create the repo and upload it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import OfflineModeIsEnabled

from .cards import _as_str_list, _check_repo_id, render_model_card
from .local_api import _clean_path_in_repo
from .results import HarnessResults, load_harness_results

logger = logging.getLogger(__name__)

_CARD_FILE = "README.md"
_CONFIG_FILES_WITH_AUTO_MAP = ("config.json", "tokenizer_config.json", "processor_config.json")


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
