"""Extending a tokenizer (chattune.vocab.extend): every base token keeps its id, new tokens
take the ids after them, ASCII text encodes as before, Chinese text takes fewer tokens and
still round-trips, each new token records the base pieces it joins; byte-level and
sentencepiece-style BPE; refusals of tokenizers that cannot be extended."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from chattune.errors import ConfigError
from chattune.vocab.extend import (
    EXTENSION_NAME,
    compare_tokenizers,
    default_keep,
    learn_extension,
    read_extension,
    save_extended,
)

SP = "\u2581"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- byte-level BPE (GPT-2 style), the tiny llama model's tokenizer ---------------------------


@pytest.fixture(scope="module")
def base(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models("llama"))


@pytest.fixture(scope="module")
def byte_level(base, zh_train, tmp_path_factory):
    """(extension, extended tokenizer, its folder) learned with add=100 from the Chinese corpus."""
    extension = learn_extension(base, zh_train, 100)
    out = tmp_path_factory.mktemp("byte-level-extended")
    extended = save_extended(base, extension, out, {"base": "tiny-llama", "note": "from a test"})
    return extension, extended, out


def test_byte_level_keeps_every_base_token_and_id(base, byte_level):
    _, extended, _ = byte_level
    base_vocab, new_vocab = base.get_vocab(), extended.get_vocab()
    assert {token: new_vocab.get(token) for token in base_vocab} == base_vocab
    assert extended.eos_token == base.eos_token and extended.eos_token_id == base.eos_token_id
    assert extended.pad_token_id == base.pad_token_id


def test_byte_level_new_ids_follow_the_base(base, byte_level):
    extension, extended, folder = byte_level
    record = read_extension(folder)
    added = record["added"]
    assert 0 < added <= 100
    assert len(extension.tokens) == added
    assert len(extended) == len(base) + added
    new_ids = [entry["id"] for entry in record["new_tokens"]]
    assert new_ids == list(range(len(base), len(base) + added))
    new_vocab = extended.get_vocab()
    assert sorted(i for t, i in new_vocab.items() if t not in base.get_vocab()) == new_ids
    assert extended.convert_ids_to_tokens(new_ids) == [e["token"] for e in record["new_tokens"]]


def test_byte_level_record_file(byte_level):
    extension, _, folder = byte_level
    file = folder / EXTENSION_NAME
    assert file.is_file()
    record = json.loads(file.read_text(encoding="utf-8"))
    assert record == read_extension(folder)
    assert record["base"] == "tiny-llama" and record["note"] == "from a test"  # the caller's fields kept
    assert record["kind"] == "byte_level"
    assert record["added"] == len(record["new_tokens"]) == len(extension.tokens)
    for entry, token, text in zip(record["new_tokens"], extension.tokens, extension.texts, strict=True):
        assert set(entry) == {"id", "token", "text", "base_ids"}
        assert entry["token"] == token and entry["text"] == text
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()


def test_read_extension_of_a_plain_folder_is_none(tiny_models, tmp_path):
    assert read_extension(tiny_models("llama")) is None
    assert read_extension(tmp_path / "missing") is None


def test_byte_level_base_ids_spell_each_new_token(base, byte_level):
    _, _, folder = byte_level
    for entry in read_extension(folder)["new_tokens"]:
        pieces = entry["base_ids"]
        assert len(pieces) >= 2, entry
        assert all(0 <= i < len(base) for i in pieces), entry
        # byte-level spelling: a token may be part of a UTF-8 sequence, so compare spellings
        assert "".join(base.convert_ids_to_tokens(pieces)) == entry["token"], entry
        if "\ufffd" not in entry["text"]:  # a whole-character token: its text is what the pieces decode to
            assert base.decode(pieces) == entry["text"], entry


def test_byte_level_new_tokens_hold_non_ascii_text(byte_level):
    extension, _, _ = byte_level
    assert extension.texts and all(default_keep(text) for text in extension.texts)
    assert any(len(text) >= 2 and "\ufffd" not in text for text in extension.texts)  # whole words learned


def test_byte_level_ascii_text_encodes_as_before(base, byte_level, english):
    _, extended, _ = byte_level
    for text in english:
        assert ids(extended, text) == ids(base, text), text
        assert extended(text)["input_ids"] == base(text)["input_ids"], text


def test_byte_level_chinese_takes_fewer_tokens_and_round_trips(base, byte_level, zh_held):
    _, extended, _ = byte_level
    for text in zh_held:
        new = ids(extended, text)
        assert len(new) < len(ids(base, text)), text
        assert extended.decode(new) == text
        assert any(i >= len(base) for i in new)


def test_byte_level_base_merges_come_first(base, byte_level):
    extension, _, folder = byte_level
    before = json.loads(base.backend_tokenizer.to_str())["model"]["merges"]
    after = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert after[:len(before)] == before
    assert len(after) == len(before) + len(extension.merges)


@pytest.mark.parametrize("add", [1, 5])
def test_add_limits_the_new_tokens(base, zh_train, add, tmp_path):
    extension = learn_extension(base, zh_train, add)
    assert len(extension.tokens) == add  # the corpus has far more candidates than that
    extended = save_extended(base, extension, tmp_path / "out", {})
    assert len(extended) == len(base) + add
    assert read_extension(tmp_path / "out")["added"] == add


def test_save_extended_drops_slow_tokenizer_files(base, zh_train, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("vocab.json", "merges.txt", "tokenizer.model"):
        (out / stale).write_text("stale", encoding="utf-8")
    save_extended(base, learn_extension(base, zh_train[:50], 3), out, {})
    assert not any((out / stale).exists() for stale in ("vocab.json", "merges.txt", "tokenizer.model"))
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "vocab_file" not in config and "merges_file" not in config


def test_min_frequency(base):
    once = ["x 龘"]  # a rare character: its base pieces meet once
    assert learn_extension(base, once, 10).tokens == []
    assert learn_extension(base, once, 10, min_frequency=1).tokens
    assert learn_extension(base, once * 2, 10).tokens
    assert learn_extension(base, once * 2, 10, min_frequency=3).tokens == []


def test_corpus_counts_and_no_text(base, zh_train):
    extension = learn_extension(base, zh_train[:30], 5)
    assert extension.corpus_documents == 30
    assert extension.corpus_chars == sum(len(t) for t in zh_train[:30])
    empty = learn_extension(base, [], 5)
    assert (empty.tokens, empty.corpus_documents, empty.corpus_chars) == ([], 0, 0)


def test_english_corpus_learns_nothing_under_default_keep(base, english):
    corpus = english * 5 + ["Tokenizers tokenize tokenized tokenization."] * 5
    assert learn_extension(base, corpus, 20).tokens == []


def test_keep_everything_learns_ascii_tokens_that_change_ascii_text(base, english, tmp_path):
    corpus = ["Tokenizers tokenize tokenized tokenization, zyxwvut zyxwvut."] * 5
    extension = learn_extension(base, corpus, 20, keep=lambda text: True)
    assert extension.tokens and any(text.isascii() for text in extension.texts)
    extended = save_extended(base, extension, tmp_path / "out", {})
    comparison = compare_tokenizers(base, extended, corpus)
    assert comparison.ascii_texts == 5 and comparison.ascii_changed == 5
    assert comparison.ratio > 1


# --- compare_tokenizers, default_keep -----------------------------------------------------------


def test_compare_tokenizers_counts(base, byte_level, zh_held, english):
    _, extended, _ = byte_level
    texts = zh_held + english
    result = compare_tokenizers(base, extended, texts)
    assert result.texts == len(texts)
    assert result.chars == sum(len(t) for t in texts)
    assert result.tokens_before == sum(len(ids(base, t)) for t in texts)
    assert result.tokens_after == sum(len(ids(extended, t)) for t in texts)
    assert result.ascii_texts == len(english)
    assert result.ascii_changed == 0
    assert result.changed == len(zh_held)
    report = result.to_json()
    assert report["texts"] == len(texts) and report["ascii_texts"] == len(english)
    assert report["ascii_texts_changed"] == 0 and report["texts_encoded_differently"] == len(zh_held)
    assert report["tokens_per_char_after"] < report["tokens_per_char_before"]

    chinese = compare_tokenizers(base, extended, zh_held)
    assert chinese.ratio > 1 and chinese.to_json()["ratio"] > 1
    assert chinese.ascii_texts == 0

    ascii_only = compare_tokenizers(base, extended, english)
    assert ascii_only.ratio == 1.0 and ascii_only.changed == 0


def test_compare_no_texts(base):
    result = compare_tokenizers(base, base, [])
    assert (result.texts, result.chars, result.ratio) == (0, 0, 0.0)
    assert result.to_json()["tokens_per_char_before"] == 0.0


@pytest.mark.parametrize(("text", "kept"), [("中文", True), ("abc", False), ("", False),
                                            ("café", True), ("a中", True), (" \n1+2", False)])
def test_default_keep(text, kept):
    assert default_keep(text) is kept


# --- sentencepiece-style BPE (byte fallback, ▁ for spaces: Llama-2, Gemma) -----------------------

SP_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "is", "a",
            "model", "language", "token", "three", "colors"]


def sentencepiece_tokenizer(style: str):
    """A Llama-2-like fast tokenizer: <unk> <s> </s>, 256 byte tokens, printable ASCII and a few
    ▁-words, no CJK at all; ``style`` says how spaces become ▁ (a normalizer, as Llama-2's
    original tokenizer.json, or a Metaspace pre-tokenizer, as newer conversions)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for char in [SP] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(char, len(vocab))
    merges = []
    for word in SP_WORDS:
        current = SP
        for char in word:
            if current + char not in vocab:
                vocab[current + char] = len(vocab)
                merges.append((current, char))
            current += char
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    if style == "normalizer":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SP), normalizers.Replace(" ", SP)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module", params=["normalizer", "metaspace"])
def sentencepiece(request, zh_train, tmp_path_factory):
    """(base, extension, extended, folder); add is large enough for every character and some words."""
    base = sentencepiece_tokenizer(request.param)
    extension = learn_extension(base, zh_train, 400)
    out = tmp_path_factory.mktemp(f"sp-{request.param}")
    return base, extension, save_extended(base, extension, out, {}), out


def test_sentencepiece_base_spells_chinese_in_bytes():
    base = sentencepiece_tokenizer("normalizer")
    assert base.tokenize("the 中") == [f"{SP}the", SP, "<0xE4>", "<0xB8>", "<0xAD>"]
    assert base.decode(ids(base, "the quick 中文 fox")) == "the quick 中文 fox"


def test_sentencepiece_characters_become_tokens_first(sentencepiece, zh_train):
    base, extension, extended, folder = sentencepiece
    record = read_extension(folder)
    assert record["kind"] == "sentencepiece"
    corpus_chars = Counter(c for text in zh_train for c in text if c not in base.get_vocab())
    frequent = {c for c, n in corpus_chars.items() if n >= 2}
    singles = [e for e in record["new_tokens"] if len(e["text"]) == 1]
    assert {e["text"] for e in singles} == frequent
    # every character comes before any longer token, most frequent first
    assert record["new_tokens"][:len(singles)] == singles
    counts = [corpus_chars[e["text"]] for e in singles]
    assert counts == sorted(counts, reverse=True)
    for entry in singles:  # a character joins the byte tokens the base spelled it with
        assert entry["token"] == entry["text"]
        assert base.convert_ids_to_tokens(entry["base_ids"]) == \
            [f"<0x{b:02X}>" for b in entry["text"].encode("utf-8")]
    assert len(record["new_tokens"]) > len(singles)  # and some words after them


def test_sentencepiece_no_byte_tokens_joined(sentencepiece):
    _, extension, _, folder = sentencepiece
    assert not any(BYTE_TOKEN.search(token) for token in extension.tokens)
    for entry in read_extension(folder)["new_tokens"]:
        assert not BYTE_TOKEN.search(entry["token"]) and "\ufffd" not in entry["text"]


def test_sentencepiece_chinese_round_trips_in_fewer_tokens(sentencepiece, zh_held):
    base, _, extended, _ = sentencepiece
    for text in zh_held:
        new = ids(extended, text)
        assert len(new) < len(ids(base, text)), text
        assert extended.decode(new) == text
        assert not any(BYTE_TOKEN.fullmatch(t) for t in extended.convert_ids_to_tokens(new)), text


def test_sentencepiece_ascii_and_ids_unchanged(sentencepiece, english):
    base, extension, extended, _ = sentencepiece
    for text in english:
        assert ids(extended, text) == ids(base, text), text
    base_vocab, new_vocab = base.get_vocab(), extended.get_vocab()
    assert {token: new_vocab.get(token) for token in base_vocab} == base_vocab
    assert len(extended) == len(base) + len(extension.tokens)
    assert sorted(set(new_vocab.values()) - set(base_vocab.values())) == \
        list(range(len(base), len(extended)))


def test_sentencepiece_small_add_takes_the_most_frequent_characters(zh_train):
    base = sentencepiece_tokenizer("normalizer")
    extension = learn_extension(base, zh_train, 3)
    corpus_chars = Counter(c for text in zh_train for c in text if c not in base.get_vocab())
    assert len(extension.tokens) == 3
    top = sorted(corpus_chars.values(), reverse=True)[:3]
    assert sorted((corpus_chars[t] for t in extension.texts), reverse=True) == top


# --- refusals -------------------------------------------------------------------------------------


def _fast(model, **kwargs):
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def wordpiece_tokenizer():
    from tokenizers import models

    vocab = {"[UNK]": 0, "[SEP]": 1, "a": 2, "b": 3, "##b": 4, "中": 5}
    return _fast(models.WordPiece(vocab, unk_token="[UNK]"), unk_token="[UNK]", eos_token="[SEP]")


def unigram_tokenizer():
    from tokenizers import models

    return _fast(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -1.5)], 0),
                 unk_token="<unk>")


def plain_bpe_tokenizer():
    from tokenizers import models

    return _fast(models.BPE({"<unk>": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")], unk_token="<unk>"),
                 unk_token="<unk>")


@pytest.mark.parametrize(("make", "reason"), [
    (wordpiece_tokenizer, "cannot extend a WordPiece tokenizer"),
    (unigram_tokenizer, "cannot extend a Unigram tokenizer"),
    (plain_bpe_tokenizer, "neither byte-level nor sentencepiece"),
])
def test_refuses_other_tokenizer_models(make, reason, zh_train):
    with pytest.raises(ConfigError, match=reason) as info:
        learn_extension(make(), zh_train[:5], 10, where="some/base")
    assert str(info.value).startswith("some/base: ")
    assert "\n" not in str(info.value)


class SlowTokenizer:
    """What a slow (Python) tokenizer looks like here: no backend_tokenizer."""

    def __len__(self):
        return 3

    def __call__(self, text, **kwargs):
        return {"input_ids": [0] * len(text)}


def test_refuses_a_slow_tokenizer(zh_train):
    with pytest.raises(ConfigError, match=r"slow \(Python\) tokenizer \(SlowTokenizer\)") as info:
        learn_extension(SlowTokenizer(), zh_train[:5], 10, where="slow/base")
    assert str(info.value).startswith("slow/base: ")


@pytest.mark.parametrize("add", [0, -3])
def test_refuses_add_below_one(base, zh_train, add):
    with pytest.raises(ConfigError, match=rf"--add: {add}; expected .* at least 1"):
        learn_extension(base, zh_train[:5], add)


# --- a base whose special tokens lie outside the model vocabulary (Qwen2, Llama-3 layout) ---------


def specials_after_the_vocab(model_dir):
    """The tiny byte-level tokenizer with two more special tokens that, as Qwen2's and Llama-3's
    specials, live only in ``added_tokens`` at ids after the BPE model's vocabulary."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(model_dir)
    base.add_tokens(["<|tool_a|>", "<|tool_b|>"], special_tokens=True)
    return base


def test_specials_after_the_vocab_layout(tiny_models):
    base = specials_after_the_vocab(tiny_models("llama"))
    data = json.loads(base.backend_tokenizer.to_str())
    assert "<|tool_a|>" not in data["model"]["vocab"]
    assert len(data["model"]["vocab"]) == len(base) - 2
    assert base.convert_tokens_to_ids(["<|tool_a|>", "<|tool_b|>"]) == [len(base) - 2, len(base) - 1]


def test_specials_after_the_vocab_keep_their_ids(tiny_models, zh_train, zh_held, tmp_path):
    base = specials_after_the_vocab(tiny_models("llama"))
    extended = save_extended(base, learn_extension(base, zh_train, 20), tmp_path / "out", {})
    base_vocab, new_vocab = base.get_vocab(), extended.get_vocab()
    assert {token: new_vocab.get(token) for token in base_vocab} == base_vocab
    assert len(extended) == len(base) + 20
    assert len(set(new_vocab.values())) == len(new_vocab)  # no two tokens share an id
    for text in zh_held:
        assert extended.decode(ids(extended, text)) == text
