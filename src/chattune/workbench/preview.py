"""What the page shows before a training starts: the data as converted, its audit, the memory plan.

Each is what the command line prints for the same config: the rows as ``chattune data
inspect`` reads them rendered as ``chattune templates --messages`` marks them, the audit of
``chattune data prepare``, the plan of ``chattune train --dry-run``.
"""

from __future__ import annotations

from chattune.config import RunConfig

PREVIEW_ROWS = 3
MAX_PREVIEW_ROWS = 20


def preview(config: RunConfig, rows: int = PREVIEW_ROWS) -> dict:
    """The first ``rows`` converted records of the training files, each with its rendering by the
    run's template (trained spans between ⟪ and ⟫), and how the files' rows were read."""
    from chattune.data.sources import load_records
    from chattune.model import load_tokenizer
    from chattune.templates.catalog import marked
    from chattune.templates.registry import render, resolve_template_name

    rows = max(1, min(int(rows), MAX_PREVIEW_ROWS))
    tokenizer = load_tokenizer(config.model.tokenizer_name_or_path or config.model.model_name_or_path,
                               config.model.trust_remote_code)
    template = resolve_template_name(config.data.template, tokenizer)
    records, summaries = load_records(config.data.train_files, strict=False, dedup=config.data.dedup)
    shown = []
    for index, record in enumerate(records[:rows]):
        messages = record.to_json()["messages"]
        shown.append({"index": index, "messages": messages,
                      "rendering": marked(render(template, record.messages, tokenizer), tokenizer)})
    files = [summary.to_json() for summary in summaries]
    return {"template": template, "rows": shown, "shown": len(shown),
            "read": {"rows": sum(f["read"] for f in files), "kept": len(records), "files": files}}


def audit(config: RunConfig) -> dict:
    """The data audit (rows kept and skipped with reasons, supervised share, lengths), as JSON
    and as ``chattune data prepare`` prints it; the encoded rows are cached for the training."""
    from chattune.data.run_data import prepare_for_config

    prepared, text = prepare_for_config(config, log=lambda message: None)
    return {"audit": prepared.audit, "text": text, "reused": prepared.reused}


def memory_plan(config: RunConfig) -> dict:
    """The memory plan of ``chattune train --dry-run``."""
    from chattune.training.memory_plan import estimate, format_plan

    return {"text": format_plan(estimate(config), config)}
