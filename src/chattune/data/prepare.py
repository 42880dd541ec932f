"""Read, render and encode a run's data; cache it (Arrow) under a fingerprint; audit it.

The fingerprint covers everything the encoded rows depend on: the data files'
bytes and how they are read, the tokenizer, the template, the maximum length
and the encoding options. The same fingerprint reuses the cached data set.

A long preparation says how far it is (:class:`Progress`: a line at most every few seconds,
none for a data set prepared faster than that); the audit counts the characters truncation
cut and names the row that lost the most.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chattune import __version__
from chattune.config import DataArgs
from chattune.data.encode import IGNORE_INDEX, EncodeOptions, PieceEncoder, encode_all
from chattune.data.images import encode_image_record, stray_image_token
from chattune.data.remote import localized
from chattune.data.sources import (
    FileSummary,
    file_digest,
    format_file_rows,
    load_records,
    source_index,
    split_eval,
)
from chattune.errors import ConfigError, DataError
from chattune.model import tokenizer_hash
from chattune.templates.pieces import uses_tools
from chattune.templates.registry import template_provenance

ENCODING_VERSION = 3  # 2: tools, tool calls and results (audit counts them); 3: characters cut
PROGRESS_SECONDS = 5.0
"""The least time between two progress lines, and before the first."""
PROGRESS_ROWS = 1000
"""Rows encoded between two looks at the clock."""


@dataclass
class PreparedData:
    """The encoded train and eval sets, their audit and fingerprint."""

    train: object
    eval: object | None
    audit: dict
    fingerprint: str
    cache_path: Path
    reused: bool


def stderr_log(message: str) -> None:
    """Print ``message`` on stderr at once (the default ``log`` of data preparation)."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """Progress lines of a long data preparation through ``log``: at most one every ``every``
    seconds and none in the first ``every`` seconds, so a small data set prints nothing."""

    def __init__(self, log=stderr_log, every: float | None = None, clock=time.monotonic):
        self.log, self.clock = log, clock
        self.every = PROGRESS_SECONDS if every is None else every
        self.started = self.last = clock()
        self.lines = 0

    def elapsed(self) -> float:
        """Seconds since the preparation started."""
        return self.clock() - self.started

    def rows(self, what: str, done: int, total: int) -> None:
        """``done`` of ``total`` rows of ``what`` are through, said when it is time to."""
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        self.lines += 1
        share = f" ({done / total:.0%})" if total else ""
        self.log(f"data: {what} {done:,}/{total:,} rows{share}, {now - self.started:.0f} s")

    def finished(self, message: str) -> None:
        """The last line, said where the preparation took long enough to say anything."""
        if self.lines or self.elapsed() >= self.every:
            self.log(f"data: {message} in {self.elapsed():.0f} s")


def default_cache_dir() -> Path:
    """``$CHATTUNE_CACHE`` or ``~/.cache/chattune``."""
    return Path(os.environ.get("CHATTUNE_CACHE", Path.home() / ".cache" / "chattune"))


def data_fingerprint(data: DataArgs, template_name: str, tokenizer, seed: int, vision=None) -> str:
    """A hash of everything the encoded data set depends on (for a vision-language model, its
    image processor's settings too)."""
    def source_key(source):
        """What the encoded rows depend on of one data file: its path, bytes and read options."""
        return {"path": str(Path(source.path).resolve()), "sha256": file_digest(source.path),
                "format": source.format, "columns": source.columns,
                "max_samples": source.max_samples, "weight": source.weight}

    payload = {
        "train": [source_key(s) for s in data.train_files],
        "eval": [source_key(s) for s in data.eval_files],
        "eval_fraction": data.eval_fraction, "seed": seed, "dedup": data.dedup,
        **({"mix": [data.mix_strategy, data.interleave_probs]} if data.mix_strategy != "concat" else {}),
        "tokenizer": tokenizer_hash(tokenizer),
        "template": template_provenance(template_name, tokenizer),
        "max_seq_length": data.max_seq_length, "train_on_prompt": data.train_on_prompt,
        "train_last_turn_only": data.train_last_turn_only, "encoding_version": ENCODING_VERSION,
    }
    if vision is not None:
        payload["vision"] = vision.fingerprint()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def length_percentiles(lengths: list[int]) -> dict:
    """p50/p90/p99/max/mean of row lengths (zeros for none), as audits report them."""
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    arr = np.asarray(lengths)
    return {"p50": int(np.percentile(arr, 50)), "p90": int(np.percentile(arr, 90)),
            "p99": int(np.percentile(arr, 99)), "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}


def _encode_rows(records, template_name, encoder, options, vision) -> tuple[list, list[int]]:
    """Each record encoded (rows with images through :func:`encode_image_record`), and each
    one's image tokens."""
    tools = [getattr(r, "tools", None) for r in records]  # records read before tools carry none
    plain = [i for i, r in enumerate(records) if not getattr(r, "images", None)]
    encoded: list = [None] * len(records)
    image_tokens = [0] * len(records)
    done = encode_all([records[i].messages for i in plain], template_name, encoder, options,
                      sources=[records[i].source for i in plain], tools=[tools[i] for i in plain])
    for i, enc in zip(plain, done, strict=True):
        encoded[i] = stray_image_token(enc, vision)
    for i, record in enumerate(records):
        if encoded[i] is None:
            encoded[i], image_tokens[i] = encode_image_record(record, template_name, encoder, options, vision)
    return encoded, image_tokens


def _encode_split(records, template_name, encoder, options, *, split: str = "train",
                  progress: Progress | None = None, vision=None, paths: list[str] | None = None):
    """Encode one split's records (``PROGRESS_ROWS`` at a time, telling ``progress``); the rows
    and their audit. Rows with tools are counted (``rows_with_tools``, their ``tool_calls``) and
    the supervised tokens of tool calls apart (``supervised_call_tokens``, part of
    ``supervised_tokens``); truncated rows by the characters cut (``chars_cut``, and ``most_cut``:
    the row that lost the most). Rows with images (``vision``: the model's
    :class:`~chattune.vision.processor.VisionProcessor`) keep their images in an ``images``
    column, and the audit counts them (``rows_with_images``, ``images``, ``image_tokens``,
    ``text_tokens``). With several files (``paths``), ``sources`` gives each one's rows and tokens
    as they are in the split (after any mixing, holding out and dropping)."""
    tools = [getattr(r, "tools", None) for r in records]  # records read before tools carry none
    encoded, image_tokens = [], []
    per_source = [{"path": path, "rows": 0, "tokens": 0, "supervised_tokens": 0} for path in paths or []]
    for start in range(0, len(records), PROGRESS_ROWS):
        chunk_rows, chunk_images = _encode_rows(records[start:start + PROGRESS_ROWS], template_name, encoder,
                                                options, vision)
        encoded += chunk_rows
        image_tokens += chunk_images
        if progress is not None:
            progress.rows(f"encoding {split}", len(encoded), len(records))
    with_images = any(getattr(r, "images", None) for r in records) and vision is not None
    rows = {"input_ids": [], "labels": [], **({"images": []} if with_images else {})}
    image_rows = images = image_token_total = 0
    dropped: Counter = Counter()
    dropped_examples = []
    truncated = chars_cut = 0
    most_cut = None
    tokens = supervised = call_tokens = tool_rows = tool_calls = 0
    lengths = []
    for record, row_tools, enc, row_image_tokens in zip(records, tools, encoded, image_tokens, strict=True):
        if enc.dropped:
            dropped[enc.dropped] += 1
            if len(dropped_examples) < 5:
                dropped_examples.append(f"{record.source}: {enc.dropped}")
            continue
        truncated += enc.truncated
        chars_cut += enc.chars_cut
        if enc.chars_cut and (most_cut is None or enc.chars_cut > most_cut["chars_cut"]):
            most_cut = {"source": record.source, "chars_cut": enc.chars_cut}
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append(enc.labels)
        if with_images:
            rows["images"].append(list(record.images or []))
            image_rows += bool(record.images)
            images += len(record.images or [])
            image_token_total += row_image_tokens
        lengths.append(len(enc.input_ids))
        tokens += len(enc.input_ids)
        row_supervised = sum(1 for label in enc.labels if label != IGNORE_INDEX)
        supervised += row_supervised
        which = source_index(record.source, paths) if per_source else None
        if which is not None:
            per_source[which]["rows"] += 1
            per_source[which]["tokens"] += len(enc.input_ids)
            per_source[which]["supervised_tokens"] += row_supervised
        call_tokens += enc.supervised_call_tokens
        tool_rows += uses_tools(record.messages, row_tools)
        tool_calls += enc.tool_calls
    audit = {
        "rows_in": len(records), "rows_out": len(rows["input_ids"]), "rows_truncated": truncated,
        "chars_cut": chars_cut, "most_cut": most_cut,
        "rows_dropped": sum(dropped.values()), "dropped_reasons": dict(dropped),
        "dropped_examples": dropped_examples, "tokens": tokens, "supervised_tokens": supervised,
        "supervised_share": round(supervised / tokens, 4) if tokens else 0.0,
        "rows_with_tools": tool_rows, "tool_calls": tool_calls, "supervised_call_tokens": call_tokens,
        "length": length_percentiles(lengths),
    }
    if len(per_source) > 1:
        audit["sources"] = per_source
    if with_images:
        audit.update(rows_with_images=image_rows, images=images, image_tokens=image_token_total,
                     text_tokens=tokens - image_token_total)
    return rows, audit


def _counts(counter) -> str:
    return ", ".join(f"{count} x {reason}" for reason, count in counter.most_common())


def _why_no_rows(summaries: list[FileSummary], audit: dict | None, max_seq_length: int) -> str:
    """What happened to every row of some files that left no row to use, as one line."""
    parts = []
    for s in summaries:
        if s.read == 0:
            parts.append(f"{s.path}: no rows (empty file, or a CSV with a header only)")
            continue
        bits = [f"{s.read} row{'s' if s.read != 1 else ''} read"]
        if s.skipped_total:
            bits.append(f"{s.skipped_total} skipped ({_counts(s.skipped)})")
        if s.duplicated:
            bits.append(f"{s.duplicated} duplicates")
        if s.sampled_out:
            bits.append(f"{s.sampled_out} sampled out")
        text = f"{s.path}: " + ", ".join(bits)
        if s.examples:
            text += f"; first error: {s.examples[0]}"
        parts.append(text)
    if audit and audit["rows_in"]:
        parts.append(f"all {audit['rows_in']} rows were dropped at encoding "
                     f"({_counts(Counter(audit['dropped_reasons']))}) with max_seq_length={max_seq_length}; "
                     "raise max_seq_length or choose a template with shorter markers")
    return "; ".join(parts)


def _cache_origin(cache_dir, data: DataArgs) -> str:
    if cache_dir:
        return "the cache_dir argument"
    if data.cache_dir:
        return "cache_dir"
    return "$CHATTUNE_CACHE" if "CHATTUNE_CACHE" in os.environ else "the default cache folder"


def unwritable_cache(origin: str, where: Path, exc: OSError) -> ConfigError:
    """The error for a cache folder (from ``origin``) that cannot be written."""
    return ConfigError(f"cache_dir: cannot write the encoded data set to {where} "
                       f"(from {origin}): {exc.strerror or exc}; set cache_dir to a writable folder")


def load_cached(root: Path, fingerprint: str) -> PreparedData | None:
    """The cached data set at ``root``, or None when it is missing or unreadable (it is then re-encoded)."""
    from datasets import load_from_disk

    try:
        audit = json.loads((root / "audit.json").read_text(encoding="utf-8"))
        if not isinstance(audit, dict) or audit.get("fingerprint") != fingerprint:
            return None
        train = load_from_disk(str(root / "train"))
        evaluation = load_from_disk(str(root / "eval")) if (root / "eval").exists() else None
    except Exception:  # a damaged cache entry of any kind is rebuilt, not fatal
        return None
    return PreparedData(train, evaluation, audit, fingerprint, root, reused=True)


def prepare_data(data: DataArgs, tokenizer, template_name: str, seed: int,
                 cache_dir: str | Path | None = None, force: bool = False, log=stderr_log,
                 vision=None) -> PreparedData:
    """Encode (or reuse from the cache) the train and eval sets of a run; a preparation that
    takes more than a few seconds says how far it is through ``log`` (:class:`Progress`).
    ``vision``: a vision-language model's processor (rows with images need one).

    Raises ConfigError for a missing ``train_files`` or an unwritable cache folder,
    DataFileError/RecordError for unreadable files or (strict) bad records, and
    DataError when no training row (or, with ``eval_files``, no eval row) is left,
    with what happened to each file's rows.
    """
    from datasets import Dataset, disable_progress_bars, load_from_disk

    disable_progress_bars()
    if not data.train_files:
        raise ConfigError("train_files: no training data given; set train_files to one or more data files "
                          "(train_files=[data.jsonl] on the command line)")
    data = localized(data, Path(cache_dir or data.cache_dir or default_cache_dir()), log)
    fingerprint = data_fingerprint(data, template_name, tokenizer, seed, vision)
    root = Path(cache_dir or data.cache_dir or default_cache_dir()) / "datasets" / fingerprint
    if (root / "audit.json").is_file() and not force:
        cached = load_cached(root, fingerprint)
        if cached is not None:
            return cached
    origin = _cache_origin(cache_dir, data)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable_cache(origin, root.parent, exc) from exc
    encoder = PieceEncoder(tokenizer, head_tokens=data.max_seq_length)  # no row keeps more of a text
    progress = Progress(log)

    records, summaries = load_records(data.train_files, strict=data.strict, dedup=data.dedup, seed=seed,
                                      mix_strategy=data.mix_strategy, interleave_probs=data.interleave_probs)
    if data.eval_files:
        eval_records, eval_summaries = load_records(data.eval_files, strict=data.strict,
                                                    dedup=data.dedup, seed=seed)
    else:
        read = len(records)
        records, eval_records = split_eval(records, data.eval_fraction, seed)
        eval_summaries = []
        if read and not records:
            raise DataError(f"eval_fraction: {data.eval_fraction} holds out all {read} training records "
                            f"of {[s.path for s in data.train_files]}, leaving none to train on; "
                            "lower eval_fraction, add data, or give eval_files")
    options = EncodeOptions(data.max_seq_length, data.train_on_prompt, data.train_last_turn_only)
    progress.rows("read", len(records) + len(eval_records), len(records) + len(eval_records))
    paths = [source.path for source in data.train_files]
    train_rows, train_audit = _encode_split(records, template_name, encoder, options, progress=progress,
                                            vision=vision, paths=paths)
    if not train_rows["input_ids"]:
        raise DataError(f"train_files: no training rows left after reading and encoding: "
                        f"{_why_no_rows(summaries, train_audit, data.max_seq_length)}")
    eval_rows, eval_audit = (_encode_split(eval_records, template_name, encoder, options, split="eval",
                                           progress=progress, vision=vision) if eval_records else (None, None))
    if data.eval_files and not (eval_rows and eval_rows["input_ids"]):
        raise DataError(f"eval_files: no evaluation rows left after reading and encoding: "
                        f"{_why_no_rows(eval_summaries, eval_audit, data.max_seq_length)}")
    audit = {
        "fingerprint": fingerprint, "template": template_name, "max_seq_length": data.max_seq_length,
        "chattune_version": __version__,
        "files": [s.to_json() for s in summaries], "eval_files": [s.to_json() for s in eval_summaries],
        "train": train_audit, "eval": eval_audit,
    }
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")  # this process's own: no two writers share one
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        Dataset.from_dict(train_rows).save_to_disk(str(tmp / "train"))
        if eval_rows and eval_rows["input_ids"]:
            Dataset.from_dict(eval_rows).save_to_disk(str(tmp / "eval"))
        (tmp / "audit.json").write_text(json.dumps(audit, indent=2, ensure_ascii=False), encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        try:
            tmp.rename(root)
        except OSError:
            if load_cached(root, fingerprint) is None:  # not another process's complete copy
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same data set first
    except OSError as exc:
        raise unwritable_cache(origin, root, exc) from exc
    train = load_from_disk(str(root / "train"))
    evaluation = load_from_disk(str(root / "eval")) if (root / "eval").exists() else None
    progress.finished(f"read, encoded and cached {len(train):,} train and "
                      f"{len(evaluation) if evaluation is not None else 0:,} eval rows")
    return PreparedData(train, evaluation, audit, fingerprint, root, reused=False)


def _cut(split_audit: dict) -> str:
    """`` (N characters cut; the most from one row: M, file:line)`` for a split with truncated rows."""
    most = split_audit.get("most_cut")
    if not most:
        return ""
    return (f" ({split_audit['chars_cut']:,} characters cut; the most from one row: "
            f"{most['chars_cut']:,}, {most['source']})")


def format_audit(audit: dict) -> str:
    """The audit as a readable report."""
    lines = [f"data fingerprint {audit['fingerprint']}  template {audit['template']}  "
             f"max_seq_length {audit['max_seq_length']}"]
    lines += format_file_rows(audit["files"] + audit.get("eval_files", []))
    for split in ("train", "eval"):
        a = audit.get(split)
        if not a:
            continue
        length = a["length"]
        lines.append(
            f"[{split}] rows in {a['rows_in']}, out {a['rows_out']}, truncated {a['rows_truncated']}"
            f"{_cut(a)}, dropped {a['rows_dropped']} {a['dropped_reasons'] or ''}".rstrip()
        )
        lines.append(
            f"[{split}] tokens {a['tokens']}, supervised {a['supervised_tokens']} "
            f"({a['supervised_share']:.1%}); length p50 {length['p50']} p90 {length['p90']} "
            f"p99 {length['p99']} max {length['max']} mean {length['mean']}"
        )
        if a.get("rows_with_images"):
            lines.append(f"[{split}] rows with images {a['rows_with_images']}, images {a['images']}, "
                         f"image tokens {a['image_tokens']} (never supervised), text tokens {a['text_tokens']}; "
                         f"supervised share of the text tokens "
                         f"{a['supervised_tokens'] / max(1, a['text_tokens']):.1%}")
        if a.get("rows_with_tools"):
            lines.append(f"[{split}] rows with tools {a['rows_with_tools']}, tool calls {a['tool_calls']}, "
                         f"supervised call tokens {a['supervised_call_tokens']} (of the supervised "
                         "tokens; tool results are never supervised)")
        for source in a.get("sources", []):
            share = source["tokens"] / a["tokens"] if a["tokens"] else 0.0
            lines.append(f"[{split}] from {source['path']}: {source['rows']} rows, {source['tokens']} tokens "
                         f"({share:.1%}), {source['supervised_tokens']} supervised")
    return "\n".join(lines)

