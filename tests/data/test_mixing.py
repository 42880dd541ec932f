"""Several training files mixed: one after another, or interleaved until the first or the last runs
out (with weights), each file's rows and tokens as drawn reported by the audit."""

from __future__ import annotations

import random

import pytest

from chattune.config_io import build_config
from chattune.data.prepare import format_audit, prepare_data
from chattune.data.records import Record
from chattune.data.sources import mix_sources
from chattune.errors import ConfigError
from tests.data.test_prepare import data_args, write_jsonl


def records(name: str, count: int) -> list[Record]:
    return [Record([{"role": "user", "content": f"{name}{i}"}], source=f"{name}.jsonl:{i + 1}") for i in range(count)]


def names(rows: list[Record]) -> list[str]:
    return [row.messages[0]["content"] for row in rows]


def test_concat_keeps_every_row_in_file_order():
    mixed, drawn = mix_sources([records("a", 2), records("b", 3)])
    assert names(mixed) == ["a0", "a1", "b0", "b1", "b2"] and drawn == [2, 3]


def test_interleave_under_takes_turns_until_the_smallest_runs_out():
    mixed, drawn = mix_sources([records("a", 2), records("b", 5)], "interleave_under")
    assert names(mixed) == ["a0", "b0", "a1"] and drawn == [2, 1]


def test_interleave_over_takes_turns_until_each_has_run_out_repeating_the_smaller():
    mixed, drawn = mix_sources([records("a", 2), records("b", 5)], "interleave_over")
    assert names(mixed) == ["a0", "b0", "a1", "b1", "a0", "b2", "a1", "b3", "a0", "b4"]
    assert drawn == [5, 5]


def test_probabilities_draw_in_proportion_and_a_zero_weight_source_gives_nothing():
    big = [records("a", 3000), records("b", 3000), records("c", 5)]
    mixed, drawn = mix_sources(big, "interleave_under", [0.75, 0.25, 0.0], random.Random(1))
    assert drawn[2] == 0 and drawn[0] == 3000  # a runs out first: it is drawn three times as often
    assert drawn[1] == pytest.approx(1000, rel=0.1)
    over, over_drawn = mix_sources([records("a", 10), records("b", 40)], "interleave_over", [0.5, 0.5],
                                   random.Random(2))
    assert over_drawn[1] >= 40 and over_drawn[0] >= 10 and len(over) == sum(over_drawn)
    assert mix_sources([[], records("b", 2)], "interleave_under")[1] == [0, 2]  # an empty file is no source


def test_the_audit_reports_each_files_rows_and_tokens_as_drawn(tmp_path, char_tokenizer):
    small = write_jsonl(tmp_path / "small.jsonl", [{"instruction": f"s{i}", "output": "x"} for i in range(4)])
    large = write_jsonl(tmp_path / "large.jsonl", [{"instruction": f"large {i}", "output": "yy"} for i in range(20)])
    under = prepare_data(data_args(small, large, mix_strategy="interleave_under"), char_tokenizer,
                         "tutorial-alpaca", 42, cache_dir=tmp_path / "cache")
    files = under.audit["files"]
    assert [f["drawn"] for f in files] == [4, 3]  # turns: s, l, s, l, s, l, s (small ran out)
    sources = under.audit["train"]["sources"]
    assert [(s["rows"], s["path"]) for s in sources] == [(4, str(small)), (3, str(large))]
    assert sum(s["tokens"] for s in sources) == under.audit["train"]["tokens"]
    assert len(under.train) == 7
    text = format_audit(under.audit)
    assert "drawn into the mix: 4 rows" in text and f"from {large}: 3 rows" in text
    over = prepare_data(data_args(small, large, mix_strategy="interleave_over"), char_tokenizer,
                        "tutorial-alpaca", 42, cache_dir=tmp_path / "cache")
    assert [f["drawn"] for f in over.audit["files"]] == [20, 20] and len(over.train) == 40
    assert over.audit["fingerprint"] != under.audit["fingerprint"]
    plain = prepare_data(data_args(small, large), char_tokenizer, "tutorial-alpaca", 42, cache_dir=tmp_path / "cache")
    assert "drawn" not in plain.audit["files"][0] and len(plain.train) == 24
    assert [s["rows"] for s in plain.audit["train"]["sources"]] == [4, 20]


@pytest.mark.parametrize(("values", "message"), [
    ({"mix_strategy": "shuffle"}, "mix_strategy: expected one of"),
    ({"interleave_probs": "0.5,0.5"}, "interleave_probs: only with mix_strategy interleave_under or interleave_over"),
    ({"mix_strategy": "interleave_under", "interleave_probs": "1.0"}, "interleave_probs: 1 weights for 2 train_files"),
    ({"mix_strategy": "interleave_over", "interleave_probs": "0.5,-1"}, "interleave_probs: weights must be finite"),
    ({"mix_strategy": "interleave_over", "interleave_probs": "0,0"}, "interleave_probs: weights must be finite"),
])
def test_bad_mix_settings_name_their_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", "train_files": "a.json,b.json", **values})
