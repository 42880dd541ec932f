"""Raw text for continued pre-training (``stage: pretrain``): documents into supervised rows.

No template: each document (:mod:`chattune.data.corpus`) is tokenized, EOS appended, and cut
into rows of at most ``max_seq_length`` tokens (a long document is split, never dropped), every
token supervised. Rows are then packed into ``max_seq_length`` blocks without attention
across rows, the same guarantee SFT packing gives (:mod:`chattune.training.batching`): a
block's documents never see each other, and a split document's parts do not see the part before.

``eval_fraction`` holds out documents by a hash of their text (:func:`chattune.data.corpus.held_out`),
the same documents ``chattune tokenizer extend --holdout`` holds out at the same share.
Prepared data is cached under a fingerprint like SFT data; ``streaming: true`` reads the
files lazily instead (:func:`stream_rows`), for corpora larger than memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from chattune import __version__
from chattune.config import DataArgs, DataSource
from chattune.data.corpus import CorpusCounts, Document, check_corpus_file, held_out, iter_documents
from chattune.data.prepare import (
    PreparedData,
    Progress,
    default_cache_dir,
    length_percentiles,
    load_cached,
    stderr_log,
    unwritable_cache,
)
from chattune.data.remote import localized
from chattune.data.sources import file_digest
from chattune.errors import ConfigError, DataError
from chattune.model import tokenizer_hash

PRETRAIN_ENCODING_VERSION = 1
TOKENIZE_BATCH = 256
"""Documents tokenized together (the fast tokenizer's batch call)."""


def _check_sources(sources: list[DataSource], key: str) -> None:
    for source in sources:
        if source.format != "auto" or source.columns or source.weight != 1.0:
            raise ConfigError(f"{key}: {source.path}: stage pretrain reads raw text (text_field, text_documents); "
                              "format, columns and weight do not apply, expected a path (and max_samples)")


def read_documents(sources: list[DataSource], data: DataArgs, counts: list[CorpusCounts]) -> Iterator[Document]:
    """The documents of ``sources`` in order, lazily (``max_samples``: a file's first N)."""
    fields = data.text_field if len(data.text_field) > 1 else data.text_field[0]
    for source in sources:
        count = CorpusCounts(source.path)
        counts.append(count)
        documents = iter_documents(source.path, text_field=fields, text_documents=data.text_documents, counts=count)
        yield from itertools.islice(documents, source.max_samples)


def document_rows(texts: list[str], tokenizer, max_len: int) -> list[list[list[int]]]:
    """Per text, its rows: the text tokenized (no special tokens), EOS appended, cut into rows
    of ``max_len`` tokens."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [[ids[start:start + max_len] for start in range(0, len(ids), max_len)]
            for ids in (ids + eos for ids in encoded)]


class _Split:
    """One split's rows and counts as they are encoded."""

    def __init__(self):
        self.rows: list[list[int]] = []
        self.documents = self.split_documents = self.chars = 0
        self.pending: list[str] = []

    def add(self, text: str, tokenizer, max_len: int) -> None:
        self.pending.append(text)
        if len(self.pending) >= TOKENIZE_BATCH:
            self.flush(tokenizer, max_len)

    def flush(self, tokenizer, max_len: int) -> None:
        if not self.pending:
            return
        self.chars += sum(len(text) for text in self.pending)
        for parts in document_rows(self.pending, tokenizer, max_len):
            self.rows += parts
            self.documents += 1
            self.split_documents += len(parts) > 1
        self.pending = []

    def audit(self) -> dict:
        lengths = [len(r) for r in self.rows]
        tokens = sum(lengths)
        return {"documents": self.documents, "documents_split": self.split_documents, "chars": self.chars,
                "rows_in": self.documents, "rows_out": len(self.rows), "rows_dropped": 0, "rows_truncated": 0,
                "tokens": tokens, "supervised_tokens": tokens, "supervised_share": 1.0 if tokens else 0.0,
                "length": length_percentiles(lengths)}


def pretrain_fingerprint(data: DataArgs, tokenizer, seed: int) -> str:
    """A hash of everything the encoded pre-training rows depend on."""
    def source_key(source: DataSource) -> dict:
        return {"path": str(Path(source.path).resolve()), "sha256": file_digest(source.path),
                "max_samples": source.max_samples}

    payload = {"stage": "pretrain", "train": [source_key(s) for s in data.train_files],
               "eval": [source_key(s) for s in data.eval_files], "eval_fraction": data.eval_fraction,
               "text_field": data.text_field, "text_documents": data.text_documents,
               "tokenizer": tokenizer_hash(tokenizer), "max_seq_length": data.max_seq_length,
               "encoding_version": PRETRAIN_ENCODING_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _no_text(counts: list[CorpusCounts], key: str) -> DataError:
    files = "; ".join(f"{c.path}: {c.read} read, {c.empty} empty" for c in counts) or "no files"
    return DataError(f"{key}: no documents to train on ({files}); expected UTF-8 text documents "
                     "(text_field names the field of JSON/Parquet rows, text_documents how text files split)")


def prepare_pretrain_data(data: DataArgs, tokenizer, seed: int, cache_dir: str | Path | None = None,
                          force: bool = False, log=stderr_log) -> PreparedData:
    """Encode (or reuse from the cache) the documents of a pre-training run into rows of at most
    ``max_seq_length`` tokens, every token supervised; the audit counts documents, split
    documents, characters and tokens per split and every file's rows.

    Raises ConfigError for missing ``train_files`` or an unwritable cache folder, DataFileError
    for an unreadable file (naming it and the line), DataError when no document is left."""
    from datasets import Dataset, disable_progress_bars, load_from_disk

    disable_progress_bars()
    if not data.train_files:
        raise ConfigError("train_files: no training text given; set train_files to one or more text files")
    _check_sources(data.train_files, "train_files")
    _check_sources(data.eval_files, "eval_files")
    data = localized(data, Path(cache_dir or data.cache_dir or default_cache_dir()), log)
    fingerprint = pretrain_fingerprint(data, tokenizer, seed)
    root = Path(cache_dir or data.cache_dir or default_cache_dir()) / "datasets" / fingerprint
    if (root / "audit.json").is_file() and not force:
        cached = load_cached(root, fingerprint)
        if cached is not None:
            return cached
    progress = Progress(log)
    counts: list[CorpusCounts] = []
    eval_counts: list[CorpusCounts] = []
    train, evaluation = _Split(), _Split()
    max_len = data.max_seq_length
    for n, document in enumerate(read_documents(data.train_files, data, counts), start=1):
        held = not data.eval_files and held_out(document.text, data.eval_fraction)
        (evaluation if held else train).add(document.text, tokenizer, max_len)
        if n % 1000 == 0:
            progress.rows("encoding", n, n)
    for document in read_documents(data.eval_files, data, eval_counts):
        evaluation.add(document.text, tokenizer, max_len)
    train.flush(tokenizer, max_len)
    evaluation.flush(tokenizer, max_len)
    if not train.rows:
        raise _no_text(counts, "train_files")
    if data.eval_files and not evaluation.rows:
        raise _no_text(eval_counts, "eval_files")
    audit = {"stage": "pretrain", "fingerprint": fingerprint, "template": None, "max_seq_length": max_len,
             "chattune_version": __version__, "text_field": data.text_field, "text_documents": data.text_documents,
             "files": [c.to_json() for c in counts], "eval_files": [c.to_json() for c in eval_counts],
             "train": train.audit(), "eval": evaluation.audit() if evaluation.rows else None}
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        Dataset.from_dict({"input_ids": train.rows, "labels": train.rows}).save_to_disk(str(tmp / "train"))
        if evaluation.rows:
            Dataset.from_dict({"input_ids": evaluation.rows, "labels": evaluation.rows}).save_to_disk(str(tmp / "eval"))
        (tmp / "audit.json").write_text(json.dumps(audit, indent=2, ensure_ascii=False), encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        try:
            tmp.rename(root)
        except OSError:
            if load_cached(root, fingerprint) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        origin = "cache_dir" if (cache_dir or data.cache_dir) else "the default cache folder"
        raise unwritable_cache(origin, root, exc) from exc
    train_set = load_from_disk(str(root / "train"))
    eval_set = load_from_disk(str(root / "eval")) if (root / "eval").exists() else None
    progress.finished(f"read and encoded {train.documents:,} train and {evaluation.documents:,} eval documents")
    return PreparedData(train_set, eval_set, audit, fingerprint, root, reused=False)


def streamed_data(data: DataArgs, tokenizer, train) -> PreparedData:
    """A streaming run's data: ``train`` (the lazily read training rows, see :func:`stream_rows`)
    and ``eval_files`` encoded up front; the audit lists the files (their counts are known only
    as they are read). Raises ConfigError for eval_fraction (a stream cannot hold documents out
    before it has read them; give eval_files)."""
    from datasets import Dataset

    _check_sources(data.train_files, "train_files")
    _check_sources(data.eval_files, "eval_files")
    if not data.train_files:
        raise ConfigError("train_files: no training text given; set train_files to one or more text files")
    for source in data.train_files:
        check_corpus_file(source.path)
    if data.eval_fraction:
        raise ConfigError("eval_fraction: a streamed corpus is read as training goes; hold out documents "
                          "in eval_files instead (or set streaming=false)")
    counts: list[CorpusCounts] = []
    evaluation = _Split()
    for document in read_documents(data.eval_files, data, counts):
        evaluation.add(document.text, tokenizer, data.max_seq_length)
    evaluation.flush(tokenizer, data.max_seq_length)
    if data.eval_files and not evaluation.rows:
        raise _no_text(counts, "eval_files")
    eval_set = (Dataset.from_dict({"input_ids": evaluation.rows, "labels": evaluation.rows})
                if evaluation.rows else None)
    fingerprint = "stream-" + pretrain_fingerprint(data, tokenizer, 0)
    audit = {"stage": "pretrain", "streaming": True, "fingerprint": fingerprint, "template": None,
             "max_seq_length": data.max_seq_length, "chattune_version": __version__,
             "text_field": data.text_field, "text_documents": data.text_documents,
             "files": [{"path": s.path} for s in data.train_files], "eval_files": [c.to_json() for c in counts],
             "train": None, "eval": evaluation.audit() if evaluation.rows else None}
    return PreparedData(train, eval_set, audit, fingerprint, Path(), reused=False)


def stream_rows(data: DataArgs, tokenizer, *, rank: int = 0, world_size: int = 1,
                counts: list[CorpusCounts] | None = None) -> Iterator[list[int]]:
    """The training rows of ``train_files`` read lazily, document batch by batch (flat memory
    however large the files), without the held-out documents; with several processes each
    takes every ``world_size``-th document. The files are read once per call: an epoch."""
    counts = counts if counts is not None else []
    batch: list[str] = []
    documents = read_documents(data.train_files, data, counts)
    for n, document in enumerate(documents):
        if n % world_size != rank or (not data.eval_files and held_out(document.text, data.eval_fraction)):
            continue
        batch.append(document.text)
        if len(batch) >= TOKENIZE_BATCH:
            yield from itertools.chain.from_iterable(document_rows(batch, tokenizer, data.max_seq_length))
            batch = []
    if batch:
        yield from itertools.chain.from_iterable(document_rows(batch, tokenizer, data.max_seq_length))


def pack_stream(rows: Iterable[list[int]], capacity: int) -> Iterator[list[list[int]]]:
    """Rows in arrival order filled into blocks of at most ``capacity`` tokens (a block is
    emitted when the next row does not fit)."""
    block: list[list[int]] = []
    used = 0
    for row in rows:
        if block and used + len(row) > capacity:
            yield block
            block, used = [], 0
        block.append(row)
        used += len(row)
    if block:
        yield block


def format_pretrain_audit(audit: dict) -> str:
    """The pre-training audit as a readable report."""
    lines = [f"data fingerprint {audit['fingerprint']}  stage pretrain  max_seq_length {audit['max_seq_length']}"]
    if audit.get("streaming"):
        lines.append(f"  streaming {len(audit['files'])} train files, read as training goes: "
                     + ", ".join(f["path"] for f in audit["files"]))
    for f in audit["files"] + audit.get("eval_files", []):
        if "read" not in f:
            continue
        lines.append(f"  {f['path']}: {f['read']} read, {f['documents']} documents, {f['empty']} empty, "
                     f"{f['chars']:,} characters")
    for split in ("train", "eval"):
        a = audit.get(split)
        if not a:
            continue
        length = a["length"]
        lines.append(f"[{split}] documents {a['documents']} ({a['documents_split']} split into several rows), "
                     f"rows {a['rows_out']}, tokens {a['tokens']:,} (all supervised), "
                     f"{a['tokens'] / max(a['chars'], 1):.3f} tokens per character; row length p50 "
                     f"{length['p50']} p90 {length['p90']} max {length['max']}")
    return "\n".join(lines)
