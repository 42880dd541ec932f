"""Conversation data streamed for stage sft (``streaming: true``): rows read, converted and
encoded as training takes them, with flat memory however large the files.

The rows are those :func:`chattune.data.prepare.prepare_data` would encode, in file order: each
raw row is read (:func:`chattune.data.formats.read_rows`: a line at a time for JSON Lines and
CSV; a ``.json`` array or Parquet file is read whole first), converted and counted
(:func:`chattune.data.sources.iter_source`: a bad row skipped with its reason as it is met, a
duplicate dropped), then encoded on its own by the same template, truncation and masks
(:func:`encode_record`), so that every row gets the same ``input_ids`` and ``labels``. The files
are read one after another, and again from the first when training needs more rows (a pass;
duplicates are looked for within a pass). Rows are read one at a time, as training asks for
them, so the counts (:meth:`ConversationStream.audit`) say exactly how far the stream has read.

Memory: one row at a time and a bounded tokenizer cache; with ``dedup`` (the default) a hash of
every distinct row of the pass (about 100 bytes each). What needs a whole file first is refused
naming the key (:func:`check_streamable`): ``eval_fraction``, a file's ``max_samples`` or
``weight``, an interleaving ``mix_strategy``, and packing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from chattune import __version__
from chattune.config import DataArgs
from chattune.data.encode import IGNORE_INDEX, Encoded, EncodeOptions, PieceEncoder, encode_all
from chattune.data.images import encode_image_record, stray_image_token
from chattune.data.prepare import (
    PreparedData,
    _encode_split,
    _why_no_rows,
    data_fingerprint,
    format_audit,
    stderr_log,
)
from chattune.data.sources import FileSummary, iter_source, load_records, source_index
from chattune.errors import ConfigError, DataError
from chattune.templates.pieces import uses_tools

CACHE_ENTRIES = 100_000
"""Texts the stream's tokenizer cache keeps (the least recently used go first)."""
CACHE_CHARS = 50_000_000
"""Characters the stream's tokenizer cache keeps at most."""
DROPPED_EXAMPLES = 5


def check_streamable(data: DataArgs) -> None:
    """Raise ConfigError, naming the key, for what a stream of conversations cannot do: no
    ``train_files``, ``eval_fraction`` (give eval_files), a file's ``max_samples`` or ``weight``
    (a seeded sample needs the whole file), an interleaving ``mix_strategy``, and ``packing``
    pack or padding_free (a stream's row lengths are not known ahead; rows are padded)."""
    if not data.train_files:
        raise ConfigError("train_files: no training data given; set train_files to one or more data files")
    if data.eval_fraction:
        raise ConfigError("eval_fraction: streamed data is read as training goes; hold out rows in eval_files "
                          "instead (or set streaming=false)")
    for source in data.train_files:
        if source.max_samples is not None:
            raise ConfigError(f"max_samples: {source.path}: a seeded sample of a file needs all of it read first; "
                              "with streaming, cut the file instead (or set streaming=false)")
        if source.weight != 1.0:
            raise ConfigError(f"weight: {source.path}: weighting a file samples or repeats its rows, which needs "
                              "all of it read first; with streaming leave weight at 1 (or set streaming=false)")
    if data.mix_strategy != "concat":
        raise ConfigError(f"mix_strategy: {data.mix_strategy} is not streamed; streamed files are read one "
                          "after another (mix_strategy=concat), or set streaming=false")
    if data.packing in ("pack", "padding_free"):
        raise ConfigError(f"packing: {data.packing} needs every row's length ahead, and streamed rows are "
                          "read as training goes; use packing=pad or auto (streamed rows are padded), "
                          "or set streaming=false")


def stream_encoder(tokenizer, data: DataArgs) -> PieceEncoder:
    """The tokenizer cache of a stream: bounded (it lives as long as training), keeping no more
    of a text than ``max_seq_length`` tokens, as data preparation does."""
    return PieceEncoder(tokenizer, max_entries=CACHE_ENTRIES, max_chars=CACHE_CHARS,
                        head_tokens=data.max_seq_length)


def encode_record(record, template_name: str, encoder: PieceEncoder, options: EncodeOptions,
                  vision=None) -> tuple[Encoded, int]:
    """One record encoded exactly as data preparation encodes it (its tools offered, a row with
    images through :func:`~chattune.data.images.encode_image_record`), and its image tokens."""
    if getattr(record, "images", None):
        return encode_image_record(record, template_name, encoder, options, vision)
    (encoded,) = encode_all([record.messages], template_name, encoder, options, sources=[record.source],
                            tools=[record.tools])
    return stray_image_token(encoded, vision), 0


def _percentile(lengths: Counter, total: int, q: float) -> int:
    """numpy's (linear) ``q``-th percentile of ``total`` lengths counted in ``lengths``, truncated."""
    position = q / 100 * (total - 1)
    below = int(position)
    low, high = _nth(lengths, below), _nth(lengths, min(below + 1, total - 1))
    return int(low + (high - low) * (position - below))


def _nth(lengths: Counter, n: int) -> int:
    """The ``n``-th smallest (from 0) of the lengths counted in ``lengths``."""
    seen = 0
    for length in sorted(lengths):
        seen += lengths[length]
        if seen > n:
            return length
    raise IndexError(n)


class StreamTally:
    """The audit of a streamed split, kept as rows are encoded (the keys of the prepared audit's
    split; row lengths in a histogram, at most ``max_seq_length`` entries)."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.rows_in = self.rows_out = self.truncated = self.chars_cut = 0
        self.tokens = self.supervised = self.call_tokens = self.tool_rows = self.tool_calls = 0
        self.dropped: Counter = Counter()
        self.dropped_examples: list[str] = []
        self.most_cut: dict | None = None
        self.lengths: Counter = Counter()
        self.per_source = [{"path": path, "rows": 0, "tokens": 0, "supervised_tokens": 0} for path in paths]

    def add(self, record, encoded: Encoded) -> None:
        """Count one encoded record: kept (its tokens and supervised tokens) or dropped with its reason."""
        self.rows_in += 1
        if encoded.dropped:
            self.dropped[encoded.dropped] += 1
            if len(self.dropped_examples) < DROPPED_EXAMPLES:
                self.dropped_examples.append(f"{record.source}: {encoded.dropped}")
            return
        self.rows_out += 1
        self.truncated += encoded.truncated
        self.chars_cut += encoded.chars_cut
        if encoded.chars_cut and (self.most_cut is None or encoded.chars_cut > self.most_cut["chars_cut"]):
            self.most_cut = {"source": record.source, "chars_cut": encoded.chars_cut}
        length = len(encoded.input_ids)
        supervised = sum(1 for label in encoded.labels if label != IGNORE_INDEX)
        self.lengths[length] += 1
        self.tokens += length
        self.supervised += supervised
        which = source_index(record.source, self.paths) if len(self.paths) > 1 else None
        if which is not None:
            self.per_source[which]["rows"] += 1
            self.per_source[which]["tokens"] += length
            self.per_source[which]["supervised_tokens"] += supervised
        self.call_tokens += encoded.supervised_call_tokens
        self.tool_rows += uses_tools(record.messages, record.tools)
        self.tool_calls += encoded.tool_calls

    def length(self) -> dict:
        """p50/p90/p99/max/mean of the kept rows' lengths, as :func:`~chattune.data.prepare.length_percentiles`."""
        if not self.rows_out:
            return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
        points = {f"p{q}": _percentile(self.lengths, self.rows_out, q) for q in (50, 90, 99)}
        return {**points, "max": max(self.lengths), "mean": round(self.tokens / self.rows_out, 1)}

    def audit(self) -> dict:
        """The split's audit so far, with the keys of a prepared split's."""
        audit = {
            "rows_in": self.rows_in, "rows_out": self.rows_out, "rows_truncated": self.truncated,
            "chars_cut": self.chars_cut, "most_cut": self.most_cut,
            "rows_dropped": sum(self.dropped.values()), "dropped_reasons": dict(self.dropped),
            "dropped_examples": self.dropped_examples, "tokens": self.tokens,
            "supervised_tokens": self.supervised,
            "supervised_share": round(self.supervised / self.tokens, 4) if self.tokens else 0.0,
            "rows_with_tools": self.tool_rows, "tool_calls": self.tool_calls,
            "supervised_call_tokens": self.call_tokens, "length": self.length(),
        }
        if len(self.per_source) > 1:
            audit["sources"] = self.per_source
        return audit


class ConversationStream:
    """The training rows of ``data.train_files`` read, converted and encoded lazily, pass after
    pass (:meth:`rows`), each row counted as it is met (:meth:`audit`)."""

    def __init__(self, data: DataArgs, tokenizer, template_name: str):
        self.data, self.template_name = data, template_name
        self.encoder = stream_encoder(tokenizer, data)
        self.options = EncodeOptions(data.max_seq_length, data.train_on_prompt, data.train_last_turn_only)
        self.reset()

    def reset(self) -> None:
        """Forget the counts (a new reading from the first row)."""
        self.summaries = [FileSummary(path=s.path, format=s.format) for s in self.data.train_files]
        self.tally = StreamTally([s.path for s in self.data.train_files])
        self.passes = 0

    def one_pass(self) -> Iterator[dict]:
        """The kept rows (``input_ids``, ``labels``) of one reading of the files, in order."""
        seen: set[str] = set()  # duplicates are looked for within a pass
        for source, summary in zip(self.data.train_files, self.summaries, strict=True):
            for record in iter_source(source, summary, strict=self.data.strict, dedup=self.data.dedup, seen=seen):
                encoded, _ = encode_record(record, self.template_name, self.encoder, self.options)
                self.tally.add(record, encoded)
                if not encoded.dropped:
                    yield {"input_ids": encoded.input_ids, "labels": encoded.labels}

    def rows(self) -> Iterator[dict]:
        """Every kept row, from the first, the files read again after each pass, endlessly
        (training stops at ``max_steps``); the counts start again with it. Raises DataError for
        a pass that leaves no row, with what happened to every file's rows."""
        self.reset()
        while True:
            kept = 0
            for row in self.one_pass():
                kept += 1
                yield row
            if not kept:
                raise DataError(f"train_files: no training rows left after reading and encoding: "
                                f"{_why_no_rows(self.summaries, self.tally.audit(), self.data.max_seq_length)}")
            self.passes += 1

    def audit(self) -> dict:
        """The counts so far: every file's rows (read, converted, skipped with reasons,
        duplicated; summed over the passes), the encoded rows (the train split's audit) and the
        passes read to the end."""
        return {"files": [summary.to_json() for summary in self.summaries], "train": self.tally.audit(),
                "stream": {"passes": self.passes, "rows_read": sum(s.read for s in self.summaries),
                           "rows_encoded": self.tally.rows_in, "rows_kept": self.tally.rows_out}}


def first_row(data: DataArgs, tokenizer, template_name: str) -> dict:
    """The first training row a stream gives (read on a stream of its own, so counting nothing
    of the run's), to find a data set that cannot train before the model loads. Raises DataError
    when a pass leaves no row, DataFileError for an unreadable start of a file."""
    return next(ConversationStream(data, tokenizer, template_name).rows())


def streamed_sft_data(data: DataArgs, tokenizer, template_name: str, seed: int, train,
                      log=stderr_log) -> PreparedData:
    """A streaming SFT run's data: ``train`` (the lazily read rows, a
    :class:`ConversationStream` or what wraps one) and ``eval_files`` encoded up front, as data
    preparation encodes them (not cached); the audit lists the train files (their counts come as
    they are read). Raises ConfigError for what cannot stream (:func:`check_streamable`),
    DataError when the train files give no row or eval_files none."""
    check_streamable(data)
    fingerprint = "stream-" + data_fingerprint(data, template_name, tokenizer, seed)  # checks every file
    first_row(data, tokenizer, template_name)
    if data.dedup:
        log("streaming: dedup keeps a hash of every distinct row of a pass (about 100 bytes a row); "
            "set dedup=false for memory that stays flat")
    eval_summaries, eval_audit, eval_set = [], None, None
    if data.eval_files:
        eval_set, eval_audit, eval_summaries = _encode_eval(data, tokenizer, template_name, seed)
    audit = {"streaming": True, "fingerprint": fingerprint, "template": template_name,
             "max_seq_length": data.max_seq_length, "chattune_version": __version__,
             "train_files": [s.path for s in data.train_files], "files": [],
             "eval_files": [s.to_json() for s in eval_summaries], "train": None, "eval": eval_audit}
    return PreparedData(train, eval_set, audit, fingerprint, Path(), reused=False)


def _encode_eval(data: DataArgs, tokenizer, template_name: str, seed: int):
    """``eval_files`` read and encoded as data preparation does: the data set, its audit, the files' summaries."""
    from datasets import Dataset

    records, summaries = load_records(data.eval_files, strict=data.strict, dedup=data.dedup, seed=seed)
    encoder = PieceEncoder(tokenizer, head_tokens=data.max_seq_length)
    options = EncodeOptions(data.max_seq_length, data.train_on_prompt, data.train_last_turn_only)
    rows, audit = (_encode_split(records, template_name, encoder, options, split="eval")
                   if records else ({"input_ids": []}, None))
    if not rows["input_ids"]:
        raise DataError(f"eval_files: no evaluation rows left after reading and encoding: "
                        f"{_why_no_rows(summaries, audit, data.max_seq_length)}")
    return Dataset.from_dict(rows), audit, summaries


def format_stream_audit(audit: dict) -> str:
    """A streamed SFT audit as a readable report: the files streamed, then the counts so far
    (none before training reads a row) and the eval set, as :func:`~chattune.data.prepare.format_audit`."""
    lines = format_audit(audit).split("\n")
    if not audit["files"] and not audit["eval_files"]:
        del lines[1]  # the files' table, empty before training reads a row
    stream = audit.get("stream")
    read = (f"; so far {stream['rows_read']} rows read, {stream['rows_kept']} kept, {stream['passes']} passes "
            "read to the end" if stream else "")
    lines.insert(1, f"  streaming {len(audit['train_files'])} train files, read as training goes{read}: "
                    + ", ".join(audit["train_files"]))
    return "\n".join(lines)
