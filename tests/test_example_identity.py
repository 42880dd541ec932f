"""examples/identity: the data it writes (held-out questions never in training, every identity
row filled and kept), its config as chattune reads it, and its table on a tiny run (plumbing
only: the measured result on SmolLM2 is in the README)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chattune.config_io import load_config
from tests.serve.helpers import example_modules, train_example

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "identity"


@pytest.fixture(scope="module")
def example():
    """examples/identity's two scripts as modules: (make_identity_data, ask_identity)."""
    with example_modules(EXAMPLE, "make_identity_data", "ask_identity") as modules:
        yield modules


@pytest.fixture(scope="module")
def data(example, shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("identity")
    example[0].main(["--out", str(out), "--data", str(shared_data)])
    return out / "data"


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_data_fills_every_identity_row_and_holds_the_questions_out(data, example):
    english, chinese = read(data / "identity_en.json"), read(data / "identity_zh.json")
    general, heldout = read(data / "general_train.json"), read(data / "general_heldout.json")
    assert (len(english), len(chinese), len(general), len(heldout)) == (16, 75, 100, 60)
    text = json.dumps(english + chinese, ensure_ascii=False)
    assert "{{name}}" not in text and "{{author}}" not in text
    assert text.count("Mira") == 77 and "Lumen Labs" in text  # the 77 answers that name {{name}}
    taught = {row["instruction"] for row in english + chinese + general}
    questions = read(data / "identity_questions.json") + read(data / "general_questions.json")
    assert len(questions) == 38 and not taught & set(questions)
    assert not {json.dumps(r, sort_keys=True) for r in general} & {json.dumps(r, sort_keys=True) for r in heldout}


def test_a_held_out_question_found_in_training_is_refused(example, shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(example[0], "IDENTITY_QUESTIONS", ["Who are you?"])
    with pytest.raises(SystemExit, match="held-out questions found in the training data: \\['Who are you\\?'\\]"):
        example[0].main(["--out", str(tmp_path), "--data", str(shared_data)])


def test_the_config_weights_the_english_rows(data, tmp_path):
    config = load_config(EXAMPLE / "identity_lora.yaml", [f"model_name_or_path={tmp_path}"])
    weights = {Path(source.path).name: source.weight for source in config.data.train_files}
    assert weights == {"identity_en.json": 3, "identity_zh.json": 1, "general_train.json": 1}
    assert config.data.template == "auto" and config.method.method == "lora"


def test_the_table_compares_the_run_with_its_base(example, data, tiny_models, tmp_path, capsys):
    run = train_example(EXAMPLE / "identity_lora.yaml", tiny_models("llama"), data / "identity_en.json",
                        tmp_path, batch=4, steps=2)
    example[1].main([str(run), "--data", str(data), "--max-new-tokens", "4", "--answers", str(tmp_path / "a.json")])
    table = capsys.readouterr().out
    assert re.search(r"^base +\d+/18 \(\d+%\) +\d+/10 +\d+/8 +\d+/20 +\d+\.\d{3}$", table, re.M), table
    assert re.search(r"^run +\d+/18 \(\d+%\) +\d+/10 +\d+/8 +\d+/20 +\d+\.\d{3}$", table, re.M), table
    assert "eval loss change:" in table
    answers = read(tmp_path / "a.json")
    assert set(answers) == {"base", "run"} and len(answers["run"]["identity"]) == 18
