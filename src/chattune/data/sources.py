"""Read several data files into one set of records, accounting for every row.

The summary's invariant: for each file, ``read == converted + skipped +
duplicated`` (``sampled_out`` counts records dropped later by max_samples or a
weight below 1, and ``repeated`` the copies added by a weight above 1).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chattune.config import DataSource
from chattune.data.formats import (
    DataFileError,
    check_columns,
    check_data_file,
    read_rows,
    to_record,
)
from chattune.data.records import Record, RecordError, tool_call_count


@dataclass
class FileSummary:
    """What happened to every row of one file; ``with_tools`` and ``tool_calls`` count the
    converted records that have tools and the tool calls in them."""

    path: str
    format: str
    read: int = 0
    converted: int = 0
    duplicated: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    sampled_out: int = 0
    repeated: int = 0
    with_tools: int = 0
    tool_calls: int = 0
    drawn: int | None = None
    """Rows this file gave to a mix of several files (None: concatenated, all of them)."""

    @property
    def skipped_total(self) -> int:
        """Rows skipped for any reason."""
        return sum(self.skipped.values())

    def to_json(self) -> dict:
        """The summary as plain JSON."""
        return {
            "path": self.path, "format": self.format, "read": self.read,
            "converted": self.converted, "skipped": self.skipped_total,
            "skipped_reasons": dict(self.skipped), "duplicated": self.duplicated,
            "sampled_out": self.sampled_out, "repeated": self.repeated,
            "kept": self.converted - self.sampled_out + self.repeated,
            "rows_with_tools": self.with_tools, "tool_calls": self.tool_calls,
            "first_errors": self.examples,
            **({"drawn": self.drawn} if self.drawn is not None else {}),
        }


def _reason(message: str, reason: str | None = None) -> str:
    """A short reason class for a RecordError message (the part after the location): the error's
    own ``reason`` where it has one (an image's, which never holds the image's path)."""
    if reason:
        return reason
    tail = message.split(": ", 1)[-1]
    if "placeholder" in tail and "image" in tail:
        return "placeholders and images differ"
    for marker in ("function call is not valid JSON", "function call arguments are not valid JSON",
                   "tools are not valid JSON", "has no tool result", "unknown tool",
                   "empty call name", "a tool message must answer", "no tool call with id",
                   "missing field", "missing column", "expected a string", "empty response",
                   "empty user message", "roles out of order", "unknown format", "not valid Unicode text",
                   "the last message must be", "expected one of", "expected a JSON object",
                   "expected a"):
        if marker in message:
            return marker
    return tail[:60]


def record_key(record: Record) -> str:
    """A content hash of a record's messages (tool calls included), tools and images, for
    exact-duplicate detection; a record without tools hashes its messages alone, as before."""
    content = record.messages
    if record.tools or record.images:
        content = {"messages": record.messages, "tools": record.tools,
                   **({"images": record.images} if record.images else {})}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(text.encode()).hexdigest()


def read_source(source: DataSource, *, strict: bool = False, dedup: bool = True,
                seen: set[str] | None = None) -> tuple[list[Record], FileSummary]:
    """Read one file into records; bad rows are skipped and counted (or raise if strict)."""
    summary = FileSummary(path=source.path, format=source.format)
    records = list(iter_source(source, summary, strict=strict, dedup=dedup, seen=seen))
    return records, summary


def iter_source(source: DataSource, summary: FileSummary, *, strict: bool = False, dedup: bool = True,
                seen: set | None = None) -> Iterator[Record]:
    """The records of one file as it is read (lazily where :func:`read_rows` is: JSON Lines and
    CSV), each row counted in ``summary`` when it is met, tools and tool calls too."""
    if source.format == "columns" or source.columns:
        check_columns(source.columns, source.path)
    seen = set() if seen is None else seen
    records = iter_counted(source.path, summary, lambda row: to_record(row, source.format, source.columns,
                                                                     base_dir=Path(source.path).parent),
                           record_key, strict=strict, dedup=dedup, seen=seen)
    for record in records:
        summary.with_tools += bool(record.tools)
        summary.tool_calls += tool_call_count(record.messages)
        yield record


def read_counted(path, summary: FileSummary, convert, key, *, strict: bool, dedup: bool, seen: set[str]) -> list:
    """Every row of ``path`` through ``convert`` (a raw row -> a record, or RecordError), counted
    in ``summary``: converted, skipped with the reason (raised with ``strict``), or a duplicate
    (by ``key``, across the files sharing ``seen``)."""
    return list(iter_counted(path, summary, convert, key, strict=strict, dedup=dedup, seen=seen))


def iter_counted(path, summary: FileSummary, convert, key, *, strict: bool, dedup: bool, seen: set) -> Iterator:
    """:func:`read_counted` as a generator: each record yielded as its row is read and counted."""
    for row in read_rows(path):
        summary.read += 1
        try:
            record = convert(row)
        except RecordError as exc:
            if strict:
                raise
            summary.skipped[_reason(str(exc), getattr(exc, "reason", None))] += 1
            if len(summary.examples) < 5:
                summary.examples.append(str(exc))
            continue
        if dedup:
            digest = key(record)
            if digest in seen:
                summary.duplicated += 1
                continue
            seen.add(digest)
        summary.converted += 1
        yield record


def format_file_rows(files: list[dict]) -> list[str]:
    """The audit's table of files (their ``FileSummary.to_json``): read, converted, skipped,
    duplicated and kept rows, and the reasons rows were skipped."""
    lines = [f"{'file':<44} {'read':>6} {'conv':>6} {'skip':>6} {'dup':>6} {'kept':>6}"]
    for f in files:
        name = f["path"] if len(f["path"]) <= 44 else "..." + f["path"][-41:]
        lines.append(f"{name:<44} {f['read']:>6} {f['converted']:>6} {f['skipped']:>6} "
                     f"{f['duplicated']:>6} {f['kept']:>6}")
        for reason, count in f["skipped_reasons"].items():
            lines.append(f"    skipped {count} x {reason}")
        if f.get("drawn") is not None:
            lines.append(f"    drawn into the mix: {f['drawn']} rows")
    return lines


def apply_sampling(records: list[Record], source: DataSource, summary: FileSummary,
                    rng: random.Random) -> list[Record]:
    """Apply max_samples, then weight, with a seeded generator."""
    if source.max_samples is not None and len(records) > source.max_samples:
        keep = sorted(rng.sample(range(len(records)), source.max_samples))
        summary.sampled_out += len(records) - len(keep)
        records = [records[i] for i in keep]
    whole, fraction = divmod(source.weight, 1.0)
    result = records * int(whole)
    extra = round(fraction * len(records))
    if extra:
        result += [records[i] for i in sorted(rng.sample(range(len(records)), extra))]
    summary.repeated += max(0, len(result) - len(records))
    summary.sampled_out += max(0, len(records) - len(result))
    return result


MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")
MAX_MIXED_ROWS = 50_000_000


def mix_sources(parts: list[list[Record]], strategy: str = "concat", probs: list[float] | None = None,
                rng: random.Random | None = None) -> tuple[list[Record], list[int]]:
    """Several sources' records as one list, and how many rows were drawn from each.

    ``concat``: one after another. ``interleave_under`` / ``interleave_over``: a row at a time
    from a source picked in turn (or, with ``probs``, at random with those weights), each source
    read in order; ``under`` stops when the first source runs out (the smaller sources set the
    size), ``over`` when every source drawn from has run out at least once, the ones that ran
    out starting again (the larger sources set the size; the smaller are repeated), as
    ``datasets.interleave_datasets`` does with ``first_exhausted`` / ``all_exhausted``. Sources
    with no rows, or a weight of 0, give none."""
    if strategy == "concat" or len(parts) < 2:
        return [record for part in parts for record in part], [len(part) for part in parts]
    rng = rng or random.Random(0)
    weights = [float(p) for p in probs] if probs else [1.0] * len(parts)
    live = [i for i, part in enumerate(parts) if part and weights[i] > 0]
    drawn = [0] * len(parts)
    mixed: list[Record] = []
    ran_out: set[int] = set()
    turn = 0
    while live and len(mixed) < MAX_MIXED_ROWS:
        if probs:
            index = rng.choices(live, weights=[weights[i] for i in live])[0]
        else:
            index, turn = live[turn % len(live)], turn + 1
        part = parts[index]
        mixed.append(part[drawn[index] % len(part)])
        drawn[index] += 1
        if drawn[index] % len(part) == 0:
            ran_out.add(index)
            if strategy == "interleave_under" or ran_out >= set(live):
                break
    return mixed, drawn


def load_records(sources: list[DataSource], *, strict: bool = False, dedup: bool = True,
                 seed: int = 42, mix_strategy: str = "concat", interleave_probs: list[float] | None = None
                 ) -> tuple[list[Record], list[FileSummary]]:
    """Read, validate, de-duplicate and mix several files into one list of records (each file
    sampled by its ``max_samples`` and ``weight`` first; then mixed by ``mix_strategy``, see
    :func:`mix_sources`; with interleaving each summary's ``drawn`` says how many rows it gave)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    parts: list[list[Record]] = []
    summaries = []
    for source in sources:
        file_records, summary = read_source(source, strict=strict, dedup=dedup, seen=seen)
        parts.append(apply_sampling(file_records, source, summary, rng))
        summaries.append(summary)
    records, drawn = mix_sources(parts, mix_strategy, interleave_probs, rng)
    if mix_strategy != "concat":
        for summary, count in zip(summaries, drawn, strict=True):
            summary.drawn = count
    return records, summaries


def source_index(source: str, paths: list[str]) -> int | None:
    """Which file of ``paths`` a record's ``source`` (``file:line`` / ``file#index``) names
    (the longest matching path), or None."""
    found = [i for i, path in enumerate(paths) if source.startswith(path)]
    return max(found, key=lambda i: len(paths[i])) if found else None


def split_eval(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``fraction`` of the records (at least one when fraction > 0), seeded."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    count = max(1, round(len(records) * fraction))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes; DataFileError when it is missing, a directory or unreadable."""
    path = check_data_file(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def format_summary(summaries: list[FileSummary]) -> str:
    """A readable table of what happened to every input row."""
    lines = [f"{'file':<40} {'read':>7} {'converted':>9} {'skipped':>7} {'duplicated':>10} {'kept':>7}"]
    for s in summaries:
        j = s.to_json()
        name = s.path if len(s.path) <= 40 else "..." + s.path[-37:]
        lines.append(f"{name:<40} {s.read:>7} {s.converted:>9} {s.skipped_total:>7} {s.duplicated:>10} {j['kept']:>7}")
        if s.with_tools or s.tool_calls:
            lines.append(f"    {s.with_tools} rows with tools, {s.tool_calls} tool calls")
        for reason, count in s.skipped.most_common():
            lines.append(f"    skipped {count} x {reason}")
        for example in s.examples[:3]:
            lines.append(f"    e.g. {example}")
    return "\n".join(lines)
