"""Every example config parses, and its method plans on a tiny model of the same shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from chattune.cli import main
from chattune.config_io import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_parses_and_dry_runs(path, tiny_models, capsys):
    config = load_config(path)
    assert config.train.output_dir
    overrides = [f"model_name_or_path={tiny_models('llama')}", "trust_remote_code=false"]
    if config.method.method == "full":
        overrides.append("optim=adamw_torch")
    assert main(["train", str(path), *overrides, "--dry-run"]) == 0
    assert f"method     {config.method.method}:" in capsys.readouterr().out


def test_there_is_an_example_per_method():
    methods = {load_config(p).method.method for p in EXAMPLES}
    assert {"lora", "qlora", "freeze", "ptuning", "full"} <= methods
