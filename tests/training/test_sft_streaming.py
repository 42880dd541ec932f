"""``streaming: true`` for stage sft: conversation rows read, converted and encoded as training
takes them, each the row data preparation makes (same input_ids and labels), in file order and
again from the first file after the last; bad rows counted as they are met and the counts in
the audit; a resumed run ends as the uninterrupted one; only the rows trained on are read."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.config import DataArgs, DataSource
from chattune.config_io import load_config
from chattune.data.formats import DataFileError
from chattune.data.prepare import prepare_data
from chattune.data.run_data import prepare_for_config
from chattune.data.stream import ConversationStream, check_streamable, streamed_sft_data
from chattune.errors import ConfigError, DataError
from chattune.training.distributed import World
from chattune.training.recipe import prepare_sft, train
from chattune.training.trainer import dataloader_workers
from tests.data.toolcall_rows import toolcall_rows


def write_jsonl(path: Path, values) -> Path:
    path.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values), encoding="utf-8")
    return path


def alpaca(i: int) -> dict:
    return {"instruction": f"question {i}: what is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}."}


def make_config(model: Path, data: Path, out: Path, **overrides):
    values = {
        "model_name_or_path": str(model), "train_files": [str(data)], "streaming": True,
        "max_seq_length": 64, "lora_rank": 4, "lora_dropout": 0.0, "output_dir": str(out),
        "per_device_train_batch_size": 2, "max_steps": 4, "save_steps": 2, "logging_steps": 1,
        "learning_rate": 1e-2, "seed": 3, "report_to": ["none"],
    }
    values.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()])


def _quiet(*_):
    pass


@pytest.fixture
def mixed_files(tmp_path) -> list[Path]:
    """A JSON Lines file of ShareGPT tool-call rows (broken rows and a duplicate among them) and
    a JSON array of Alpaca rows, some long enough to be truncated or dropped, one empty."""
    tools = write_jsonl(tmp_path / "tools.jsonl", toolcall_rows(60)[0])
    rows = [{"instruction": f"q {i}", "output": "answer " * (i * 8)} for i in range(12)]
    rows += [{"instruction": "x" * 400, "output": "y"}, {"neither": "format"}]
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(rows))
    return [tools, array]


def data_args(paths, **overrides) -> DataArgs:
    values = {"train_files": [DataSource(str(p)) for p in paths], "max_seq_length": 300, "streaming": True}
    values.update(overrides)
    return DataArgs(**values)


# -- rows, counts, laziness (no model) ---------------------------------------------------------


def test_a_pass_gives_the_prepared_rows_in_file_order_and_the_same_counts(char_tokenizer, mixed_files):
    data = data_args(mixed_files)
    prepared = prepare_data(data, char_tokenizer, "default", 42, log=_quiet)
    stream = ConversationStream(data, char_tokenizer, "default")
    rows = list(stream.one_pass())
    assert [r["input_ids"] for r in rows] == prepared.train["input_ids"]
    assert [r["labels"] for r in rows] == prepared.train["labels"]
    audit = stream.audit()
    assert audit["files"] == prepared.audit["files"]  # read, skipped with reasons, duplicated
    assert audit["train"] == prepared.audit["train"]  # kept, truncated, dropped with reasons, tokens
    train = audit["train"]  # the data exercises every way a row can go
    assert train["rows_truncated"] and train["rows_dropped"] and train["rows_with_tools"]
    assert all(f["skipped"] for f in audit["files"]) and audit["files"][0]["duplicated"]


def test_rows_are_read_only_as_they_are_taken(char_tokenizer, tmp_path):
    path = tmp_path / "big.jsonl"
    write_jsonl(path, [alpaca(i) for i in range(2000)])
    with path.open("ab") as handle:
        handle.write(b'{"instruction": "caf\xe9"}\n')  # not UTF-8: an error only once it is read
    stream = ConversationStream(data_args([path]), char_tokenizer, "default")
    rows = stream.rows()
    taken = list(itertools.islice(rows, 5))
    assert len(taken) == 5
    assert stream.audit()["stream"] == {"passes": 0, "rows_read": 5, "rows_encoded": 5, "rows_kept": 5}
    with pytest.raises(DataFileError, match=r"big\.jsonl: not UTF-8 text"):
        list(itertools.islice(rows, 5000))


def test_the_files_are_read_again_when_training_needs_more_rows(char_tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [alpaca(0), alpaca(1), {"broken": True}])
    second = write_jsonl(tmp_path / "b.jsonl", [alpaca(2), alpaca(0)])  # alpaca(0): a duplicate
    stream = ConversationStream(data_args([first, second]), char_tokenizer, "default")
    rows = list(itertools.islice(stream.rows(), 7))
    assert rows[3:6] == rows[:3] and rows[6] == rows[0]  # 3 rows a pass; duplicates looked for per pass
    audit = stream.audit()
    assert audit["stream"]["passes"] == 2
    assert [(f["read"], f["skipped"], f["duplicated"]) for f in audit["files"]] == [(7, 2, 0), (4, 0, 2)]


def test_a_stream_without_rows_fails_before_training(char_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"neither": "format"}] * 3)
    with pytest.raises(DataError, match=r"train_files: no training rows left .*bad\.jsonl: 3 rows read, 3 skipped"):
        streamed_sft_data(data_args([path]), char_tokenizer, "default", 42, train=None, log=_quiet)


def test_eval_files_are_encoded_up_front(char_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [alpaca(i) for i in range(4)])
    data = data_args([path], eval_files=[DataSource(str(path))])
    prepared = streamed_sft_data(data, char_tokenizer, "default", 42, train="rows", log=_quiet)
    assert prepared.train == "rows" and len(prepared.eval) == 4
    assert prepared.eval["input_ids"] == prepare_data(data, char_tokenizer, "default", 42).eval["input_ids"]
    assert prepared.audit["streaming"] is True and prepared.audit["train"] is None


@pytest.mark.parametrize("overrides, key", [
    ({"eval_fraction": 0.1}, "eval_fraction"),
    ({"mix_strategy": "interleave_under"}, "mix_strategy"),
    ({"packing": "pack"}, "packing"),
    ({"packing": "padding_free"}, "packing"),
])
def test_what_needs_a_whole_file_first_is_refused_naming_the_key(tmp_path, overrides, key):
    path = write_jsonl(tmp_path / "t.jsonl", [alpaca(0)])
    with pytest.raises(ConfigError, match=f"^{key}: "):
        check_streamable(data_args([path, path], **overrides))


@pytest.mark.parametrize("source, key", [({"max_samples": 3}, "max_samples"), ({"weight": 2.0}, "weight")])
def test_sampling_a_file_is_refused_naming_the_key(tmp_path, source, key):
    path = write_jsonl(tmp_path / "t.jsonl", [alpaca(0)])
    with pytest.raises(ConfigError, match=f"^{key}: .*t\\.jsonl"):
        check_streamable(DataArgs(train_files=[DataSource(str(path), **source)], streaming=True))


def test_streaming_is_for_sft_and_pretrain_and_is_not_prepared(tiny_models, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [alpaca(0)])
    config = make_config(tiny_models("llama"), path, tmp_path / "o")
    with pytest.raises(ConfigError, match="^streaming: streamed data is read while training"):
        prepare_for_config(config)
    with pytest.raises(ConfigError, match="streaming: rows with images are not streamed"):
        prepare_sft(config, None, "default", World(), _quiet, vision=object())
    with pytest.raises(ConfigError, match="streaming: .* not stage dpo"):
        make_config(tiny_models("llama"), path, tmp_path / "o", stage="dpo")


def test_a_stream_is_read_in_the_training_process():
    # each loader worker would read the whole stream again, and its counts would be lost
    assert dataloader_workers(3, streamed=True) == dataloader_workers(None, streamed=True) == 0


# -- training ---------------------------------------------------------------------------------


def test_a_streamed_run_trains_reading_only_the_rows_it_takes(tiny_models, tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [alpaca(i) for i in range(3000)] + [{"broken": 1}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [alpaca(i) for i in range(4)])
    result = train(make_config(tiny_models("llama"), path, tmp_path / "run", max_steps=3, save_steps=2,
                               eval_files=[str(evaluation)], eval_steps=3), log=_quiet)
    assert result.global_step == 3 and result.eval_loss is not None
    audit = json.loads((result.output_dir / "data_audit.json").read_text())
    assert audit["streaming"] is True and audit["batching"]["mode"] == "stream"
    read = audit["files"][0]["read"]
    assert 6 <= read <= 8  # 3 steps of 2 rows (and the batch the loader reads ahead), not 3000
    assert audit["train"]["rows_out"] == read == audit["stream"]["rows_kept"]
    assert audit["eval"]["rows_out"] == 4
    saved = json.loads((result.output_dir / "checkpoint-2" / "data_audit.json").read_text())
    assert saved["files"][0]["read"] < read  # each checkpoint holds the counts as it was saved


def test_a_resumed_run_ends_as_the_uninterrupted_one(tiny_models, tmp_path):
    # 5 rows and a bad one: the 8 steps of 2 rows read the file three times over
    path = write_jsonl(tmp_path / "small.jsonl", [alpaca(i) for i in range(5)] + [{"broken": 1}])
    whole = train(make_config(tiny_models("llama"), path, tmp_path / "whole", max_steps=8, save_steps=4),
                  log=_quiet)
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(whole.output_dir / "checkpoint-4", out / "checkpoint-4")
    resumed = train(make_config(tiny_models("llama"), path, out, max_steps=8, save_steps=4,
                                resume_from_checkpoint="true"), log=_quiet)
    assert resumed.global_step == 8
    expected = load_file(str(whole.output_dir / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    audits = [json.loads((folder / "data_audit.json").read_text()) for folder in (whole.output_dir, out)]
    assert [(a["files"], a["train"], a["stream"]) for a in audits[1:]] == [
        (audits[0]["files"], audits[0]["train"], audits[0]["stream"])]
    assert audits[0]["stream"]["passes"] >= 3 and audits[0]["files"][0]["skipped"] >= 3
