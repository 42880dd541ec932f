"""Batch prediction over a data file: JSONL of prompt, reference and prediction."""

from __future__ import annotations

import json
from pathlib import Path

from chattune.data.formats import read_rows, to_record
from chattune.data.records import RecordError, split_prompt
from chattune.errors import ConfigError
from chattune.generate import generate
from chattune.runs import LoadedRun


def predict_file(run: LoadedRun, data_path: str, out_path: str, *, fmt: str = "auto",
                 columns: dict[str, str] | None = None, batch_size: int = 8,
                 limit: int | None = None, log=print, **overrides) -> int:
    """Answer every record of ``data_path`` (greedily, unless ``overrides`` say otherwise:
    max_new_tokens, temperature, ...); write one JSON line per record.

    A row that cannot be read is written with its error instead of a prediction,
    so the output has exactly one line per input row.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    settings = {k: v for k, v in overrides.items() if v is not None}
    if "temperature" not in settings:
        settings.setdefault("do_sample", False)  # greedy unless asked to sample
    rows = list(read_rows(data_path))
    if limit is not None:
        rows = rows[:limit]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.open("w", encoding="utf-8") as handle:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            items, prompts = [], []
            for row in batch:
                try:
                    record = to_record(row, fmt, columns, need_answer=False)
                except RecordError as exc:
                    items.append({"source": row.where, "error": str(exc)})
                    continue
                messages, reference = split_prompt(record.messages)
                item = {"source": row.where, "prompt": messages, "reference": reference}
                items.append(item)
                prompts.append((item, messages))
            if prompts:
                answers = generate(run, [m for _, m in prompts], **settings)
                for (item, _), answer in zip(prompts, answers, strict=True):
                    item["prediction"] = answer
            for item in items:
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
                written += 1
            log(f"predicted {min(start + batch_size, len(rows))}/{len(rows)}")
    return written
