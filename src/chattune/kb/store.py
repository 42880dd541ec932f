"""A knowledge-base folder that describes itself, and building, updating and searching it.

A KB folder holds:

- ``kb.json``: the manifest: the backend (BM25 with k1, b and the tokenizer, or the
  embedding model's path and the sha256 of its weights), the splitter settings, and
  every source file with its sha256 and chunk count;
- ``chunks.jsonl``: one ``{"file", "chunk", "text"}`` line per chunk, files in manifest
  order, chunks in document order;
- ``embeddings.npy`` (dense KBs only): the unit-length embedding of each chunk, row for row.

:func:`add` and :func:`remove` rewrite these from what is stored: the other files are
not read again, nor their chunks embedded again (BM25 is re-indexed from the stored
chunks when a KB is opened, which is cheap). Scores are relevances in [0, 1], higher =
more similar, whatever the backend (see :mod:`chattune.kb.index`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chattune.errors import ConfigError, DataError
from chattune.kb import index as indexing
from chattune.kb.defaults import MAX_QUERY_CHARS as MAX_QUERY_CHARS
from chattune.kb.defaults import THRESHOLD as THRESHOLD
from chattune.kb.defaults import TOP_K as TOP_K
from chattune.kb.documents import (
    Document,
    Skipped,
    collect_sources,
    file_sha256,
    format_skipped,
    read_document,
)
from chattune.kb.splitter import SplitterSettings, split_text
from chattune.paths import check_output_dir

MANIFEST = "kb.json"
CHUNKS = "chunks.jsonl"
EMBEDDINGS = "embeddings.npy"
FORMAT = "chattune-kb"
VERSION = 1



@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: its file, its index in that file, its text and its relevance in [0, 1]."""

    file: str
    chunk: int
    text: str
    score: float

    def source(self) -> dict:
        """``{"file", "chunk", "score"}``: what an answer cites."""
        return {"file": self.file, "chunk": self.chunk, "score": round(self.score, 4)}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass
class Report:
    """What a build, add or remove did: files by outcome, files skipped (why), chunks in the KB."""

    root: Path
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    new_chunks: int = 0
    files: int = 0
    chunks: int = 0

    def format(self) -> str:
        """A short summary for the terminal, skipped files listed with their reasons."""
        parts = [f"{name} {len(items)}" for name, items in
                 (("added", self.added), ("updated", self.updated), ("unchanged", self.unchanged),
                  ("removed", self.removed)) if items]
        lines = [f"{self.root}: {_count(self.files, 'file')}, {_count(self.chunks, 'chunk')}"
                 + (f" ({', '.join(parts)}; {_count(self.new_chunks, 'new chunk')})" if parts else "")]
        if self.skipped:
            lines.append(format_skipped(self.skipped))
        return "\n".join(lines)


@dataclass
class KnowledgeBase:
    """An opened KB: its folder, manifest, chunks and (dense) embeddings; :meth:`relevance` scores."""

    root: Path
    manifest: dict
    chunks: list[dict]
    embeddings: np.ndarray | None = None
    _index: object = field(default=None, repr=False)

    @property
    def dense(self) -> bool:
        """Whether the KB is searched by embeddings (else BM25)."""
        return self.manifest["backend"]["name"] == "embedding"

    def relevance(self, query: str) -> np.ndarray:
        """Every chunk's relevance to ``query``, in [0, 1]."""
        if self._index is None:
            if self.dense:
                self._index = indexing.DenseIndex(self.embeddings)
            else:
                backend = self.manifest["backend"]
                self._index = indexing.Bm25Index([c["text"] for c in self.chunks],
                                                 k1=backend["k1"], b=backend["b"])
        if self.dense:
            from chattune.kb.embedding import embed, load_model

            vector = embed(load_model(self.manifest["backend"]["model"]), [query])[0]
            return self._index.relevance(vector)
        return self._index.relevance(query)


# ---------------------------------------------------------------- manifest and files


def _backend(embedding: str | Path | None) -> dict:
    if embedding is None:
        return {"name": "bm25", "method": indexing.METHOD, "k1": indexing.K1, "b": indexing.B,
                "tokenizer": indexing.TOKENIZER}
    from chattune.kb.embedding import embedding_dim, load_model, model_hash, require_dense

    require_dense()
    digest = model_hash(embedding)
    model = load_model(str(Path(embedding).resolve()))
    dim = embedding_dim(model)
    return {"name": "embedding", "model": str(Path(embedding).resolve()), "model_sha256": digest,
            "dim": dim, "similarity": "cosine"}


RELEVANCE = {
    "bm25": "IDF-weighted share of the question's terms found in the chunk, in [0, 1]; higher = more relevant",
    "embedding": "cosine similarity of the embeddings, negatives as 0, in [0, 1]; higher = more similar",
}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        write(handle)
    os.replace(tmp, path)


def _save(root: Path, manifest: dict, chunks: list[dict], embeddings: np.ndarray | None) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_atomic(root / CHUNKS, lambda h: h.write("".join(
            json.dumps(c, ensure_ascii=False) + "\n" for c in chunks).encode("utf-8")))
        if embeddings is not None:
            _write_atomic(root / EMBEDDINGS, lambda h: np.save(h, embeddings))
        manifest["chunks"] = len(chunks)
        _write_atomic(root / MANIFEST, lambda h: h.write(
            (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode("utf-8")))
    except OSError as exc:
        raise ConfigError(f"{root}: cannot write the knowledge base there ({exc.strerror or exc}); "
                          "expected a writable folder") from exc


def read_manifest(root: str | Path) -> dict:
    """The manifest of the KB folder ``root``; a clear error where it is not a KB."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{root}: no {MANIFEST} in it; expected a knowledge-base folder "
                          "made by `chattune kb build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); rebuild the KB with `chattune kb build`") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                          f"expected {FORMAT!r} version {VERSION}")
    return manifest


def _check_embedding(manifest: dict, root: Path, embedding: str | Path | None) -> None:
    backend = manifest["backend"]
    if backend["name"] != "embedding":
        if embedding is not None:
            raise ConfigError(f"--embedding {embedding}: the KB {root} was built with BM25, not an "
                              "embedding model; search it without --embedding, or rebuild it with one")
        return
    from chattune.kb.embedding import model_hash

    given = embedding if embedding is not None else backend["model"]
    if embedding is None and not Path(given).is_dir():
        raise ConfigError(f"{root}: its embedding model {given} is gone; pass --embedding with the "
                          f"model it was built with (sha256 {backend['model_sha256'][:12]})")
    digest = model_hash(given)
    if digest != backend["model_sha256"]:
        raise ConfigError(f"--embedding {given}: the KB {root} was built with a different embedding "
                          f"model ({backend['model']}, sha256 {backend['model_sha256'][:12]}, this one "
                          f"{digest[:12]}); use that model or rebuild the KB")
    backend["model"] = str(Path(given).resolve())


def open_kb(kb: str | Path, embedding: str | Path | None = None) -> KnowledgeBase:
    """Open the KB folder ``kb``; ``embedding``, if given, must be the model it was built with."""
    root = Path(kb)
    manifest = read_manifest(root)
    _check_embedding(manifest, root, embedding)
    return _load(root, manifest)


def _load(root: Path, manifest: dict) -> KnowledgeBase:
    """The stored chunks (and embeddings) of the KB at ``root``, checked against its manifest."""
    try:
        with open(root / CHUNKS, encoding="utf-8") as handle:
            chunks = [json.loads(line) for line in handle if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{root / CHUNKS}: cannot be read ({exc}); rebuild the KB") from exc
    embeddings = None
    if manifest["backend"]["name"] == "embedding":
        try:
            embeddings = np.load(root / EMBEDDINGS)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{root / EMBEDDINGS}: cannot be read ({exc}); rebuild the KB") from exc
        if len(embeddings) != len(chunks):
            raise ConfigError(f"{root}: {len(embeddings)} embeddings for {len(chunks)} chunks; rebuild the KB")
    if len(chunks) != manifest.get("chunks", len(chunks)):
        raise ConfigError(f"{root}: {len(chunks)} chunks in {CHUNKS}, {manifest['chunks']} in {MANIFEST}; "
                          "rebuild the KB")
    return KnowledgeBase(root, manifest, chunks, embeddings)


# ---------------------------------------------------------------- build, add, remove


def _chunk(documents: list[Document], settings: SplitterSettings) -> tuple[list[dict], list[dict], list[Skipped]]:
    """Chunks of ``documents`` and their manifest entries; documents with no chunk are skipped."""
    entries, chunks, skipped = [], [], []
    for doc in documents:
        pieces = split_text(doc.text, settings)
        if not pieces:
            skipped.append(Skipped(doc.file, "empty (no text)"))
            continue
        entries.append({"file": doc.file, "path": str(doc.path.resolve()), "sha256": doc.sha256,
                        "chunks": len(pieces), "chars": len(doc.text)})
        chunks.extend({"file": doc.file, "chunk": i, "text": text} for i, text in enumerate(pieces))
    return entries, chunks, skipped


def _embed(manifest: dict, chunks: list[dict]) -> np.ndarray | None:
    if manifest["backend"]["name"] != "embedding":
        return None
    from chattune.kb.embedding import embed, load_model

    return embed(load_model(manifest["backend"]["model"]), [c["text"] for c in chunks])


def _settings(manifest: dict) -> SplitterSettings:
    s = manifest["splitter"]
    return SplitterSettings(chunk_size=s["chunk_size"], chunk_overlap=s["chunk_overlap"])


def _no_chunks(paths: Sequence, skipped: list[Skipped]) -> DataError:
    named = "; ".join(f"{s.file}: {s.reason}" for s in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return DataError(f"{' '.join(str(p) for p in paths)}: no readable text to index "
                     f"({len(skipped)} files skipped{': ' + named + more if skipped else ''}); "
                     "expected .txt, .md, .pdf, .docx, .html or .jsonl files with text")


def build(docs: Sequence[str | Path], out: str | Path, *, embedding: str | Path | None = None,
          chunk_size: int = 250, chunk_overlap: int = 50) -> Report:
    """Read ``docs`` (files or folders), split, index (BM25, or ``embedding``'s model) into ``out``.

    ``out`` must be new, empty, or a KB (which is then rebuilt). Raises :class:`DataError`
    when no file yields text.
    """
    settings = SplitterSettings(chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    root = Path(out)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / MANIFEST).is_file())):
        raise ConfigError(f"--out {root}: exists and is not a knowledge base; expected a new or empty "
                          "folder (or a KB folder to rebuild)")
    check_output_dir(root, "--out")
    sources, skipped = collect_sources(docs)
    documents = []
    for source in sources:
        result = read_document(source)
        (documents if isinstance(result, Document) else skipped).append(result)
    entries, chunks, empty = _chunk(documents, settings)
    skipped += empty
    if not chunks:
        raise _no_chunks(docs, skipped)
    backend = _backend(embedding)
    manifest = {"format": FORMAT, "version": VERSION, "backend": backend,
                "relevance": RELEVANCE[backend["name"]], "splitter": settings.to_json(),
                "files": entries, "chunks": len(chunks)}
    embeddings = _embed(manifest, chunks)
    if (root / EMBEDDINGS).exists() and embeddings is None:
        (root / EMBEDDINGS).unlink()
    _save(root, manifest, chunks, embeddings)
    return Report(root, added=[e["file"] for e in entries], skipped=skipped, new_chunks=len(chunks),
                  files=len(entries), chunks=len(chunks))


def add(kb: str | Path, files: Iterable[str | Path], *, embedding: str | Path | None = None) -> Report:
    """Add ``files`` (or folders) to the KB ``kb``; a file already there is replaced if its bytes changed.

    Only the new and changed files are read, split and embedded; the stored chunks (and
    embeddings) of the others are kept as they are.
    """
    files = list(files)
    base = open_kb(kb, embedding)
    root, manifest = base.root, base.manifest
    known = {e["file"]: e for e in manifest["files"]}
    sources, skipped = collect_sources(files)
    report = Report(root, skipped=skipped)
    documents = []
    for source in sources:
        try:
            digest = file_sha256(source.path)
        except OSError as exc:
            report.skipped.append(Skipped(source.file, f"cannot be read ({exc.strerror or exc})"))
            continue
        if source.file in known and known[source.file]["sha256"] == digest:
            report.unchanged.append(source.file)
            continue
        result = read_document(source, digest)
        (documents if isinstance(result, Document) else report.skipped).append(result)
    entries, new_chunks, empty = _chunk(documents, _settings(manifest))
    report.skipped += empty
    if not entries and not report.unchanged:
        raise _no_chunks(files, report.skipped)
    replaced = {e["file"] for e in entries}
    keep = [i for i, c in enumerate(base.chunks) if c["file"] not in replaced]
    new_embeddings = _embed(manifest, new_chunks)
    embeddings = (np.concatenate([base.embeddings[keep], new_embeddings]) if base.dense else None)
    for entry in entries:
        (report.updated if entry["file"] in known else report.added).append(entry["file"])
    manifest["files"] = [e for e in manifest["files"] if e["file"] not in replaced] + entries
    chunks = [base.chunks[i] for i in keep] + new_chunks
    _save(root, manifest, chunks, embeddings)
    report.new_chunks, report.files, report.chunks = len(new_chunks), len(manifest["files"]), len(chunks)
    return report


def remove(kb: str | Path, files: Iterable[str | Path]) -> Report:
    """Remove ``files`` from the KB ``kb``: named as in the manifest, or by their path on disk.

    Nothing is read or embedded again. A name the KB does not hold is an error.
    """
    base = _load(Path(kb), read_manifest(kb))  # no model needed: nothing is embedded
    manifest = base.manifest
    by_name = {e["file"]: e for e in manifest["files"]}
    by_path = {e["path"]: e["file"] for e in manifest["files"]}
    gone = []
    for given in files:
        name = str(given)
        norm = Path(os.path.normpath(name)).as_posix()
        match = (name if name in by_name else norm if norm in by_name
                 else by_path.get(str(Path(name).resolve())))
        if match is None:
            raise DataError(f"{given}: not in the KB {base.root}; expected one of its files "
                            f"({', '.join(list(by_name)[:5])}{', ...' if len(by_name) > 5 else ''})")
        gone.append(match)
    keep = [i for i, c in enumerate(base.chunks) if c["file"] not in set(gone)]
    manifest["files"] = [e for e in manifest["files"] if e["file"] not in set(gone)]
    chunks = [base.chunks[i] for i in keep]
    embeddings = base.embeddings[keep] if base.embeddings is not None else None
    _save(base.root, manifest, chunks, embeddings)
    return Report(base.root, removed=list(dict.fromkeys(gone)), files=len(manifest["files"]),
                  chunks=len(chunks))


# ---------------------------------------------------------------- search


def check_query(query: str, max_chars: int = MAX_QUERY_CHARS) -> str:
    """``query`` stripped; a one-line error if it is empty or longer than ``max_chars`` characters."""
    text = query.strip()
    if not text:
        raise DataError("query: empty; expected a question")
    if len(text) > max_chars:
        raise DataError(f"query: {len(text)} characters, more than the limit of {max_chars}; "
                        "expected a shorter question")
    return text


def check_threshold(threshold: float) -> float:
    """``threshold`` if it is a relevance in [0, 1]; else a one-line error saying what it means."""
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold: {threshold}; expected a relevance in [0, 1] where higher means "
                          "more similar (not a distance)")
    return threshold


def search(kb: KnowledgeBase | str | Path, query: str, *, top_k: int = TOP_K,
           threshold: float = THRESHOLD, embedding: str | Path | None = None,
           max_query_chars: int = MAX_QUERY_CHARS) -> list[Hit]:
    """The ``top_k`` chunks of ``kb`` most relevant to ``query`` with relevance >= ``threshold``.

    Hits come best first (ties in KB order); relevance is in [0, 1], higher = more
    similar (see :mod:`chattune.kb.index`). An empty list means nothing in the KB is
    relevant enough: answer with :func:`chattune.kb.prompt.cannot_answer`.
    """
    if top_k < 1:
        raise ConfigError(f"top_k: {top_k}; expected at least 1")
    check_threshold(threshold)
    text = check_query(query, max_query_chars)
    base = kb if isinstance(kb, KnowledgeBase) else open_kb(kb, embedding)
    if not base.chunks:
        raise DataError(f"{base.root}: the knowledge base holds no chunks (every file removed?); "
                        "add documents with `chattune kb add`")
    scores = base.relevance(text)
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [Hit(base.chunks[i]["file"], base.chunks[i]["chunk"], base.chunks[i]["text"], float(scores[i]))
            for i in order if scores[i] >= threshold and scores[i] > 0]  # 0: nothing in common
