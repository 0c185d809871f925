"""Writing files so that nothing is lost: atomic replacement with the permissions the user's umask asks for.

Every result, edit, checkpoint or card file of the package goes through :func:`atomic_write`: the content is written to
a temporary file in the destination's folder, flushed to disk, given the mode a plain ``open(path, "w")`` would give
(``0o666 & ~umask``: ``mkstemp`` creates ``0600``), and renamed over the destination. A reader sees the old file or
the new one, never a half-written one, and a crash leaves no temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "check_writable", "default_file_mode"]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Writes ``path`` by calling ``write(tmp_path)`` on a temporary file of the same folder, then renaming it.

    Creates the parent folders. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Checks, before any work, that a file can be written at ``path``; raises ``ValueError`` naming ``what``.

    The path must not be a folder, its nearest existing ancestor must be a writable folder (missing folders are
    created on writing), and a temporary file is created and removed there to be sure (permissions, read-only
    mounts, quotas of zero).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; give a file name")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be created: {str(ancestor)!r} is not a folder")
    probe_dir = path.parent if path.parent.exists() else ancestor
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=probe_dir)
    except OSError as error:
        raise ValueError(f"{what} {str(path)!r} cannot be written: {error.strerror or error}") from None
    os.close(fd)
    os.unlink(probe)
    return path
