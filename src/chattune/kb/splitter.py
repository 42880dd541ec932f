"""A Chinese-aware recursive text splitter (Langchain-Chatchat 0.2's defaults: 250/50).

A text is cut at the coarsest boundary that makes its pieces fit: paragraphs (a blank
line), then lines, then sentences (after 。！？ or after . ! ? followed by a space),
then a hard cut between characters. Each piece keeps the separator that ends it, so the
pieces put back together are the text. The pieces are then merged greedily into chunks
of at most ``chunk_size`` characters; each new chunk starts with the last pieces of the
previous one, as many as fit in ``chunk_overlap`` characters (whole sentences or lines
where the text has them, characters where it was hard-cut). A chunk is an exact slice
of the text, stripped of surrounding whitespace (which is not counted in its size);
chunks of only whitespace are dropped, and so is a chunk identical to the one before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from chattune.errors import ConfigError

CHUNK_SIZE = 250
CHUNK_OVERLAP = 50

# Each pattern matches the end of a piece (its separator stays with the piece before it).
_LEVELS = (
    ("paragraph", re.compile(r"\n[ \t]*\n\s*")),
    ("line", re.compile(r"\n")),
    ("sentence", re.compile(r"[。！？!?][”’」』\"')）]*\s*|\.[”’\"')）]*(?:\s+|$)")),
)


@dataclass(frozen=True)
class SplitterSettings:
    """How documents are cut: the longest chunk and the overlap between neighbours (characters)."""

    chunk_size: int = CHUNK_SIZE
    chunk_overlap: int = CHUNK_OVERLAP

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"chunk_size: expected a positive number of characters, got {self.chunk_size!r}")
        if not isinstance(self.chunk_overlap, int) or not 0 <= self.chunk_overlap < self.chunk_size:
            raise ConfigError(f"chunk_overlap: expected 0 <= overlap < chunk_size ({self.chunk_size}), "
                              f"got {self.chunk_overlap!r}")

    def to_json(self) -> dict:
        """The settings as stored in a KB manifest."""
        return {"splitter": "chinese-recursive", "chunk_size": self.chunk_size,
                "chunk_overlap": self.chunk_overlap}


def _cut(text: str, pattern: re.Pattern) -> list[str]:
    """Split ``text`` after each match of ``pattern``, the match staying with the piece before it."""
    pieces, start = [], 0
    for match in pattern.finditer(text):
        if match.end() > start:
            pieces.append(text[start:match.end()])
            start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _pieces(text: str, size: int, level: int = 0) -> list[str]:
    """Cut ``text`` into pieces of at most ``size`` characters, at the coarsest boundary that works."""
    if len(text.rstrip()) <= size:  # trailing whitespace is stripped from chunks: it does not count
        return [text]
    if level == len(_LEVELS):
        return list(text)  # hard cut: single characters, merged back into chunks below
    out: list[str] = []
    for piece in _cut(text, _LEVELS[level][1]):
        out.extend(_pieces(piece, size, level + 1))
    return out


def _merge(pieces: list[str], size: int, overlap: int) -> list[str]:
    """Join consecutive pieces into chunks of at most ``size`` characters, overlapping by whole pieces."""
    chunks: list[str] = []
    current: list[str] = []
    total = 0
    for piece in pieces:
        length = len(piece.rstrip())  # the chunk's end is stripped: a last piece's trailing space is free
        if current and total + length > size:
            chunks.append("".join(current))
            while current and (total > overlap or total + length > size):
                total -= len(current.pop(0))
        current.append(piece)
        total += len(piece)
    if current:
        chunks.append("".join(current))
    return chunks


def split_text(text: str, settings: SplitterSettings | None = None) -> list[str]:
    """Split ``text`` into chunks of at most ``settings.chunk_size`` characters (see the module doc)."""
    settings = settings or SplitterSettings()
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    pieces = _pieces(text, settings.chunk_size)
    chunks = [chunk.strip() for chunk in _merge(pieces, settings.chunk_size, settings.chunk_overlap)]
    out: list[str] = []
    for chunk in chunks:
        if chunk and (not out or out[-1] != chunk):
            out.append(chunk)
    return out
