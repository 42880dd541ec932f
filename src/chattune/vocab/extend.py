"""Extend a tokenizer with tokens learned from a corpus, keeping every existing token and id.

A BPE tokenizer turns a word into base tokens by applying its merges, highest priority first.
New merges appended after the base's all have lower priority, so they act on the base's
finished tokenization: a text is tokenized as before, then the new merges join adjacent
base tokens. :func:`learn_extension` therefore learns the new merges over base tokens, not
over bytes: the corpus is first tokenized by the base, each distinct base token is renamed
to one private character, and the ``tokenizers`` BPE trainer learns merges over those
characters. Mapped back, every learned merge joins two tokens the extended tokenizer can
really produce, and is reachable under the base's merge priorities.

New tokens keep a text filter (by default: a token must hold a non-ASCII character), so an
ASCII text encodes exactly as before. Sentencepiece-style tokenizers (byte fallback, ``▁`` for
spaces: Llama-2, Gemma) spell a character they lack as byte tokens (``<0xE4>``...); such a
character becomes a new single-character token first, and merges never join byte tokens.

Byte-level BPE (GPT-2 style: Llama-3, SmolLM2, GLM-4, Qwen) and sentencepiece-style BPE
(``tokenizer.json`` with ``byte_fallback``) are supported; any other tokenizer model
(WordPiece, Unigram, a slow sentencepiece tokenizer) is refused with the reason.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from chattune.errors import ConfigError, ModelLoadError

EXTENSION_NAME = "chattune_vocab_extension.json"
"""Written beside the extended tokenizer: the base, the corpus and every new token."""

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_PRIVATE_START = 0x20000  # code points that stand for base tokens while learning (no whitespace here)
_SP_SPACE = "\u2581"


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet (transformers' own table): printable character -> its byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


@dataclass(frozen=True)
class TokenizerKind:
    """How a BPE ``tokenizer.json`` spells text: ``byte_level`` or ``sentencepiece``."""

    style: str

    def text_of(self, token: str) -> bytes | None:
        """The bytes a token stands for (None: a byte-fallback token or an unknown spelling)."""
        if self.style == "byte_level":
            table = _byte_level_table()
            if any(c not in table for c in token):
                return None
            return bytes(table[c] for c in token)
        if _BYTE_TOKEN.match(token):
            return None
        return token.replace(_SP_SPACE, " ").encode("utf-8")




def tokenizer_kind(data: dict, where: str) -> TokenizerKind:
    """The kind of a ``tokenizer.json`` (parsed) that can be extended, or a ConfigError saying
    why it cannot."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"{where}: cannot extend a {model.get('type') or 'unknown'} tokenizer model; "
                          "expected a BPE tokenizer.json (byte-level like Llama-3/SmolLM2/Qwen, or "
                          "sentencepiece-style with byte fallback like Llama-2/Gemma)")
    spelled = json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
    if '"ByteLevel"' in spelled:
        return TokenizerKind("byte_level")
    if model.get("byte_fallback") or '"ByteFallback"' in spelled or _SP_SPACE in json.dumps(data.get("normalizer")) \
            or '"Metaspace"' in spelled:
        return TokenizerKind("sentencepiece")
    raise ConfigError(f"{where}: a BPE tokenizer that is neither byte-level nor sentencepiece-style "
                      "(no ByteLevel pre-tokenizer/decoder, no byte fallback); chattune cannot tell how "
                      "new tokens would be spelled")


def backend_json(tokenizer, where: str) -> dict:
    """The parsed ``tokenizer.json`` of a fast Hugging Face tokenizer (ConfigError for a slow one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{where}: a slow (Python) tokenizer ({type(tokenizer).__name__}) cannot be "
                          "extended; expected a fast tokenizer with a tokenizer.json")
    return json.loads(backend.to_str())


@dataclass
class Extension:
    """What :func:`learn_extension` learned: new tokens (their spelling in the tokenizer's own
    alphabet and their text) and the merges that make them, in priority order."""

    kind: TokenizerKind
    tokens: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    pieces: list[list[int]] = field(default_factory=list)
    """Per new token, the base token ids it joins (what the base split its text into)."""
    merges: list[tuple[str, str]] = field(default_factory=list)
    corpus_documents: int = 0
    corpus_chars: int = 0


def _words(encoding, kind: TokenizerKind) -> list[list[str]]:
    """A base encoding's tokens grouped into the words new merges may join within: by the
    pre-tokenizer's words, split before each ``▁`` (sentencepiece), and with each run of byte
    tokens that spells whole characters replaced by those characters."""
    words: list[list[str]] = []
    current: list[str] = []
    last_word = object()
    pending = bytearray()

    def flush_bytes():
        if pending:
            try:
                current.extend(pending.decode("utf-8"))
            except UnicodeDecodeError:
                end_word()
            pending.clear()

    def end_word():
        nonlocal current
        if current:
            words.append(current)
        current = []

    for token, word in zip(encoding.tokens, encoding.word_ids, strict=True):
        if word is None:  # a special or added token: never part of a learned merge
            flush_bytes()
            end_word()
            last_word = object()
            continue
        if word != last_word:
            flush_bytes()
            end_word()
            last_word = word
        byte = _BYTE_TOKEN.match(token) if kind.style == "sentencepiece" else None
        if byte:
            pending.append(int(byte.group(1), 16))
            continue
        flush_bytes()
        if kind.style == "sentencepiece" and token.startswith(_SP_SPACE):
            end_word()
        current.append(token)
    flush_bytes()
    end_word()
    return words


def default_keep(text: str) -> bool:
    """The default filter on new tokens: the text holds a non-ASCII character (so every ASCII
    text encodes as before)."""
    return any(ord(c) > 127 for c in text)


def learn_extension(tokenizer, texts: Iterable[str], add: int, *, min_frequency: int = 2,
                    keep=default_keep, where: str = "tokenizer") -> Extension:
    """Learn up to ``add`` new tokens from ``texts`` for the fast BPE ``tokenizer``.

    The ``tokenizers`` BPE trainer learns merges over the base tokenization (see the module
    docstring); merges whose result fails ``keep`` (a function of the token's text), is already
    a base token, or needs a dropped token are left out. Raises ConfigError for a tokenizer that
    cannot be extended or ``add`` below 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if add < 1:
        raise ConfigError(f"--add: {add}; expected the number of new tokens to learn, at least 1")
    data = backend_json(tokenizer, where)
    kind = tokenizer_kind(data, where)
    backend = tokenizer.backend_tokenizer
    vocab: dict[str, int] = data["model"]["vocab"]
    units: dict[str, str] = {}  # base token (or new single character) -> its private character
    names: list[str] = []
    word_counts: Counter = Counter()
    extension = Extension(kind)
    for text in texts:
        extension.corpus_documents += 1
        extension.corpus_chars += len(text)
        encoding = backend.encode(text, add_special_tokens=False)
        for word in _words(encoding, kind):
            spelled = []
            for unit in word:
                if unit not in units:
                    units[unit] = chr(_PRIVATE_START + len(names))
                    names.append(unit)
                spelled.append(units[unit])
            word_counts["".join(spelled)] += 1
    if not word_counts:
        return extension

    pieces = {}  # new token -> the base ids it joins

    def new_token(spelling: str, base_ids: list[int]) -> bool:
        """Add ``spelling`` (joining ``base_ids``) as a new token if ``keep`` allows it."""
        raw = kind.text_of(spelling)
        if raw is None or any(i is None for i in base_ids):
            return False
        text = raw.decode("utf-8", errors="replace")
        if not keep(text) or len(extension.tokens) >= add:
            return False
        extension.tokens.append(spelling)
        extension.texts.append(text)
        extension.pieces.append(base_ids)
        pieces[spelling] = base_ids
        return True

    def base_ids(spelling: str) -> list[int]:
        return [vocab[spelling]] if spelling in vocab else pieces[spelling]

    # sentencepiece: characters the base spells in bytes become tokens first, most frequent first
    char_counts: Counter = Counter()
    for word, count in word_counts.items():
        for c in word:
            if names[ord(c) - _PRIVATE_START] not in vocab:
                char_counts[names[ord(c) - _PRIVATE_START]] += count
    usable = set(vocab)
    for char, count in char_counts.most_common():
        if count >= min_frequency and new_token(char, [vocab.get(f"<0x{b:02X}>") for b in char.encode()]):
            usable.add(char)

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=len(units) + 2 * add + 256, min_frequency=min_frequency,
                                  initial_alphabet=list(units.values()), show_progress=False,
                                  limit_alphabet=len(units) + 1)
    learner.train_from_iterator(_repeat(word_counts), trainer=trainer)
    learned = json.loads(learner.to_str())["model"]["merges"]
    for pair in learned:
        left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
        a = "".join(names[ord(c) - _PRIVATE_START] for c in left)
        b = "".join(names[ord(c) - _PRIVATE_START] for c in right)
        if a not in usable or b not in usable or a + b in vocab:
            continue
        if a + b in pieces:  # another way to join the same token: a merge, no new token
            extension.merges.append((a, b))
            continue
        if len(extension.tokens) >= add:
            break
        if new_token(a + b, base_ids(a) + base_ids(b)):
            usable.add(a + b)
            extension.merges.append((a, b))
    return extension


def _repeat(word_counts: Counter):
    """The words as the trainer reads them: each as often as it occurred, a thousand per text."""
    batch: list[str] = []
    for word, count in word_counts.items():
        batch.extend([word] * count)
        if len(batch) >= 1000:
            yield " ".join(batch)
            batch = []
    if batch:
        yield " ".join(batch)


def extended_json(data: dict, extension: Extension) -> tuple[dict, list[int]]:
    """``tokenizer.json`` (parsed) with the extension's tokens at new ids after every existing
    id (model vocabulary and added tokens) and its merges after the base's; the new ids."""
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    for added in data.get("added_tokens") or []:
        # tokenizers renumbers added tokens the model's vocabulary lacks from its size on load
        # (Qwen2 and Llama-3 keep their special tokens there only): pin them at their ids
        vocab.setdefault(added["content"], added["id"])
    next_id = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens") or [])], default=-1) + 1
    ids = []
    for token in extension.tokens:
        vocab[token] = next_id
        ids.append(next_id)
        next_id += 1
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["merges"] += [f"{a} {b}" if as_strings else [a, b] for a, b in extension.merges]
    return data, ids


def save_extended(tokenizer, extension: Extension, out_dir: str | Path, record: dict):
    """Write the extended tokenizer into ``out_dir`` (as ``save_pretrained`` writes the base's,
    with the new ``tokenizer.json`` and no slow-tokenizer files) and :data:`EXTENSION_NAME`;
    return it loaded back with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, ids = extended_json(backend_json(tokenizer, str(out)), extension)
    tokenizer.save_pretrained(str(out))
    for stale in ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt"):
        (out / stale).unlink(missing_ok=True)  # the slow files would describe the base vocabulary
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("vocab_file", None)
    config.pop("merges_file", None)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    record = {**record, "kind": extension.kind.style, "added": len(ids),
              "new_tokens": [{"id": i, "token": t, "text": x, "base_ids": p} for i, t, x, p
                             in zip(ids, extension.tokens, extension.texts, extension.pieces, strict=True)]}
    (out / EXTENSION_NAME).write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    try:
        return AutoTokenizer.from_pretrained(str(out))
    except Exception as exc:  # the file written above must load; say so if it does not
        raise ModelLoadError(f"{out}: the extended tokenizer does not load back: {exc}") from exc


def read_extension(folder: str | Path) -> dict | None:
    """The :data:`EXTENSION_NAME` record of a tokenizer folder, or None."""
    file = Path(folder) / EXTENSION_NAME
    if not file.is_file():
        return None
    return json.loads(file.read_text(encoding="utf-8"))


@dataclass
class Comparison:
    """How two tokenizers encode the same texts."""

    texts: int
    chars: int
    tokens_before: int
    tokens_after: int
    changed: int
    ascii_texts: int = 0
    ascii_changed: int = 0

    @property
    def ratio(self) -> float:
        """Tokens before per token after (2.0: half the tokens)."""
        return self.tokens_before / self.tokens_after if self.tokens_after else 0.0

    def to_json(self) -> dict:
        """The comparison as plain JSON, with tokens per character."""
        def per_char(n):
            return (round(n / self.chars, 4) if self.chars else 0.0)
        return {"texts": self.texts, "chars": self.chars, "tokens_before": self.tokens_before,
                "tokens_after": self.tokens_after, "tokens_per_char_before": per_char(self.tokens_before),
                "tokens_per_char_after": per_char(self.tokens_after), "ratio": round(self.ratio, 3),
                "texts_encoded_differently": self.changed, "ascii_texts": self.ascii_texts,
                "ascii_texts_changed": self.ascii_changed}


def compare_tokenizers(before, after, texts: Iterable[str]) -> Comparison:
    """Tokens per text under ``before`` and ``after``, and how many texts (and of the ASCII-only
    texts) encode differently."""
    result = Comparison(0, 0, 0, 0, 0)
    for text in texts:
        old = before.backend_tokenizer.encode(text, add_special_tokens=False).ids
        new = after.backend_tokenizer.encode(text, add_special_tokens=False).ids
        result.texts += 1
        result.chars += len(text)
        result.tokens_before += len(old)
        result.tokens_after += len(new)
        result.changed += old != new
        if text.isascii():
            result.ascii_texts += 1
            result.ascii_changed += old != new
    return result
