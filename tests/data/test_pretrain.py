"""Raw text for stage pretrain: documents into supervised rows, held out by content, audited,
cached, streamed; bad corpora rejected naming the file."""

from __future__ import annotations

import json

import pytest

from chattune.config import DataArgs, DataSource
from chattune.data.corpus import held_out
from chattune.data.formats import DataFileError
from chattune.data.pretrain import (
    document_rows,
    format_pretrain_audit,
    pack_stream,
    prepare_pretrain_data,
    stream_rows,
    streamed_data,
)
from chattune.errors import ConfigError, DataError


def _data(path, **overrides) -> DataArgs:
    values = {"train_files": [DataSource(path=str(path))], "max_seq_length": 16}
    values.update(overrides)
    return DataArgs(**values)


def test_each_document_ends_with_eos_and_a_long_one_is_split_not_dropped(char_tokenizer):
    rows = document_rows(["abc", "x" * 40], char_tokenizer, 16)
    eos = char_tokenizer.eos_token_id
    assert rows[0] == [[char_tokenizer.convert_tokens_to_ids(c) for c in "abc"] + [eos]]
    assert [len(r) for r in rows[1]] == [16, 16, 9]  # 40 characters + EOS in rows of 16
    assert sum(rows[1], [])[-1] == eos


def test_prepared_rows_supervise_every_token_and_the_audit_counts_them(char_tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first document\n\nsecond one here\n" + "y" * 50 + "\n")
    prepared = prepare_pretrain_data(_data(corpus), char_tokenizer, seed=0)
    rows = prepared.train[:]
    assert rows["input_ids"] == rows["labels"]
    train = prepared.audit["train"]
    assert (train["documents"], train["documents_split"], train["rows_out"]) == (3, 1, 2 + 4)
    assert train["tokens"] == len("first document") + len("second one here") + 50 + 3 == train["supervised_tokens"]
    assert prepared.audit["files"] == [{"path": str(corpus), "read": 4, "documents": 3, "empty": 1,
                                        "chars": 14 + 15 + 50}]
    report = format_pretrain_audit(prepared.audit)
    assert "documents 3 (1 split into several rows)" in report and "all supervised" in report


def test_paragraph_documents_and_joined_fields(char_tokenizer, tmp_path):
    text = tmp_path / "book.md"
    text.write_text("line one\nline two\n\n\nnext block\n")
    prepared = prepare_pretrain_data(_data(text, text_documents="paragraph", max_seq_length=64), char_tokenizer, 0)
    assert prepared.audit["train"]["documents"] == 2
    assert prepared.train[0]["input_ids"][:-1] == char_tokenizer("line one\nline two", add_special_tokens=False)[
        "input_ids"]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}]))
    prepared = prepare_pretrain_data(_data(alpaca, text_field=["instruction", "input", "output"],
                                           max_seq_length=64), char_tokenizer, 0)
    assert char_tokenizer.decode(prepared.train[0]["input_ids"][:-1]) == "say hi\nhi"


def test_held_out_documents_are_those_the_tokenizer_extension_holds_out(char_tokenizer, tmp_path):
    docs = [f"document number {i}" for i in range(200)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepared = prepare_pretrain_data(_data(corpus, eval_fraction=0.2, max_seq_length=64), char_tokenizer, 0)
    held = [d for d in docs if held_out(d, 0.2)]
    assert 0 < len(held) < 100
    assert prepared.audit["eval"]["documents"] == len(held)
    assert prepared.audit["train"]["documents"] == len(docs) - len(held)
    evaluated = {char_tokenizer.decode(row[:-1]) for row in prepared.eval[:]["input_ids"]}
    assert evaluated == set(held)


def test_the_cache_is_reused_and_depends_on_the_text_field(char_tokenizer, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "hello", "other": "world"}) + "\n")
    first = prepare_pretrain_data(_data(corpus), char_tokenizer, 0)
    again = prepare_pretrain_data(_data(corpus), char_tokenizer, 0)
    other = prepare_pretrain_data(_data(corpus, text_field=["other"]), char_tokenizer, 0)
    assert again.reused and again.fingerprint == first.fingerprint
    assert not other.reused and other.fingerprint != first.fingerprint


def test_streamed_rows_equal_the_prepared_ones_and_fill_blocks_in_order(char_tokenizer, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"doc {i} " + "z" * (i % 7) + "\n" for i in range(600)))
    data = _data(corpus)
    streamed = list(stream_rows(data, char_tokenizer))
    assert streamed == prepare_pretrain_data(data, char_tokenizer, 0).train[:]["input_ids"]
    blocks = list(pack_stream(iter(streamed), 16))
    assert [row for block in blocks for row in block] == streamed
    assert all(sum(map(len, block)) <= 16 for block in blocks)
    # a block closes only when the next row does not fit
    assert all(sum(map(len, a)) + len(b[0]) > 16 for a, b in zip(blocks, blocks[1:], strict=False))


def test_streaming_reads_lazily(char_tokenizer, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(300)) + "{broken\n")
    rows = stream_rows(_data(corpus), char_tokenizer)
    assert len(next(rows)) == len("doc 0") + 1  # the first batch of documents, not the broken line
    with pytest.raises(DataFileError, match=r"c\.jsonl:301"):
        list(rows)


def test_streamed_data_refuses_eval_fraction_and_encodes_eval_files(char_tokenizer, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    with pytest.raises(ConfigError, match="eval_fraction.*eval_files"):
        streamed_data(_data(corpus, streaming=True, eval_fraction=0.1), char_tokenizer, train=None)
    prepared = streamed_data(_data(corpus, streaming=True, eval_files=[DataSource(path=str(corpus))]),
                             char_tokenizer, train="stream")
    assert prepared.train == "stream" and len(prepared.eval) == 1
    assert prepared.audit["streaming"] is True
    assert "streaming 1 train files" in format_pretrain_audit(prepared.audit)


@pytest.mark.parametrize("content, match", [
    (b"", r"empty\.txt: 0 read"),
    (b"\n\n  \n", r"empty\.txt: 3 read, 3 empty"),
])
def test_a_corpus_without_text_is_an_error_naming_the_file(char_tokenizer, tmp_path, content, match):
    corpus = tmp_path / "empty.txt"
    corpus.write_bytes(content)
    with pytest.raises(DataError, match=match):
        prepare_pretrain_data(_data(corpus), char_tokenizer, 0)


def test_bad_corpus_files_name_the_file(char_tokenizer, tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02 binary")
    with pytest.raises(DataFileError, match=r"blob\.txt.*binary"):
        prepare_pretrain_data(_data(binary), char_tokenizer, 0)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\n" + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataFileError, match=r"latin\.txt:2: not UTF-8"):
        prepare_pretrain_data(_data(latin), char_tokenizer, 0)


def test_sft_only_source_options_are_refused(char_tokenizer, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("text\n")
    data = DataArgs(train_files=[DataSource(path=str(corpus), format="alpaca")])
    with pytest.raises(ConfigError, match=r"train_files: .*c\.txt: stage pretrain reads raw text"):
        prepare_pretrain_data(data, char_tokenizer, 0)
