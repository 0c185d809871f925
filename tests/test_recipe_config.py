"""recipes/_config.py: YAML + command-line settings shared by the training recipes."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from _config import parse_recipe_config  # noqa: E402


@dataclass
class Settings:
    name: str = "x"
    steps: int = 1
    rate: float = 0.5
    flag: bool = False
    lengths: list = field(default_factory=lambda: [1])


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nrate: 0.25\nlengths: [3, 4]\n")
    config, args = parse_recipe_config(Settings, ["--config", str(path), "--rate", "0.125", "--flag", "yes"], "d")
    assert (config.steps, config.rate, config.flag, config.lengths, config.name) == (7, 0.125, True, [3, 4], "x")
    assert args.config == path


def test_extra_list_option_replaces_the_yaml_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lengths: [3, 4]\n")

    def options(parser):
        parser.add_argument("--lengths", type=int, nargs="+", default=None)

    config, _ = parse_recipe_config(Settings, ["--config", str(path), "--lengths", "9"], "d", options, ("lengths",))
    assert config.lengths == [9]


def test_unknown_yaml_key_and_bad_boolean_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("step: 7\n")
    with pytest.raises(ValueError, match="unknown keys.*step"):
        parse_recipe_config(Settings, ["--config", str(path)], "d")
    with pytest.raises(SystemExit):
        parse_recipe_config(Settings, ["--flag", "maybe"], "d")


def test_no_config_gives_the_defaults():
    config, _ = parse_recipe_config(Settings, [], "d")
    assert config == Settings()


def test_fields_annotated_with_types_are_overridable():
    """Without ``from __future__ import annotations`` the field types are classes, not strings: still scalars."""
    plain = make_dataclass("Plain", [("steps", int, 1), ("flag", bool, False), ("name", str, "x")])
    config, _ = parse_recipe_config(plain, ["--steps", "5", "--flag", "true", "--name", "y"], "d")
    assert (config.steps, config.flag, config.name) == (5, True, "y")
