"""Read, render and encode a run's data; cache it (Arrow) under a fingerprint; audit it.

The fingerprint covers everything the encoded rows depend on: the data files'
bytes and how they are read, the tokenizer, the template, the maximum length
and the encoding options. The same fingerprint reuses the cached data set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chattune import __version__
from chattune.config import DataArgs
from chattune.data.encode import IGNORE_INDEX, EncodeOptions, PieceEncoder, encode_all
from chattune.data.sources import file_digest, load_records, split_eval
from chattune.data.templates import template_provenance
from chattune.model import tokenizer_hash

ENCODING_VERSION = 1


@dataclass
class PreparedData:
    """The encoded train and eval sets, their audit and fingerprint."""

    train: object
    eval: object | None
    audit: dict
    fingerprint: str
    cache_path: Path
    reused: bool


def default_cache_dir() -> Path:
    """``$CHATTUNE_CACHE`` or ``~/.cache/chattune``."""
    return Path(os.environ.get("CHATTUNE_CACHE", Path.home() / ".cache" / "chattune"))


def data_fingerprint(data: DataArgs, template_name: str, tokenizer, seed: int) -> str:
    """A hash of everything the encoded data set depends on."""
    def source_key(source):
        return {"path": str(Path(source.path).resolve()), "sha256": file_digest(source.path),
                "format": source.format, "columns": source.columns,
                "max_samples": source.max_samples, "weight": source.weight}

    payload = {
        "train": [source_key(s) for s in data.train_files],
        "eval": [source_key(s) for s in data.eval_files],
        "eval_fraction": data.eval_fraction, "seed": seed, "dedup": data.dedup,
        "tokenizer": tokenizer_hash(tokenizer),
        "template": template_provenance(template_name, tokenizer),
        "max_seq_length": data.max_seq_length, "train_on_prompt": data.train_on_prompt,
        "train_last_turn_only": data.train_last_turn_only, "encoding_version": ENCODING_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _percentiles(lengths: list[int]) -> dict:
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    arr = np.asarray(lengths)
    return {"p50": int(np.percentile(arr, 50)), "p90": int(np.percentile(arr, 90)),
            "p99": int(np.percentile(arr, 99)), "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}


def _encode_split(records, template_name, encoder, options):
    encoded = encode_all([r.messages for r in records], template_name, encoder, options)
    rows = {"input_ids": [], "labels": []}
    dropped: Counter = Counter()
    dropped_examples = []
    truncated = 0
    tokens = supervised = 0
    lengths = []
    for record, enc in zip(records, encoded, strict=True):
        if enc.dropped:
            dropped[enc.dropped] += 1
            if len(dropped_examples) < 5:
                dropped_examples.append(f"{record.source}: {enc.dropped}")
            continue
        truncated += enc.truncated
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append(enc.labels)
        lengths.append(len(enc.input_ids))
        tokens += len(enc.input_ids)
        supervised += sum(1 for label in enc.labels if label != IGNORE_INDEX)
    audit = {
        "rows_in": len(records), "rows_out": len(rows["input_ids"]), "rows_truncated": truncated,
        "rows_dropped": sum(dropped.values()), "dropped_reasons": dict(dropped),
        "dropped_examples": dropped_examples, "tokens": tokens, "supervised_tokens": supervised,
        "supervised_share": round(supervised / tokens, 4) if tokens else 0.0,
        "length": _percentiles(lengths),
    }
    return rows, audit


def prepare_data(data: DataArgs, tokenizer, template_name: str, seed: int,
                 cache_dir: str | Path | None = None, force: bool = False) -> PreparedData:
    """Encode (or reuse from the cache) the train and eval sets of a run."""
    from datasets import Dataset, disable_progress_bars, load_from_disk

    disable_progress_bars()
    if not data.train_files:
        raise ValueError("train_files: no training data given")
    fingerprint = data_fingerprint(data, template_name, tokenizer, seed)
    root = Path(cache_dir or data.cache_dir or default_cache_dir()) / "datasets" / fingerprint
    audit_path = root / "audit.json"
    if audit_path.is_file() and not force:
        audit = json.loads(audit_path.read_text())
        train = load_from_disk(str(root / "train"))
        evaluation = load_from_disk(str(root / "eval")) if (root / "eval").exists() else None
        return PreparedData(train, evaluation, audit, fingerprint, root, reused=True)

    records, summaries = load_records(data.train_files, strict=data.strict, dedup=data.dedup, seed=seed)
    if data.eval_files:
        eval_records, eval_summaries = load_records(data.eval_files, strict=data.strict,
                                                    dedup=data.dedup, seed=seed)
    else:
        records, eval_records = split_eval(records, data.eval_fraction, seed)
        eval_summaries = []
    encoder = PieceEncoder(tokenizer)
    options = EncodeOptions(data.max_seq_length, data.train_on_prompt, data.train_last_turn_only)
    train_rows, train_audit = _encode_split(records, template_name, encoder, options)
    if not train_rows["input_ids"]:
        raise ValueError(f"no training rows left after reading and encoding {[s.path for s in data.train_files]}")
    eval_rows, eval_audit = _encode_split(eval_records, template_name, encoder, options) if eval_records else (None, None)
    audit = {
        "fingerprint": fingerprint, "template": template_name, "max_seq_length": data.max_seq_length,
        "chattune_version": __version__,
        "files": [s.to_json() for s in summaries], "eval_files": [s.to_json() for s in eval_summaries],
        "train": train_audit, "eval": eval_audit,
    }
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train = Dataset.from_dict(train_rows)
    train.save_to_disk(str(tmp / "train"))
    evaluation = None
    if eval_rows and eval_rows["input_ids"]:
        evaluation = Dataset.from_dict(eval_rows)
        evaluation.save_to_disk(str(tmp / "eval"))
    (tmp / "audit.json").write_text(json.dumps(audit, indent=2, ensure_ascii=False))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    train = load_from_disk(str(root / "train"))
    evaluation = load_from_disk(str(root / "eval")) if (root / "eval").exists() else None
    return PreparedData(train, evaluation, audit, fingerprint, root, reused=False)


def format_audit(audit: dict) -> str:
    """The audit as a readable report."""
    lines = [f"data fingerprint {audit['fingerprint']}  template {audit['template']}  "
             f"max_seq_length {audit['max_seq_length']}"]
    lines.append(f"{'file':<44} {'read':>6} {'conv':>6} {'skip':>6} {'dup':>6} {'kept':>6}")
    for f in audit["files"] + audit.get("eval_files", []):
        name = f["path"] if len(f["path"]) <= 44 else "..." + f["path"][-41:]
        lines.append(f"{name:<44} {f['read']:>6} {f['converted']:>6} {f['skipped']:>6} "
                     f"{f['duplicated']:>6} {f['kept']:>6}")
        for reason, count in f["skipped_reasons"].items():
            lines.append(f"    skipped {count} x {reason}")
    for split in ("train", "eval"):
        a = audit.get(split)
        if not a:
            continue
        length = a["length"]
        lines.append(
            f"[{split}] rows in {a['rows_in']}, out {a['rows_out']}, truncated {a['rows_truncated']}, "
            f"dropped {a['rows_dropped']} {a['dropped_reasons'] or ''}".rstrip()
        )
        lines.append(
            f"[{split}] tokens {a['tokens']}, supervised {a['supervised_tokens']} "
            f"({a['supervised_share']:.1%}); length p50 {length['p50']} p90 {length['p90']} "
            f"p99 {length['p99']} max {length['max']} mean {length['mean']}"
        )
    return "\n".join(lines)
