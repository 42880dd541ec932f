"""examples/alpaca: the held-out split every input row lands in once, and the Gemma config as
chattune reads it (the measured result on Gemma 3 270M is in the README)."""

from __future__ import annotations

import json
from pathlib import Path

from chattune.config_io import load_config
from tests.serve.helpers import example_modules

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "alpaca"


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_split_holds_out_a_tenth_of_each_language_and_keeps_every_row(shared_data, tmp_path, capsys):
    with example_modules(EXAMPLE, "split_alpaca") as (split,):
        split.main(["--data", str(shared_data), "--out", str(tmp_path)])
        again = split.split_rows(read(shared_data / "alpaca_en_demo.json"), 0.1, 0)
    data = tmp_path / "data"
    for language, name in (("en", "alpaca_en_demo.json"), ("zh", "alpaca_zh_demo.json")):
        rows = read(shared_data / name)
        train, heldout = read(data / f"train_{language}.json"), read(data / f"heldout_{language}.json")
        assert len(heldout) == round(len(rows) / 10) and len(train) + len(heldout) == len(rows)
        keys = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows]
        assert sorted(keys) == sorted(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in train + heldout)
    assert read(data / "heldout_en.json") == again[1]  # seeded: the same rows every time
    assert "999 rows -> " in capsys.readouterr().out


def test_the_config_trains_both_languages_with_the_alpaca_template(tmp_path):
    config = load_config(EXAMPLE / "gemma3_lora.yaml", [f"model_name_or_path={tmp_path}"])
    sources = {Path(s.path).name: s.max_samples for s in config.data.train_files}
    assert sources == {"train_en.json": 100, "train_zh.json": 100}
    assert config.data.template == "alpaca" and config.method.method == "lora"
