"""Batch prediction over a data file: JSONL of prompt, reference and prediction.

A row with tools has them shown in its prompt and the calls in its answer written
(``calls``, parsed as :func:`chattune.evaluation.evaluate.answer_calls` reads them); a row whose
reference answer is a tool call also gets ``reference_calls`` and its scores,
``tool_name_match`` and ``tool_args_match`` (:func:`chattune.evaluation.metrics.call_scores`).

A row with images (``<image>`` placeholders and their images, paths relative to the data file)
is answered with them by a vision-language model, batched with the other rows; its prompt's
messages carry the images of their placeholders (``images``). On a model that reads no images,
or when its images cannot be used, the row is written with its ``error`` and no prediction.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from chattune.data.formats import read_rows, to_record
from chattune.data.images import NOT_VISION
from chattune.data.records import RecordError, split_prompt
from chattune.errors import ChattuneError, ConfigError
from chattune.evaluation.evaluate import answer_calls, answer_each, reference_calls
from chattune.evaluation.metrics import CALL_METRIC_NAMES, call_scores
from chattune.inference.generate import answer
from chattune.inference.runs import LoadedRun
from chattune.vision.images import describe, images_on_messages


def predict_file(run: LoadedRun, data_path: str, out_path: str, *, fmt: str = "auto",
                 columns: dict[str, str] | None = None, batch_size: int = 8,
                 limit: int | None = None, log=print, **overrides) -> int:
    """Answer every record of ``data_path`` (greedily, unless ``overrides`` say otherwise:
    max_new_tokens, temperature, ...); write one JSON line per record.

    A row that cannot be read is written with its error instead of a prediction,
    so the output has exactly one line per input row; a row whose answer stopped part way
    with an error (a token the tokenizer cannot decode, say) has its ``error`` beside the
    prediction so far (and no calls read from it). With rows whose reference is a tool
    call, the share of them whose calls were right is logged at the end. The lines go to a
    temporary file beside ``out_path``, renamed to it once all are written: a failed write
    (disk full) leaves no half-written output, and ends in a ConfigError naming the path.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {limit}")
    settings = {k: v for k, v in overrides.items() if v is not None}
    if "temperature" not in settings:
        settings.setdefault("do_sample", False)  # greedy unless asked to sample
    rows = list(read_rows(data_path))
    if limit is not None:
        rows = rows[:limit]
    out = Path(out_path)
    partial = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("w", encoding="utf-8") as handle:
            written, scored = _predict_rows(run, rows, handle, fmt, columns, batch_size, log, settings,
                                            Path(data_path).parent)
        os.replace(partial, out)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the predictions ({exc.strerror or exc}); "
                          "nothing was written there") from exc
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    if scored:
        shares = ", ".join(f"{name} {sum(i[name] for i in scored) / len(scored):.1f}%" for name in CALL_METRIC_NAMES)
        log(f"{len(scored)} rows with a tool call as reference: {shares}")
    return written


def _predict_rows(run: LoadedRun, rows, handle, fmt: str, columns, batch_size: int, log,
                  settings: dict, base_dir: Path | None = None) -> tuple[int, list[dict]]:
    """Answer ``rows`` batch by batch into ``handle``; (lines written, the rows scored as calls).
    ``base_dir``: where the rows' relative image paths start (the data file's folder)."""
    written = 0
    profile = run.profile()
    reads_images = getattr(run, "vision", None) is not None
    scored: list[dict] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        items, prompts = [], []
        for row in batch:
            try:
                record = to_record(row, fmt, columns, need_answer=False, base_dir=base_dir)
            except RecordError as exc:
                items.append({"source": row.where, "error": str(exc)})
                continue
            messages, reference = split_prompt(images_on_messages(record.messages, record.images))
            shown = [{**m, "images": [describe(ref) for ref in m["images"]]} if m.get("images") else m
                     for m in messages]  # (a data URL by its start and length)
            item = {"source": row.where, "prompt": shown, "reference": reference}
            calls = reference_calls(record.messages)
            if calls is not None:
                item["reference_calls"] = calls
            items.append(item)
            if record.images and not reads_images:
                item["error"] = f"{row.where}: {NOT_VISION}"
                continue
            prompts.append((item, messages, record.tools, calls))
        if prompts:
            seqs = answer_each(answer, run, [p[1] for p in prompts], None, [p[2] for p in prompts], **settings)
            for (item, _, tools, calls), seq in zip(prompts, seqs, strict=True):
                if isinstance(seq, ChattuneError):  # the row's images cannot be used
                    item["error"] = f"{item['source']}: {seq}"
                    continue
                item["prediction"] = seq.text.text
                if seq.error is not None:
                    item["error"] = seq.error
                if tools or calls is not None:
                    item["calls"], errors = answer_calls(run, profile, seq, tools) if seq.error is None else ([], [])
                    if errors:
                        item["call_errors"] = errors
                if calls is not None:
                    item.update(call_scores(item["calls"], calls))
                    scored.append(item)
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
            written += 1
        log(f"predicted {min(start + batch_size, len(rows))}/{len(rows)}")
    return written, scored
