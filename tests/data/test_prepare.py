"""prepare_data: the cache, the audit, and every way the data can leave nothing to train on.

Runs on the one-character-per-token tokenizer of conftest.py (no chat template), so
token counts are character counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.config import DataArgs, DataSource
from chattune.data.formats import DataFileError
from chattune.data.prepare import data_fingerprint, format_audit, prepare_data
from chattune.data.records import RecordError
from chattune.errors import ChattuneError, ConfigError, DataError, ModelLoadError


def write_jsonl(path: Path, values) -> Path:
    path.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values), encoding="utf-8")
    return path


def alpaca(i: int) -> dict:
    return {"instruction": f"question {i}", "output": f"answer {i}"}


def data_args(*paths, eval_paths=(), **kwargs) -> DataArgs:
    return DataArgs(train_files=[DataSource(str(p)) for p in paths],
                    eval_files=[DataSource(str(p)) for p in eval_paths], **kwargs)


def prepare(data: DataArgs, tokenizer, template: str = "tutorial-alpaca", **kwargs):
    return prepare_data(data, tokenizer, template, 42, **kwargs)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def good(tmp_path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", [alpaca(i) for i in range(10)])


# --------------------------------------------------------------------------- valid data


class TestValid:
    def test_encodes_audits_and_reuses_the_cache(self, good, char_tokenizer):
        first = prepare(data_args(good), char_tokenizer)
        assert not first.reused and len(first.train) == 10 and first.eval is None
        assert first.audit["train"]["rows_in"] == first.audit["train"]["rows_out"] == 10
        assert first.audit["files"][0]["kept"] == 10
        prompt = "### Instruction:\nquestion 0\n\n### Response:\n"
        assert char_tokenizer.decode(first.train[0]["input_ids"]) == prompt + "answer 0\nEND\n</s>"
        again = prepare(data_args(good), char_tokenizer)
        assert again.reused and again.fingerprint == first.fingerprint
        assert again.audit == first.audit
        assert list(again.train["input_ids"]) == list(first.train["input_ids"])
        forced = prepare(data_args(good), char_tokenizer, force=True)
        assert not forced.reused and forced.fingerprint == first.fingerprint
        assert "[train] rows in 10, out 10" in format_audit(forced.audit)

    def test_eval_fraction_holds_out_rows(self, good, char_tokenizer):
        prepared = prepare(data_args(good, eval_fraction=0.2), char_tokenizer)
        assert (len(prepared.train), len(prepared.eval)) == (8, 2)

    def test_all_duplicates_leave_one_row_and_are_counted(self, tmp_path, char_tokenizer):
        path = write_jsonl(tmp_path / "dup.jsonl", [alpaca(0)] * 4)
        prepared = prepare(data_args(path, eval_fraction=0.5), char_tokenizer)
        assert len(prepared.train) == 1 and prepared.eval is None  # one record: nothing to hold out
        assert prepared.audit["files"][0]["duplicated"] == 3

    def test_the_fingerprint_follows_the_bytes(self, good, char_tokenizer):
        before = data_fingerprint(data_args(good), "tutorial-alpaca", char_tokenizer, 42)
        assert before == data_fingerprint(data_args(good), "tutorial-alpaca", char_tokenizer, 42)
        assert before != data_fingerprint(data_args(good), "default", char_tokenizer, 42)
        write_jsonl(good, [alpaca(i) for i in range(11)])
        assert before != data_fingerprint(data_args(good), "tutorial-alpaca", char_tokenizer, 42)

    @pytest.mark.parametrize("damage", ["audit not json", "audit of another set", "no train folder"])
    def test_a_damaged_cache_entry_is_rebuilt(self, good, char_tokenizer, damage):
        import shutil

        first = prepare(data_args(good), char_tokenizer)
        if damage == "audit not json":
            (first.cache_path / "audit.json").write_text("{oops")
        elif damage == "audit of another set":
            (first.cache_path / "audit.json").write_text(json.dumps({"fingerprint": "other"}))
        else:
            shutil.rmtree(first.cache_path / "train")
        again = prepare(data_args(good), char_tokenizer)
        assert not again.reused and len(again.train) == 10
        assert json.loads((again.cache_path / "audit.json").read_text())["fingerprint"] == first.fingerprint


# --------------------------------------------------------------------------- long data


class TestLongData:
    def test_a_multi_megabyte_row_is_cut_in_characters_first_and_the_audit_says_how_many(
            self, tiny_models, tmp_path, monkeypatch, capsys):
        """A 16 MB single-line row: the tokenizer never sees more than a few KB of it, the row is
        cut to max_seq_length in about a second (its whole text tokenized takes 10 s and more
        here), and the audit counts the characters the cut left out."""
        import time

        from transformers import PreTrainedTokenizerFast

        from chattune.model import load_tokenizer

        tokenizer = load_tokenizer(str(tiny_models("glm4")))
        big = "the river city is the capital 北京 你好 123 " * 400_000
        path = write_jsonl(tmp_path / "big.jsonl", [{"instruction": "Summarise", "input": big, "output": "A city."},
                                                    alpaca(1), alpaca(2)])
        assert path.stat().st_size > 16_000_000
        seen = []
        call = PreTrainedTokenizerFast.__call__

        def spy(self, text, *args, **kwargs):
            seen.append(max(map(len, text)) if isinstance(text, list) else len(text))
            return call(self, text, *args, **kwargs)

        monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", spy)
        capsys.readouterr()
        started = time.perf_counter()
        prepared = prepare(data_args(path, max_seq_length=128), tokenizer)
        elapsed = time.perf_counter() - started
        assert max(seen) < 20_000 and elapsed < 8, (max(seen), elapsed)
        train = prepared.audit["train"]
        assert (train["rows_in"], train["rows_out"], train["rows_truncated"]) == (3, 3, 1)
        row = next(ids for ids in prepared.train["input_ids"] if len(ids) == 128)
        kept = tokenizer.decode(row).split("### Input:\n")[1].split("\n\n### Response:")[0]
        assert big.startswith(kept) and len(kept) > 100
        assert train["chars_cut"] == len(big) - len(kept)
        assert train["most_cut"] == {"source": f"{path}:1", "chars_cut": len(big) - len(kept)}
        cut = f"{len(big) - len(kept):,}"
        assert (f"[train] rows in 3, out 3, truncated 1 ({cut} characters cut; the most from one row: {cut}, "
                f"{path}:1), dropped 0") in format_audit(prepared.audit)
        assert capsys.readouterr().err == ""  # a second: nothing to report on the way

    def test_a_long_preparation_says_how_far_it_is(self, tmp_path, char_tokenizer, monkeypatch):
        """Progress lines (here every 0 s, 4 rows at a time): reading, each split's rows, the end."""
        import re

        from chattune.data import prepare as module

        monkeypatch.setattr(module, "PROGRESS_SECONDS", 0.0)
        monkeypatch.setattr(module, "PROGRESS_ROWS", 4)
        path = write_jsonl(tmp_path / "d.jsonl", [alpaca(i) for i in range(10)])
        lines = []
        prepare(data_args(path, eval_fraction=0.2), char_tokenizer, log=lines.append)
        assert [re.sub(r",? (in )?\d+ s$", "", line) for line in lines] == [
            "data: read 10/10 rows (100%)", "data: encoding train 4/8 rows (50%)",
            "data: encoding train 8/8 rows (100%)", "data: encoding eval 2/2 rows (100%)",
            "data: read, encoded and cached 8 train and 2 eval rows"]

    def test_a_small_data_set_prints_nothing_new(self, good, char_tokenizer, capsys):
        prepare(data_args(good), char_tokenizer)
        assert capsys.readouterr() == ("", "")

    def test_progress_lines_wait_their_time(self):
        from chattune.data.prepare import Progress

        now, lines = [100.0], []
        progress = Progress(lines.append, every=5, clock=lambda: now[0])
        for seconds, done in ((1, 1000), (4.9, 2000), (5.0, 3000), (9.9, 4000), (10.0, 5000)):
            now[0] = 100 + seconds
            progress.rows("encoding train", done, 10_000)
        assert lines == ["data: encoding train 3,000/10,000 rows (30%), 5 s",
                         "data: encoding train 5,000/10,000 rows (50%), 10 s"]
        quick = Progress(lines.append, every=5, clock=lambda: now[0])
        quick.finished("done")  # 0 s and no line before: nothing
        assert len(lines) == 2
        progress.finished("read, encoded and cached 1 train and 0 eval rows")
        assert lines[-1] == "data: read, encoded and cached 1 train and 0 eval rows in 10 s"


# --------------------------------------------------------------------------- nothing to train on


class TestNoRows:
    def test_no_train_files_is_a_config_error(self, char_tokenizer):
        with pytest.raises(ConfigError, match="^train_files: no training data given; set train_files"):
            prepare(DataArgs(), char_tokenizer)

    @pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("empty.json", "  \n"),
                                           ("empty.csv", ""), ("header.csv", "instruction,output\n")])
    def test_a_file_without_rows(self, tmp_path, char_tokenizer, name, text):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError) as info:
            prepare(data_args(path), char_tokenizer)
        assert one_line(info) == (f"train_files: no training rows left after reading and encoding: {path}: "
                                  "no rows (empty file, or a CSV with a header only)")

    def test_every_row_bad_names_the_reasons_and_the_first_error(self, tmp_path, char_tokenizer):
        path = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}, {"instruction": "q", "output": 3}, None])
        with pytest.raises(DataError) as info:
            prepare(data_args(path), char_tokenizer)
        message = one_line(info)
        assert message.startswith(f"train_files: no training rows left after reading and encoding: {path}: "
                                  "3 rows read, 3 skipped (")
        assert "1 x unknown format" in message and "1 x expected a string" in message
        assert "1 x expected a JSON object" in message
        assert f"first error: {path}:1: unknown format: keys ['foo']" in message

    def test_strict_stops_at_the_first_bad_row_instead(self, tmp_path, char_tokenizer):
        path = write_jsonl(tmp_path / "bad.jsonl", [alpaca(0), {"foo": 1}])
        with pytest.raises(RecordError, match=f"^{path}:2: unknown format"):
            prepare(data_args(path, strict=True), char_tokenizer)

    def test_a_csv_without_header(self, tmp_path, char_tokenizer):
        path = tmp_path / "noheader.csv"
        path.write_text("question 1,answer 1\nquestion 2,answer 2\n")
        with pytest.raises(DataError) as info:
            prepare(data_args(path), char_tokenizer)
        assert f"{path}: 1 row read, 1 skipped (1 x unknown format)" in one_line(info)
        assert "keys ['answer 1', 'question 1']" in str(info.value)

    def test_a_column_map_naming_missing_columns(self, good, char_tokenizer):
        data = DataArgs(train_files=[DataSource(str(good), columns={"prompt": "content", "response": "summary"})])
        with pytest.raises(DataError) as info:
            prepare(data, char_tokenizer)
        message = one_line(info)
        assert "10 rows read, 10 skipped (10 x missing or empty column 'content' (mapped to prompt))" in message
        assert f"first error: {good}:1: missing or empty column 'content' (mapped to prompt)" in message

    def test_max_seq_length_too_small_for_the_templates_markers(self, good, char_tokenizer):
        with pytest.raises(DataError) as info:
            prepare(data_args(good, max_seq_length=20), char_tokenizer)
        assert one_line(info) == (
            f"train_files: no training rows left after reading and encoding: {good}: 10 rows read; "
            "all 10 rows were dropped at encoding (10 x prompt fills max_seq_length: no answer token "
            "would remain) with max_seq_length=20; raise max_seq_length or choose a template with "
            "shorter markers"
        )

    def test_weights_that_sample_everything_out(self, good, char_tokenizer):
        data = DataArgs(train_files=[DataSource(str(good), weight=0.01)])
        with pytest.raises(DataError, match=f"{good}: 10 rows read, 10 sampled out"):
            prepare(data, char_tokenizer)

    def test_eval_fraction_holding_out_every_record(self, tmp_path, char_tokenizer):
        path = write_jsonl(tmp_path / "two.jsonl", [alpaca(0), alpaca(1)])
        with pytest.raises(DataError) as info:
            prepare(data_args(path, eval_fraction=0.9), char_tokenizer)
        assert one_line(info) == (f"eval_fraction: 0.9 holds out all 2 training records of ['{path}'], "
                                  "leaving none to train on; lower eval_fraction, add data, or give eval_files")

    @pytest.mark.parametrize("content", ["", json.dumps({"foo": 1}) + "\n"])
    def test_eval_files_without_a_usable_row(self, good, tmp_path, char_tokenizer, content):
        bad = tmp_path / "eval.jsonl"
        bad.write_text(content)
        with pytest.raises(DataError, match=f"^eval_files: no evaluation rows left after reading and encoding: {bad}: "):
            prepare(data_args(good, eval_paths=[bad]), char_tokenizer)


# --------------------------------------------------------------------------- files, tokenizer, cache


class TestUnusable:
    def test_train_files_pointing_to_a_directory(self, tmp_path, char_tokenizer):
        with pytest.raises(DataFileError, match=f"^{tmp_path}: is a directory; expected a data file"):
            prepare(data_args(tmp_path), char_tokenizer)

    def test_missing_eval_file(self, good, tmp_path, char_tokenizer):
        missing = tmp_path / "eval.jsonl"
        with pytest.raises(DataFileError, match=f"^{missing}: no such file"):
            prepare(data_args(good, eval_paths=[missing]), char_tokenizer)

    def test_binary_garbage(self, tmp_path, char_tokenizer):
        path = tmp_path / "data.json"
        path.write_bytes(bytes(range(128, 256)) * 8)
        with pytest.raises(DataFileError, match=f"^{path}: not UTF-8 text"):
            prepare(data_args(path), char_tokenizer)

    def test_json_with_a_top_level_number(self, tmp_path, char_tokenizer):
        path = tmp_path / "n.json"
        path.write_text("42")
        with pytest.raises(DataFileError, match=f"^{path}: expected a JSON array or object, got int"):
            prepare(data_args(path), char_tokenizer)

    def test_a_tokenizer_without_eos(self, good, char_tokenizer):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(char_tokenizer.backend_tokenizer.to_str()), bos_token="<s>"
        )
        with pytest.raises(ModelLoadError, match="has no EOS token"):
            prepare(data_args(good), tokenizer)

    def test_template_tokenizer_without_a_chat_template(self, good, char_tokenizer):
        from chattune.templates.pieces import TemplateError

        with pytest.raises(TemplateError, match="has no chat template; choose a named template"):
            prepare(data_args(good), char_tokenizer, template="tokenizer")

    def test_cache_dir_that_is_a_file(self, good, tmp_path, char_tokenizer):
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        with pytest.raises(ConfigError) as info:
            prepare(data_args(good, cache_dir=str(blocker)), char_tokenizer)
        assert one_line(info) == (f"cache_dir: cannot write the encoded data set to {blocker}/datasets "
                                  "(from cache_dir): Not a directory; set cache_dir to a writable folder")

    def test_chattune_cache_that_is_a_file(self, good, tmp_path, char_tokenizer, monkeypatch):
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        monkeypatch.setenv("CHATTUNE_CACHE", str(blocker))
        with pytest.raises(ConfigError, match=r"\(from \$CHATTUNE_CACHE\)"):
            prepare(data_args(good), char_tokenizer)

    def test_every_failure_here_is_a_chattune_error(self):
        for cls in (ConfigError, DataError, ModelLoadError, DataFileError, RecordError):
            assert issubclass(cls, ChattuneError)
