"""The package's layering: no import cycles, no import from a lower layer to a higher one
(benchmarks/layout.py's LAYERS, on its ast import graph), and ``chattune --help`` without torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

LAYOUT_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "layout.py"


def _load_layout():
    spec = importlib.util.spec_from_file_location("chattune_layout", LAYOUT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


layout = _load_layout()


@pytest.fixture(scope="module")
def edges():
    return layout.import_edges()


def test_the_graph_is_read(edges):
    names = layout.modules()
    assert "chattune.cli" in names and "chattune.training.recipe" in names
    assert any(e.source == "chattune.cli" and e.target == "chattune.kb.cli" and not e.lazy for e in edges)
    assert any(e.source == "chattune.cli" and e.target == "chattune.training.recipe" and e.lazy for e in edges)


def test_every_module_has_a_layer():
    assert [m for m in layout.modules() if not _has_layer(m)] == []


def _has_layer(module: str) -> bool:
    try:
        layout.layer_of(module)
    except KeyError:
        return False
    return True


def test_no_import_cycles(edges):
    assert layout.cycles(edges, lazy=True) == []


def test_no_upward_imports(edges):
    found = [f"{e.source} -> {e.target}{' (lazy)' if e.lazy else ''} at {e.where()}"
             for e in layout.upward(edges)]
    assert found == []


def test_the_checks_catch_a_cycle_and_an_upward_edge(tmp_path):
    package = tmp_path / "chattune"
    (package / "kb").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("from chattune.kb import store\n")
    (package / "config.py").write_text("def f():\n    from . import errors\n")
    (package / "kb" / "__init__.py").write_text("")
    (package / "kb" / "store.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from chattune import config\n"
        "from .. import errors\n")
    edges = layout.import_edges(package)
    assert {(e.source, e.target, e.lazy) for e in edges} == {
        ("chattune.errors", "chattune.kb.store", False), ("chattune.config", "chattune.errors", True),
        ("chattune.kb.store", "chattune.errors", False)}
    assert layout.cycles(edges, lazy=False) == [["chattune.errors", "chattune.kb.store"]]
    assert [(e.source, e.target) for e in layout.upward(edges)] == [("chattune.errors", "chattune.kb.store")]


def test_help_imports_no_torch():
    code = ("import sys\nfrom chattune.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: chattune" in proc.stdout
