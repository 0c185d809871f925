"""The Hub API shape :func:`~hf_longmem.hub.publish` uses, and :class:`LocalFolderApi`: the same calls into a local folder
(dry runs, tests, air-gapped publishing)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from hf_longmem.files import atomic_write_bytes

from .cards import _check_repo_id


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
