"""Every Python package folder is listed in pyproject's explicit `packages` (a normal install would drop it)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {name: Path(path) for name, path in config["package-dir"].items()}
    found = set()
    for top, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((top, *relative)))
    assert found <= listed, f"not listed in pyproject packages: {sorted(found - listed)}"
