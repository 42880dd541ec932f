"""The generated fictional world of examples/kb/fiction.py, for the tests: ``from tests.kb.world
import fiction``. It is loaded from its file as the module ``fiction``, the name the example
scripts (examples/kb) import it by, so a test and the scripts share one module and one ``Fact``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "examples" / "kb" / "fiction.py"


def _load():
    loaded = sys.modules.get("fiction")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == PATH:
        return loaded
    spec = importlib.util.spec_from_file_location("fiction", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fiction"] = module  # before running it: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fiction = _load()
