"""Read documents for a knowledge base: .txt, .md, .pdf, .docx, .html and .jsonl.

Each format goes through a maintained parser (pypdf, python-docx, BeautifulSoup with
lxml); .txt and .md are read as UTF-8 (a BOM allowed), then GB18030 (older Chinese
files); a .jsonl file holds one JSON object a line whose ``text`` field (or, where it
has none, ``content``) is one paragraph. Directories are walked recursively, in sorted
order, leaving out hidden entries (names starting with ``.``).

A file that cannot be read, has no text, or is of an unsupported type is never dropped
silently: it comes back as a :class:`Skipped` with the reason, for the caller to count
and print.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".txt", ".md", ".pdf", ".docx", ".html", ".htm", ".jsonl")
JSONL_FIELDS = ("text", "content")


class UnreadableError(Exception):
    """A file that cannot be turned into text; the message is the reason it was skipped."""


@dataclass(frozen=True)
class Source:
    """A file to read: ``file`` is its name in the KB (the path as given), ``path`` where it is."""

    file: str
    path: Path


@dataclass(frozen=True)
class Document:
    """The text of one file, with its name in the KB and the sha256 of its bytes."""

    file: str
    path: Path
    text: str
    sha256: str


@dataclass(frozen=True)
class Skipped:
    """A file left out, and why."""

    file: str
    reason: str


def _name(path: Path) -> str:
    return Path(os.path.normpath(path)).as_posix()


def collect_sources(paths: Iterable[str | Path]) -> tuple[list[Source], list[Skipped]]:
    """The files under ``paths`` (files, or directories walked recursively) that can be read.

    Returns the supported files, each named by its path as given (normalized) and listed
    once, and the entries skipped: paths that do not exist and files of an unsupported type.
    """
    sources: list[Source] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists():
            found = [path]
        else:
            skipped.append(Skipped(_name(path), "not found"))
            continue
        for file in found:
            if _name(file) in seen:
                continue  # the same file named twice (a folder and a file in it): read once
            seen.add(_name(file))
            if file.suffix.lower() in SUFFIXES:
                sources.append(Source(_name(file), file))
            else:
                skipped.append(Skipped(_name(file), f"unsupported type {file.suffix or '(no suffix)'!r}; "
                                                     f"expected one of {', '.join(SUFFIXES)}"))
    return sources, skipped


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode(data: bytes) -> str:
    if b"\x00" in data:
        raise UnreadableError("binary data (NUL bytes) in a text file")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise UnreadableError("not UTF-8 or GB18030 text")


def _read_pdf(path: Path) -> str:
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings on broken files: the reason says it
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise UnreadableError("encrypted PDF")
        pages = [page.extract_text() or "" for page in reader.pages]
    except UnreadableError:
        raise
    except Exception as exc:  # noqa: BLE001  (a parser of untrusted files raises many kinds)
        raise UnreadableError(f"not a readable PDF ({type(exc).__name__}: {exc})") from exc
    text = "\n\n".join(page.strip() for page in pages if page.strip())
    if not text:
        raise UnreadableError("no text in the PDF (scanned pages? text is not recognized from images)")
    return text


def _read_docx(path: Path) -> str:
    import docx

    try:
        document = docx.Document(str(path))
        paragraphs = [p.text for p in document.paragraphs]
        for table in document.tables:
            for row in table.rows:
                paragraphs.append(" | ".join(cell.text.strip() for cell in row.cells))
    except Exception as exc:  # noqa: BLE001  (a parser of untrusted files raises many kinds)
        raise UnreadableError(f"not a readable .docx file ({type(exc).__name__}: {exc})") from exc
    return "\n".join(paragraphs)


_BLOCKS = ("p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article",
           "blockquote", "pre", "table", "ul", "ol", "dt", "dd", "header", "footer", "title")


def _read_html(data: bytes) -> str:
    import re

    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "lxml")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    for tag in soup.find_all("br"):
        tag.replace_with("\n")
    for tag in soup.find_all(_BLOCKS):
        tag.insert_before("\n\n")
        tag.append("\n\n")
    lines = [" ".join(line.split()) for line in soup.get_text().split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read_jsonl(text: str) -> str:
    paragraphs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UnreadableError(f"line {number}: not JSON ({exc.msg})") from exc
        value = next((row[k] for k in JSONL_FIELDS if isinstance(row, dict) and k in row), None)
        if not isinstance(value, str):
            raise UnreadableError(f"line {number}: expected an object with a string 'text' "
                                  "(or 'content') field")
        paragraphs.append(value.strip())
    return "\n\n".join(p for p in paragraphs if p)


def read_text(path: Path) -> str:
    """The text of one file, by its suffix; raises :class:`UnreadableError` saying why it cannot be read."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".pdf":
            return _read_pdf(path)
        if suffix == ".docx":
            return _read_docx(path)
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableError(f"cannot be read ({exc.strerror or exc})") from exc
    if suffix in (".html", ".htm"):
        return _read_html(data)
    text = _decode(data)
    if suffix == ".jsonl":
        return _read_jsonl(text)
    if suffix in (".txt", ".md"):
        return text
    raise UnreadableError(f"unsupported type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def read_document(source: Source, sha256: str | None = None) -> Document | Skipped:
    """Read one source into a :class:`Document`, or a :class:`Skipped` naming why it could not be."""
    try:
        digest = sha256 or file_sha256(source.path)
        text = read_text(source.path)
    except OSError as exc:
        return Skipped(source.file, f"cannot be read ({exc.strerror or exc})")
    except UnreadableError as exc:
        return Skipped(source.file, str(exc))
    if not text.strip():
        return Skipped(source.file, "empty (no text)")
    return Document(source.file, source.path, text, digest)


def format_skipped(skipped: list[Skipped]) -> str:
    """One line per skipped file, ``skipped FILE: REASON``, after a count."""
    if not skipped:
        return "skipped 0 files"
    lines = [f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''}:"]
    lines += [f"  {item.file}: {item.reason}" for item in skipped]
    return "\n".join(lines)
