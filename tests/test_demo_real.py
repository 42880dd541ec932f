"""``chattune demo --model``: the real-model demo's data (nothing held out is taught), its table
and its run folder, on a tiny model (plumbing only; on SmolLM2 it is marked ``real`` and ``slow``,
and its measured table is in the README)."""

from __future__ import annotations

import json
import re

import pytest

from chattune import demo_real
from chattune.cli import main


def test_no_held_out_question_is_taught():
    taught = {q for q, _ in demo_real.TAUGHT_IDENTITY} | set(demo_real.TAUGHT_GENERAL)
    assert not taught & set(demo_real.HELD_OUT_IDENTITY + demo_real.HELD_OUT_GENERAL)
    assert all(demo_real.NAME in answer for _, answer in demo_real.TAUGHT_IDENTITY)


def test_the_demo_trains_on_the_base_models_own_answers_and_prints_its_table(tiny_models, tmp_path, capsys):
    model = tiny_models("llama")
    assert main(["demo", "--model", str(model), "--workdir", str(tmp_path), "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"identity: says its new name 'Lumi' +\d+/10 +\d+/10", out), out
    assert re.search(r"general: says the name \(must not\) +\d+/12 +\d+/12", out), out
    assert re.search(r"general: loss of the base model`s own answers +\d+\.\d{3} +\d+\.\d{3}", out), out
    general = json.loads((tmp_path / "data" / "general_train.json").read_text())
    assert [row["instruction"] for row in general] == demo_real.TAUGHT_GENERAL
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert "chattune chat " + str(tmp_path / "run") in out


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_learns_its_new_name_without_saying_it_elsewhere(tmp_path):
    from chattune.pretrained import FetchError, fetch

    try:
        model = fetch("smollm2")
    except FetchError as exc:
        pytest.skip(f"SmolLM2 cannot be fetched: {exc}")
    result = demo_real.run_real_demo(str(model), str(tmp_path), log=lambda *_: None)
    assert result["before"]["identity_named"] == 0 and result["after"]["identity_named"] >= 9
    assert result["after"]["general_named"] <= 1
    assert result["after"]["general_loss"] < 1.5 * result["before"]["general_loss"]
