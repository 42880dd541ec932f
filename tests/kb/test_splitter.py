"""The Chinese-aware recursive splitter: golden chunks, overlap, limits, settings errors."""

from __future__ import annotations

import pytest

from chattune.errors import ConfigError
from chattune.kb.splitter import CHUNK_OVERLAP, CHUNK_SIZE, SplitterSettings, split_text


def test_defaults_are_langchain_chatchat_02s():
    assert (CHUNK_SIZE, CHUNK_OVERLAP) == (250, 50)
    assert SplitterSettings().to_json() == {"splitter": "chinese-recursive", "chunk_size": 250,
                                            "chunk_overlap": 50}


def test_short_text_is_one_chunk():
    assert split_text("  青岚港由渔夫林墨创建。\n") == ["青岚港由渔夫林墨创建。"]


def test_chinese_sentences_and_paragraphs_with_overlap():
    text = "第一段第一句。第一段第二句！第一段第三句？\n\n第二段。"
    assert split_text(text, SplitterSettings(20, 8)) == [
        "第一段第一句。第一段第二句！",
        "第一段第二句！第一段第三句？\n\n第二段。",
    ]


def test_english_sentences_split_after_punctuation_and_space_only():
    text = "Hello world. Version 3.5 is fine! Is it? Yes."
    assert split_text(text, SplitterSettings(20, 0)) == [
        "Hello world.", "Version 3.5 is fine!", "Is it? Yes."]


def test_paragraphs_before_lines_before_sentences():
    text = "Alpha one. Alpha two.\nAlpha three.\n\nBeta one. Beta two."
    assert split_text(text, SplitterSettings(40, 0)) == [
        "Alpha one. Alpha two.\nAlpha three.", "Beta one. Beta two."]


def test_hard_cut_keeps_exact_size_and_overlap():
    chunks = split_text("abcdefghijklmnopqrstuvwxyz", SplitterSettings(10, 3))
    assert chunks == ["abcdefghij", "hijklmnopq", "opqrstuvwx", "vwxyz"]


def test_every_chunk_fits_and_is_a_slice_of_the_text():
    text = ("澜州风物志。" * 30 + "\n" + "The Reach is wide. " * 40 + "\n\n" + "长" * 600)
    settings = SplitterSettings(250, 50)
    chunks = split_text(text, settings)
    assert all(len(c) <= 250 for c in chunks)
    assert all(c in text for c in chunks)
    for before, after in zip(chunks, chunks[1:], strict=False):
        shared = max(n for n in range(0, 51) if before.endswith(after[:n]))
        assert 0 < shared <= 50  # each chunk starts with the end of the one before


def test_hard_cut_of_a_long_chinese_run():
    text = "".join(chr(0x4E00 + i) for i in range(600))  # 600 ideographs, no punctuation
    assert split_text(text) == [text[0:250], text[200:450], text[400:600]]


def test_repeated_identical_neighbours_are_kept_once():
    assert split_text("长" * 600) == ["长" * 250, "长" * 200]


def test_settings_errors_name_the_setting():
    with pytest.raises(ConfigError, match=r"chunk_overlap: expected 0 <= overlap < chunk_size \(100\), got 100"):
        SplitterSettings(100, 100)
    with pytest.raises(ConfigError, match="chunk_size: expected a positive number"):
        SplitterSettings(0, 0)


def test_blank_text_gives_no_chunks():
    assert split_text(" \n\n \t") == []
