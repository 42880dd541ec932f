"""Fixtures of the export tests: tiny models converted to GGUF once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from chattune.export.gguf import write_gguf


@pytest.fixture(scope="session")
def ggufs(tiny_models, tmp_path_factory):
    """arch -> (model folder, its f16 GGUF), converted once per session."""
    out = tmp_path_factory.mktemp("gguf")
    made: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in made:
            model = tiny_models(arch)
            made[arch] = (model, write_gguf(model, out / f"{arch}.f16.gguf", "f16"))
        return made[arch]

    return get
