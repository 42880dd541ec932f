"""Data files that are not on this disk: fsspec URLs (tested with ``memory://`` and ``file://``)
and hub data sets (offline here: one line saying so), read and counted as local files are."""

from __future__ import annotations

import json

import fsspec
import pytest

from chattune.data.prepare import prepare_data
from chattune.data.remote import is_remote, localized
from chattune.errors import DataError
from tests.data.test_prepare import alpaca, data_args, write_jsonl


def test_what_counts_as_remote():
    assert is_remote("s3://bucket/train.jsonl") and is_remote("memory://x.json") and is_remote("hub:tatsu-lab/alpaca")
    assert is_remote("hf://datasets/owner/name/train.json") and is_remote("file:///tmp/x.json")
    assert not is_remote("data/train.json") and not is_remote("/abs/train.jsonl") and not is_remote("C:data.json")


def test_a_memory_url_trains_like_the_same_local_file(tmp_path, char_tokenizer):
    rows = [alpaca(i) for i in range(6)]
    with fsspec.open("memory://bucket/remote-train.jsonl", "w") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows) + json.dumps({"instruction": "no answer"}) + "\n")
    said = []
    remote = prepare_data(data_args("memory://bucket/remote-train.jsonl"), char_tokenizer, "tutorial-alpaca", 42,
                          cache_dir=tmp_path / "cache", log=said.append)
    local = prepare_data(data_args(write_jsonl(tmp_path / "remote-train.jsonl", rows)), char_tokenizer,
                         "tutorial-alpaca", 42, cache_dir=tmp_path / "cache2")
    assert remote.train["input_ids"] == local.train["input_ids"]
    files = remote.audit["files"][0]
    assert (files["read"], files["kept"], files["skipped"]) == (7, 6, 1)  # the bad line counted, not lost
    assert any(line.startswith("train_files[0]: memory://bucket/remote-train.jsonl -> ") for line in said)
    with fsspec.open("memory://bucket/remote-train.jsonl", "w") as handle:
        handle.write(json.dumps(alpaca(99)) + "\n")
    again = prepare_data(data_args("memory://bucket/remote-train.jsonl"), char_tokenizer, "tutorial-alpaca", 42,
                         cache_dir=tmp_path / "cache", log=said.append)
    assert not again.reused and len(again.train) == 1  # a changed remote file is encoded again


def test_a_file_url_and_eval_files_are_fetched_too(tmp_path, char_tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [alpaca(i) for i in range(4)])
    held = write_jsonl(tmp_path / "e.jsonl", [alpaca(i) for i in range(10, 12)])
    data = data_args(f"file://{train}", eval_paths=[f"file://{held}"])
    prepared = prepare_data(data, char_tokenizer, "tutorial-alpaca", 42, cache_dir=tmp_path / "cache",
                            log=lambda _: None)
    assert len(prepared.train) == 4 and len(prepared.eval) == 2
    assert localized(data_args(train), tmp_path) == data_args(train)  # nothing remote: unchanged


def test_unreachable_sources_are_one_line_naming_the_key(tmp_path, char_tokenizer, monkeypatch):
    with pytest.raises(DataError, match=r"^train_files\[0\]: memory://nowhere/x.jsonl: cannot be read"):
        prepare_data(data_args("memory://nowhere/x.jsonl"), char_tokenizer, "tutorial-alpaca", 42,
                     cache_dir=tmp_path / "cache", log=lambda _: None)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        prepare_data(data_args("hub:no-such-owner/no-such-set"), char_tokenizer, "tutorial-alpaca", 42,
                     cache_dir=tmp_path / "cache", log=lambda _: None)
    message = str(caught.value)
    assert message.startswith("train_files[0]: hub:no-such-owner/no-such-set: cannot be loaded: the hub cannot be "
                              "reached (offline)") and "\n" not in message
