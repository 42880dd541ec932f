"""Raw text corpora for continued pre-training: documents read lazily, no chat template.

A corpus file is plain text (``.txt``, ``.text``, ``.md``: one document a line, or one a
paragraph), JSON Lines, a JSON array of objects, or Parquet; JSON and Parquet rows give their
text from one field or several joined with newlines. Every input unit is counted in a
:class:`CorpusCounts` (``read == documents + empty``), and a bad file or row raises a one-line
:class:`~chattune.data.formats.DataFileError` naming the file and line or row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.data.formats import DataFileError, check_data_file, parquet_file, utf8_lines
from chattune.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".text", ".md")
CORPUS_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet")
CORPUS_TYPES = ", ".join(CORPUS_SUFFIXES[:-1]) + " or " + CORPUS_SUFFIXES[-1]
TEXT_DOCUMENTS = ("line", "paragraph")
BINARY_PROBE = 8192
"""Bytes at the start of a text file searched for a NUL byte."""
PARQUET_BATCH_ROWS = 1024
"""Rows read from Parquet at a time (documents can be long, so fewer than pyarrow's 65536)."""
BOM = b"\xef\xbb\xbf"
MAX_KEYS_SHOWN = 20


@dataclass(frozen=True)
class Document:
    """One document's text and where it starts: ``path:line`` (1-based) for text and JSON
    Lines, ``path:row N`` (1-based) for a JSON array or Parquet."""

    text: str
    source: str


@dataclass
class CorpusCounts:
    """Every input unit of one file accounted for: read == documents + empty."""

    path: str
    read: int = 0
    documents: int = 0
    empty: int = 0
    chars: int = 0

    def to_json(self) -> dict:
        """The counts as plain JSON."""
        return {"path": self.path, "read": self.read, "documents": self.documents,
                "empty": self.empty, "chars": self.chars}


def check_corpus_file(path: str | Path) -> None:
    """Raise DataFileError unless ``path`` is an existing, readable regular file."""
    path = check_data_file(path, f"a corpus file ({CORPUS_TYPES})")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def iter_documents(path: str | Path, *, text_field: str | list[str] = "text",
                   text_documents: str = "line",
                   counts: CorpusCounts | None = None) -> Iterator[Document]:
    """Yield the non-empty documents of one corpus file lazily, its type told by its suffix.

    Text files give one document a line (``text_documents="line"``) or a block of lines
    between blank lines (``"paragraph"``). JSON Lines, JSON arrays and Parquet give one a row,
    the text of ``text_field`` (a name, or several whose non-empty values are joined with
    newlines). Empty documents are skipped; ``counts``, if given, is updated as it goes.
    The path, suffix and settings are checked at the call; the contents as they are read.
    """
    check_corpus_file(path)
    path = Path(path)
    fields = _text_fields(text_field)
    if text_documents not in TEXT_DOCUMENTS:
        raise ConfigError(f"text_documents: expected 'line' or 'paragraph', got {text_documents!r}")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        units = _text_units(path, paragraphs=text_documents == "paragraph")
    elif suffix == ".jsonl":
        units = _jsonl_units(path, fields)
    elif suffix == ".json":
        units = _json_units(path, fields)
    elif suffix == ".parquet":
        units = _parquet_units(path, fields)
    else:
        raise DataFileError(f"{path}: unknown corpus file type {suffix or '(no suffix)'}; "
                            f"expected {CORPUS_TYPES}")
    return _counted(units, CorpusCounts(str(path)) if counts is None else counts)


def held_out(text: str, fraction: float) -> bool:
    """Whether a document goes to the held-out share: True for about ``fraction`` of texts,
    decided by the text's SHA-256 alone (the same text always lands on the same side)."""
    if not 0 <= fraction <= 1:
        raise ConfigError(f"held-out fraction: expected a number from 0 to 1, got {fraction!r}")
    if fraction == 0:
        return False
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _text_fields(text_field: str | list[str]) -> list[str]:
    fields = [text_field] if isinstance(text_field, str) else list(text_field)
    if not fields or not all(isinstance(f, str) and f for f in fields):
        raise ConfigError(f"text_field: expected a field name or a list of them, got {text_field!r}")
    return fields


def _counted(units: Iterable[tuple[str, str]], counts: CorpusCounts) -> Iterator[Document]:
    """The documents among (text, source) units, every unit counted as read, then as a
    document or as empty."""
    for text, source in units:
        counts.read += 1
        if not text.strip():
            counts.empty += 1
            continue
        counts.documents += 1
        counts.chars += len(text)
        yield Document(text, source)


def _unreadable(path: Path, exc: OSError) -> DataFileError:
    return DataFileError(f"{path}: cannot read: {exc.strerror or exc}")


def _check_not_binary(path: Path, head: bytes) -> None:
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataFileError(f"{path}: looks binary (a NUL byte at offset {nul}); "
                            "expected UTF-8 text")


def _not_utf8(where: str, exc: UnicodeDecodeError, offset: int) -> DataFileError:
    return DataFileError(f"{where}: not UTF-8 text ({exc.reason} at byte offset {offset}); "
                         "expected a UTF-8 text corpus")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of every line, decoded one at a time, its line ending dropped."""
    try:
        with path.open("rb") as handle:
            _check_not_binary(path, handle.read(BINARY_PROBE))
            handle.seek(0)
            not_utf8 = lambda lineno, exc, offset: _not_utf8(f"{path}:{lineno}", exc, offset)  # noqa: E731
            for lineno, line in utf8_lines(handle, not_utf8):
                yield lineno, line.removesuffix("\r")
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _text_units(path: Path, *, paragraphs: bool) -> Iterator[tuple[str, str]]:
    if not paragraphs:
        for lineno, line in _lines(path):
            yield line, f"{path}:{lineno}"
        return
    block: list[str] = []
    start = 0
    for lineno, line in _lines(path):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield "\n".join(block), f"{path}:{start}"
            block = []
    if block:
        yield "\n".join(block), f"{path}:{start}"


def _jsonl_units(path: Path, fields: list[str], hint: str = "") -> Iterator[tuple[str, str]]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{where}:{exc.colno}: malformed JSON: {exc.msg}{hint}") from exc
        except (ValueError, RecursionError) as exc:
            raise _unusable_json(where, exc) from exc
        yield _row_text(value, fields, where), where


def _unusable_json(where: str, exc: Exception) -> DataFileError:
    """Well-formed JSON that Python's reader refuses: nesting too deep, an integer too long."""
    if isinstance(exc, RecursionError):
        return DataFileError(f"{where}: JSON nested too deeply to read; expected an object")
    return DataFileError(f"{where}: unreadable JSON value: {exc}")


def _first_char(path: Path) -> str:
    """The first character of a file past a BOM and whitespace ("" if there is none)."""
    try:
        with path.open("rb") as handle:
            chunk = handle.read(BINARY_PROBE)
            _check_not_binary(path, chunk)
            chunk = chunk.removeprefix(BOM)
            while chunk:
                rest = chunk.lstrip()
                if rest:
                    return rest[:1].decode("latin-1")
                chunk = handle.read(BINARY_PROBE)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    return ""


def _json_units(path: Path, fields: list[str]) -> Iterator[tuple[str, str]]:
    """A ``.json`` file: a JSON array of objects (read whole), or JSON Lines (read lazily)."""
    first = _first_char(path)
    if first == "":
        return
    if first == "{":
        yield from _jsonl_units(path, fields, hint="; a .json corpus holds a JSON array or "
                                "one JSON object a line")
        return
    if first != "[":
        raise DataFileError(f"{path}: starts with {first!r}; expected a JSON array of objects "
                            "or JSON Lines (one object a line)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    skip = len(BOM) if data.startswith(BOM) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, skip + exc.start) + 1
        raise _not_utf8(f"{path}:{line}", exc, skip + exc.start) from exc
    del data
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:
        raise _unusable_json(str(path), exc) from exc
    del text
    for number, value in enumerate(rows, start=1):
        where = f"{path}:row {number}"
        yield _row_text(value, fields, where), where


def _parquet_units(path: Path, fields: list[str]) -> Iterator[tuple[str, str]]:
    with parquet_file(path) as parquet:
        names = parquet.schema_arrow.names
        columns = [f for f in fields if f in names]
        if not columns:
            what = f"column {fields[0]!r}" if len(fields) == 1 else f"columns {_quoted(fields)}"
            raise DataFileError(f"{path}: no {what}; the file has columns {_quoted(names)}")
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        number = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:  # a corrupt page, a failed read
                raise DataFileError(f"{path}: cannot read Parquet rows after row {number}: "
                                    f"{_one_line(exc)}") from exc
            for value in batch.to_pylist():
                number += 1
                where = f"{path}:row {number}"
                yield _row_text(value, fields, where), where


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _quoted(names: Iterable[str]) -> str:
    names = list(names)
    if not names:
        return "(none)"
    shown = ", ".join(repr(n) for n in names[:MAX_KEYS_SHOWN])
    return shown if len(names) <= MAX_KEYS_SHOWN else f"{shown}, ... ({len(names)} in all)"


def _kind(value: Any) -> str:
    """A value's type in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _row_text(row: Any, fields: list[str], where: str) -> str:
    """The text of one JSON or Parquet row: its one field, or its fields' non-empty values
    joined with newlines (a missing field or null is empty)."""
    wanted = f"field {fields[0]!r}" if len(fields) == 1 else f"one of the fields {_quoted(fields)}"
    if not isinstance(row, dict):
        raise DataFileError(f"{where}: expected an object with {wanted}, got {_kind(row)}")
    present = [f for f in fields if f in row]
    if not present:
        missing = (f"no field {fields[0]!r}" if len(fields) == 1
                   else f"none of the fields {_quoted(fields)}")
        keys = f"keys {_quoted(row)}" if row else "no keys"
        raise DataFileError(f"{where}: {missing}; the row has {keys} (text_field names the "
                            "field holding the text)")
    values = []
    for name in present:
        value = row[name]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataFileError(f"{where}: field {name!r} is {_kind(value)}; expected a string")
        values.append(value)
    if len(fields) == 1:
        return values[0] if values else ""
    return "\n".join(v for v in values if v.strip())
