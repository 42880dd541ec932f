"""``chattune tokenizer extend``: learn new tokens from corpus files, write the extended
tokenizer, and report on held-out corpus text and comparison text what it changes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from chattune import __version__
from chattune.data.corpus import CorpusCounts, check_corpus_file, held_out, iter_documents
from chattune.errors import ConfigError, DataError
from chattune.model import load_tokenizer
from chattune.vocab.extend import (
    EXTENSION_NAME,
    compare_tokenizers,
    default_keep,
    learn_extension,
    save_extended,
)

REPORT_NAME = "extension_report.json"


@dataclass
class ExtendRequest:
    """What ``chattune tokenizer extend`` was asked to do."""

    base: str
    corpus: list[str]
    add: int
    out: str
    text_field: list[str] = field(default_factory=lambda: ["text"])
    text_documents: str = "line"
    holdout: float = 0.05
    min_frequency: int = 2
    compare: list[str] = field(default_factory=list)
    compare_text_field: list[str] = field(default_factory=lambda: ["text"])
    all_scripts: bool = False


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; expected a folder for the extended tokenizer")
    if out.is_dir() and any(out.iterdir()) and not (out / EXTENSION_NAME).is_file():
        raise ConfigError(f"--out: {out} is not empty and holds no extended tokenizer; "
                          "expected a new or empty folder (an earlier extension's folder is overwritten)")


def _documents(paths: list[str], fields: list[str], text_documents: str, counts: list[CorpusCounts]):
    for path in paths:
        count = CorpusCounts(str(path))
        counts.append(count)
        yield from iter_documents(path, text_field=fields if len(fields) > 1 else fields[0],
                                  text_documents=text_documents, counts=count)


def extend_tokenizer(request: ExtendRequest, log=print) -> dict:
    """Learn, write and measure an extended tokenizer (see :mod:`chattune.vocab.extend`); the
    report (also written to ``OUT/extension_report.json``). Raises ConfigError/DataError for
    bad arguments or corpus files (naming the file), ModelLoadError for a base that cannot load."""
    if request.add < 1:
        raise ConfigError(f"--add: {request.add}; expected the number of new tokens to learn, at least 1")
    if not 0.0 <= request.holdout < 1.0:
        raise ConfigError(f"--holdout: {request.holdout}; expected a share in [0, 1)")
    if not request.corpus:
        raise ConfigError("--corpus: no corpus files given")
    out = Path(request.out)
    _check_out(out)
    for path in [*request.corpus, *request.compare]:  # before anything is learned or written
        check_corpus_file(path)
    base = load_tokenizer(request.base)
    counts: list[CorpusCounts] = []
    held: list[str] = []

    def training_texts():
        for doc in _documents(request.corpus, request.text_field, request.text_documents, counts):
            if held_out(doc.text, request.holdout):
                held.append(doc.text)
            else:
                yield doc.text

    keep = (lambda text: True) if request.all_scripts else default_keep
    extension = learn_extension(base, training_texts(), request.add, min_frequency=request.min_frequency,
                                keep=keep, where=request.base)
    if not extension.corpus_documents:
        files = "; ".join(f"{c.path}: {c.read} read, {c.empty} empty" for c in counts)
        raise DataError(f"--corpus: no text to learn from ({files}); expected UTF-8 text documents")
    if not extension.tokens:
        raise DataError(f"--corpus: no new token occurs at least --min-frequency {request.min_frequency} times "
                        f"in {extension.corpus_documents} documents ({extension.corpus_chars:,} characters)"
                        + ("" if request.all_scripts else " among tokens with non-ASCII characters"))
    record = {"base": request.base, "base_tokens": len(base), "corpus": [c.to_json() for c in counts],
              "holdout": request.holdout, "min_frequency": request.min_frequency,
              "text_filter": "any" if request.all_scripts else "non-ASCII", "chattune_version": __version__}
    extended = save_extended(base, extension, out, record)
    report = {"base": request.base, "out": str(out), "tokens_before": len(base), "tokens_after": len(extended),
              "added": len(extended) - len(base), "learned_from": {"documents": extension.corpus_documents,
                                                                   "chars": extension.corpus_chars},
              "held_out": compare_tokenizers(base, extended, held).to_json()}
    compare_counts: list[CorpusCounts] = []
    if request.compare:
        texts = [d.text for d in _documents(request.compare, request.compare_text_field, request.text_documents,
                                            compare_counts)]
        report["compare"] = compare_tokenizers(base, extended, texts).to_json()
        report["compare"]["files"] = [c.path for c in compare_counts]
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    log(format_report(report))
    return report


def format_report(report: dict) -> str:
    """The extension report as a small table."""
    lines = [f"tokenizer: {report['tokens_before']:,} -> {report['tokens_after']:,} tokens "
             f"(+{report['added']:,}, learned from {report['learned_from']['documents']:,} documents); "
             f"written to {report['out']}",
             f"{'text':<12} {'texts':>6} {'chars':>10} {'tok/char before':>16} {'after':>8} {'ratio':>7} "
             f"{'encoded differently':>20}"]
    for name in ("held_out", "compare"):
        c = report.get(name)
        if c is None:
            continue
        lines.append(f"{name:<12} {c['texts']:>6} {c['chars']:>10,} {c['tokens_per_char_before']:>16.4f} "
                     f"{c['tokens_per_char_after']:>8.4f} {c['ratio']:>6.2f}x {c['texts_encoded_differently']:>20}")
        if c.get("ascii_texts") is not None:
            lines.append(f"{'':<12} of which ASCII-only: {c['ascii_texts']}, encoded differently: "
                         f"{c['ascii_texts_changed']}")
    return "\n".join(lines)
