"""The README stays true: its config reference lists every key, its commands exist."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from chattune.cli import build_parser
from chattune.config import GROUPS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_config_reference_lists_every_key():
    for cls in GROUPS.values():
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in README, field.name


def test_config_reference_is_current():
    """Regenerate with: chattune train --help-config --markdown"""
    from chattune.config_io import describe_keys

    assert describe_keys(markdown=True) in README


def test_the_two_commands_are_there_and_match_ci():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "pip install -e . && chattune demo" in README
    assert 'python -m pytest -m "not slow and not gpu"' in README
    assert 'python -m pytest -m "not slow and not gpu"' in ci


def test_every_subcommand_in_the_readme_exists():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    for command in ("data", "train", "chat", "predict", "tiny-model", "demo", "convert", "fetch", "serve", "eval", "report",
                    "export", "templates"):
        assert command in choices and f"chattune {command}" in README
