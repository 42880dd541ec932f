"""Raw text corpora for continued pre-training: documents and where they start from each file
type, text fields joined, every input unit counted, lazy reading, one-line errors naming file
and line, the content-hashed held-out split, and the real demo corpora (../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.data.corpus import (
    TEXT_SUFFIXES,
    CorpusCounts,
    Document,
    check_corpus_file,
    held_out,
    iter_documents,
)
from chattune.data.formats import DataFileError
from chattune.errors import ChattuneError, ConfigError


def docs(path: Path, **kwargs) -> list[tuple[str, str]]:
    """(text, source) of every document, the source's path shortened to the file name."""
    return [(d.text, d.source.replace(str(path), path.name))
            for d in iter_documents(path, **kwargs)]


def write_jsonl(path: Path, values) -> Path:
    path.write_text("".join(json.dumps(v) + "\n" for v in values), encoding="utf-8")
    return path


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
]


def test_text_suffixes():
    assert TEXT_SUFFIXES == (".txt", ".text", ".md")


def test_text_line_mode(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbffirst line\nsecond line\r\n\n   \nlast, no newline")
    counts = CorpusCounts(str(path))
    assert docs(path, counts=counts) == [
        ("first line", "c.txt:1"), ("second line", "c.txt:2"), ("last, no newline", "c.txt:5"),
    ]
    assert counts.to_json() == {"path": str(path), "read": 5, "documents": 3, "empty": 2,
                                "chars": len("first line") + len("second line")
                                + len("last, no newline")}


@pytest.mark.parametrize("suffix", [".text", ".md", ".TXT"])
def test_other_text_suffixes(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_text("# Title\nbody\n", encoding="utf-8")
    assert [d.text for d in iter_documents(path)] == ["# Title", "body"]


def test_text_paragraph_mode(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n\nPara one, line one.\nPara one, line two.\n\n\n  \n\t\n"
                    "Para two.\n\nPara three,\n  indented.\n\n\n\n", encoding="utf-8")
    counts = CorpusCounts(str(path))
    assert docs(path, text_documents="paragraph", counts=counts) == [
        ("Para one, line one.\nPara one, line two.", "p.txt:3"),
        ("Para two.", "p.txt:9"),
        ("Para three,\n  indented.", "p.txt:11"),
    ]
    assert (counts.read, counts.documents, counts.empty) == (3, 3, 0)


def test_jsonl_with_blank_and_empty_rows(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n   \n{"text": "  "}\n{"text": null}\n'
                    '{"text": "two", "url": "x"}\n', encoding="utf-8")
    counts = CorpusCounts(str(path))
    assert docs(path, counts=counts) == [("one", "c.jsonl:1"), ("two", "c.jsonl:6")]
    # the two blank lines are not rows; the whitespace and null texts are empty documents
    assert (counts.read, counts.documents, counts.empty, counts.chars) == (4, 2, 2, 6)
    assert counts.read == counts.documents + counts.empty


def test_json_array(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"content": "alpha"}, {"content": ""}, {"content": "beta\ngamma"}],
                               indent=2), encoding="utf-8")
    counts = CorpusCounts(str(path))
    assert docs(path, text_field="content", counts=counts) == [
        ("alpha", "c.json:row 1"), ("beta\ngamma", "c.json:row 3"),
    ]
    assert (counts.read, counts.documents, counts.empty) == (3, 2, 1)


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "c.json", [{"text": "one"}, {"text": "two"}])
    assert docs(path) == [("one", "c.json:1"), ("two", "c.json:2")]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "c.parquet"
    table = pa.table({"id": [1, 2, 3, 4], "text": ["one", None, "three", " "]})
    pq.write_table(table, path, row_group_size=2)
    counts = CorpusCounts(str(path))
    assert docs(path, counts=counts) == [("one", "c.parquet:row 1"), ("three", "c.parquet:row 3")]
    assert (counts.read, counts.documents, counts.empty) == (4, 2, 2)


def test_text_field_list_joins_alpaca_fields(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA), encoding="utf-8")
    assert docs(path, text_field=["instruction", "input", "output"]) == [
        ("Add the numbers.\n2 and 3\n5", "alpaca.json:row 1"),
        ("Name a colour.\nBlue.", "alpaca.json:row 2"),
    ]


def test_text_field_list_allows_some_fields_missing(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "Only this."},
                                              {"output": "And this.", "input": None}])
    assert [d.text for d in iter_documents(path, text_field=["instruction", "input", "output"])] \
        == ["Only this.", "And this."]


def test_counts_invariant_and_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    counts = CorpusCounts(str(path))
    assert list(iter_documents(path, counts=counts)) == []
    assert (counts.read, counts.documents, counts.empty) == (0, 0, 0)

    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\t\n", encoding="utf-8")
    counts = CorpusCounts(str(blank))
    assert list(iter_documents(blank, counts=counts)) == []
    assert (counts.read, counts.documents, counts.empty) == (3, 0, 3)


def test_counts_advance_with_the_iterator(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": ""}, {"text": "b"}])
    counts = CorpusCounts(str(path))
    documents = iter_documents(path, counts=counts)
    assert counts.read == 0
    assert next(documents) == Document("a", f"{path}:1")
    assert (counts.read, counts.documents) == (1, 1)
    assert next(documents).text == "b"
    assert (counts.read, counts.documents, counts.empty) == (3, 2, 1)


def test_reading_is_lazy(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n', encoding="utf-8")
    documents = iter_documents(path)
    assert next(documents).text == "one"
    with pytest.raises(DataFileError, match=r"c\.jsonl:3:\d+: malformed JSON: Expecting value"):
        list(documents)


def test_non_utf8_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine\nbad \xff byte\nfine again\n")
    documents = iter_documents(path)
    assert next(documents).text == "fine"
    with pytest.raises(DataFileError, match=r"c\.txt:2: not UTF-8 text \(.*byte offset 9\); "
                                            r"expected a UTF-8 text corpus"):
        next(documents)


def test_non_utf8_json_array(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b'[\n{"text": "ok"},\n{"text": "\xff"}\n]\n')
    with pytest.raises(DataFileError, match=r"c\.json:3: not UTF-8 text"):
        list(iter_documents(path))


@pytest.mark.parametrize("name", ["c.txt", "c.jsonl"])
def test_binary_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes("text".encode("utf-16-le"))
    with pytest.raises(DataFileError, match=rf"{name}: looks binary \(a NUL byte at offset 1\); "
                                            "expected UTF-8 text"):
        list(iter_documents(path))


def test_missing_field_lists_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"content": "x", "url": "y"}])
    with pytest.raises(DataFileError, match=r"c\.jsonl:2: no field 'text'; "
                                            r"the row has keys 'content', 'url'"):
        list(iter_documents(path))
    with pytest.raises(DataFileError, match=r"c\.jsonl:1: none of the fields 'instruction', "
                                            r"'output'; the row has keys 'text'"):
        list(iter_documents(path, text_field=["instruction", "output"]))


def test_row_not_an_object(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('[{"text": "ok"}, "just a string"]', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"c\.json:row 2: expected an object with field "
                                            r"'text', got a string"):
        list(iter_documents(path))


def test_non_string_field(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"text": ["a", "b"]}])
    with pytest.raises(DataFileError, match=r"c\.jsonl:2: field 'text' is an array; "
                                            r"expected a string"):
        list(iter_documents(path))


def test_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["a"], "url": ["b"]}), path)
    with pytest.raises(DataFileError, match=r"c\.parquet: no column 'text'; "
                                            r"the file has columns 'content', 'url'"):
        list(iter_documents(path))


def test_parquet_non_string_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DataFileError, match=r"c\.parquet:row 1: field 'text' is a number"):
        list(iter_documents(path))


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_text("not parquet", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"c\.parquet: not a readable Parquet file"):
        list(iter_documents(path))


def test_json_not_an_array_or_lines(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('"a string"', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"c\.json: starts with '\"'; expected a JSON array"):
        list(iter_documents(path))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"c\.csv: unknown corpus file type \.csv; "
                                            r"expected \.txt, \.text, \.md, \.jsonl, \.json "
                                            r"or \.parquet"):
        iter_documents(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataFileError, match=r"nope\.txt: no such file"):
        check_corpus_file(path)
    with pytest.raises(DataFileError, match=r"nope\.txt: no such file"):
        list(iter_documents(path))


def test_folder_path(tmp_path):
    folder = tmp_path / "corpus.txt"
    folder.mkdir()
    with pytest.raises(DataFileError, match=r"corpus\.txt: is a directory; expected a corpus file"):
        list(iter_documents(folder))


def test_bad_settings(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"text_documents: expected 'line' or 'paragraph', "
                                          r"got 'sentence'"):
        iter_documents(path, text_documents="sentence")
    with pytest.raises(ConfigError, match=r"text_field"):
        iter_documents(path, text_field=[])


def test_errors_are_chattune_errors():
    assert issubclass(DataFileError, ChattuneError)
    assert issubclass(ConfigError, ChattuneError)


def test_held_out_is_deterministic_by_content():
    texts = [f"document number {i}" for i in range(2000)]
    first = [held_out(t, 0.1) for t in texts]
    assert first == [held_out(t, 0.1) for t in texts]
    assert [held_out(t, 0.1) for t in reversed(texts)] == first[::-1]
    assert 0.07 <= sum(first) / len(texts) <= 0.13
    assert not any(held_out(t, 0) for t in texts)
    assert all(held_out(t, 1) for t in texts[:50])
    # a larger fraction keeps everything a smaller one held out
    assert all(held_out(t, 0.2) for t, out in zip(texts, first, strict=True) if out)
    with pytest.raises(ConfigError):
        held_out("x", 1.5)


def test_real_corpora(shared_data):
    wiki, c4 = shared_data / "wiki_demo.txt", shared_data / "c4_demo.jsonl"
    if not (wiki.is_file() and c4.is_file()):
        pytest.skip(f"demo corpora not found in {shared_data}")
    counts = CorpusCounts(str(wiki))
    assert len(list(iter_documents(wiki, counts=counts))) == 30
    assert counts.read == counts.documents + counts.empty
    counts = CorpusCounts(str(c4))
    documents = list(iter_documents(c4, text_field="text", counts=counts))
    assert len(documents) == 300
    assert documents[0].source == f"{c4}:1"
    assert (counts.read, counts.documents, counts.empty) == (300, 300, 0)
