"""What the web page shows about run folders: found, summarized, their curves read as they grow.

The served runs (each profile's run folder) and every run under ``--runs-dir`` are listed
(:func:`find_runs`); a folder counts as a run when it holds ``chattune.json`` (a finished run
or a checkpoint) or, while a training is still writing it, ``metrics.jsonl`` or
``data_audit.json``. Runs are addressed by an id made from their resolved path, so the page
never sends a path the server would open. :func:`run_detail` gives the manifest summary
(base model, method, template, data fingerprint, and for a preference run its stage), the data
audit and the evaluations;
:func:`metrics_since` gives the metrics.jsonl lines written after a byte offset, complete
lines only, so a page polling it while training appends sees every row exactly once.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "chattune.json"
METRICS_NAME = "metrics.jsonl"
AUDIT_NAME = "data_audit.json"
EVAL_DIR = "eval"
EVAL_NAME = "eval.json"
LIVE_SECONDS = 120.0
"""A run without a final manifest whose metrics.jsonl changed this recently is "training"."""
MAX_DEPTH = 4
MAX_METRICS_BYTES = 4 << 20
"""At most this much of metrics.jsonl per request; the page asks again from the new offset."""


@dataclass
class RunEntry:
    """A run folder the page may show."""

    id: str
    path: Path
    served_as: list[str] = field(default_factory=list)


def run_id(path: Path) -> str:
    """The id of a run folder: a hash of its resolved path."""
    return hashlib.sha1(str(path.resolve()).encode("utf-8")).hexdigest()[:12]


def is_run_like(folder: Path) -> bool:
    """Whether ``folder`` is a run (finished, or still being trained)."""
    return any((folder / name).is_file() for name in (MANIFEST_NAME, METRICS_NAME, AUDIT_NAME))


def _walk(root: Path, depth: int):
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return
    for child in children:
        if is_run_like(child):
            yield child  # checkpoints inside a run are not listed on their own
        elif depth < MAX_DEPTH:
            yield from _walk(child, depth + 1)


def find_runs(served: dict[str, Path | None], runs_dir: Path | None) -> dict[str, RunEntry]:
    """Every run to list, by id: the served runs (``{model name: run folder}``, None for a
    bare base model) first, then the runs under ``runs_dir``, searched a few levels deep."""
    entries: dict[str, RunEntry] = {}
    for name, folder in served.items():
        if folder is None:
            continue
        entry = entries.setdefault(run_id(folder), RunEntry(run_id(folder), Path(folder)))
        entry.served_as.append(name)
    if runs_dir is not None and runs_dir.is_dir():
        candidates = [runs_dir] if is_run_like(runs_dir) else list(_walk(runs_dir, 1))
        for folder in candidates:
            entries.setdefault(run_id(folder), RunEntry(run_id(folder), folder))
    return entries


def _read_json(path: Path):
    """A JSON file's value, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _latest_checkpoint_manifest(folder: Path) -> dict | None:
    def step(path: Path) -> int:
        tail = path.name.rpartition("-")[2]
        return int(tail) if tail.isdigit() else -1

    checkpoints = sorted(folder.glob("checkpoint-*"), key=step, reverse=True)
    for checkpoint in checkpoints:
        data = _read_json(checkpoint / MANIFEST_NAME)
        if isinstance(data, dict):
            return data
    return None


def run_state(folder: Path, now: float | None = None) -> str:
    """``finished`` (the final manifest is written), ``training`` (metrics.jsonl changed in
    the last :data:`LIVE_SECONDS`) or ``incomplete`` (neither: stopped or crashed)."""
    if (folder / MANIFEST_NAME).is_file():
        return "finished"
    metrics = folder / METRICS_NAME
    now = time.time() if now is None else now
    if metrics.is_file() and now - metrics.stat().st_mtime < LIVE_SECONDS:
        return "training"
    return "incomplete"


def _stage(manifest: dict) -> dict | None:
    """A preference run's stage as its manifest records it (name, settings, reference), or
    None for supervised fine-tuning (no ``stage``, or not an object)."""
    stage = manifest.get("stage")
    return dict(stage) if isinstance(stage, dict) and stage else None


def run_summary(entry: RunEntry) -> dict:
    """The manifest's summary of a run: base model, method (and its settings), template, data
    fingerprint, steps and losses, and the stage of a preference run (None for SFT); a run
    still training has its latest checkpoint's manifest, or none yet (``manifest: null``)."""
    folder = entry.path
    final = _read_json(folder / MANIFEST_NAME)
    manifest = final if isinstance(final, dict) else _latest_checkpoint_manifest(folder)
    summary = {"id": entry.id, "name": folder.name, "path": str(folder), "served_as": entry.served_as,
               "state": run_state(folder), "manifest": None}
    if isinstance(manifest, dict):
        part = lambda key: manifest.get(key) if isinstance(manifest.get(key), dict) else {}  # noqa: E731
        method = part("method")
        summary["manifest"] = {
            "from_checkpoint": manifest is not final,
            "base_model": part("base_model").get("path"),
            "model_type": part("base_model").get("model_type"),
            "method": method.get("name"),
            "method_settings": {k: v for k, v in method.items() if k != "name" and v not in (None, False, [], {})},
            "template": part("template").get("name"),
            "data_fingerprint": manifest.get("data_fingerprint"),
            "max_seq_length": manifest.get("max_seq_length"),
            "global_step": manifest.get("global_step"),
            "train_loss": manifest.get("train_loss"),
            "eval_loss": manifest.get("eval_loss"),
            "trainable_parameters": manifest.get("trainable_parameters"),
            "chattune_version": manifest.get("chattune_version"),
            "stage": _stage(manifest),
        }
    return summary


def evaluations(folder: Path) -> list[dict]:
    """Each ``eval/<name>/eval.json`` of a run: its name, metrics, data and comparison."""
    root = folder / EVAL_DIR
    found = []
    if root.is_dir():
        for sub in sorted(p for p in root.iterdir() if (p / EVAL_NAME).is_file()):
            data = _read_json(sub / EVAL_NAME)
            if not isinstance(data, dict):
                found.append({"name": sub.name, "error": f"{sub / EVAL_NAME}: not readable JSON"})
                continue
            compare = data.get("compare") if isinstance(data.get("compare"), dict) else None
            found.append({"name": sub.name, "metrics": data.get("metrics"), "data": data.get("data"),
                          "compare": compare and {k: compare.get(k) for k in ("name", "metrics", "better", "worse",
                                                                                  "same")}})
    return found


def run_detail(entry: RunEntry) -> dict:
    """Everything the runs page shows but the curves: the summary, the data audit (None when
    the run has none) and the evaluations."""
    audit = _read_json(entry.path / AUDIT_NAME)
    return {**run_summary(entry), "audit": audit if isinstance(audit, dict) else None,
            "evaluations": evaluations(entry.path)}


def metrics_since(folder: Path, offset: int = 0) -> dict:
    """The metrics.jsonl rows after byte ``offset``: ``{"rows", "offset", "bad", "size"}``.

    Only complete lines are read (NaN and infinite values, which JSON cannot carry, as None) (a line still being written is left for the next call);
    ``offset`` is where the next call starts. A file shorter than ``offset`` was rewritten
    (a new training in the same folder): reading starts again from 0 and ``reset`` is true.
    """
    path = folder / METRICS_NAME
    if not path.is_file():
        return {"rows": [], "offset": 0, "bad": 0, "size": 0, "reset": offset > 0}
    size = path.stat().st_size
    reset = offset > size or offset < 0
    start = 0 if reset else offset
    with path.open("rb") as handle:
        handle.seek(start)
        chunk = handle.read(min(size - start, MAX_METRICS_BYTES))
    end = chunk.rfind(b"\n") + 1
    rows, bad = [], 0
    for line in chunk[:end].splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})
        else:
            bad += 1
    return {"rows": rows, "offset": start + end, "bad": bad, "size": size, "reset": reset}
