"""Prompts for online training (stage grpo): rows of any reader, each split into the prompt (the
conversation before its final answer, rendered by the run's template up to where the assistant
speaks) and the reference answer the reward functions may compare with.

A prompt longer than ``max_seq_length - max_completion_length`` tokens loses its oldest turns
first, then its start (as generation cuts a prompt); the audit counts each, and every input row
is accounted for (read, skipped by the reader with its reason, kept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from chattune.config import DataArgs
from chattune.data.encode import PieceEncoder, encode_prompt, prompt_pieces
from chattune.data.prepare import data_fingerprint, default_cache_dir, length_percentiles
from chattune.data.records import split_prompt
from chattune.data.remote import localized
from chattune.data.sources import format_file_rows, format_summary, load_records, split_eval
from chattune.errors import ConfigError, DataError


@dataclass
class PreparedPrompts:
    """The train and eval prompt sets (Datasets with ``prompt_ids``, ``prompt`` (the messages as
    JSON), ``answer``, ``source``) and their audit."""

    train: object
    eval: object | None
    audit: dict
    fingerprint: str = ""


def _encode(records, template: str, encoder: PieceEncoder, max_prompt_tokens: int) -> tuple[dict, dict]:
    columns: dict[str, list] = {"prompt_ids": [], "prompt": [], "answer": [], "source": []}
    cut = with_answer = 0
    for record in records:
        messages, answer = split_prompt(record.messages)
        full = sum(len(encoder.ids(p)) for p in prompt_pieces(messages, template, encoder.tokenizer, record.tools))
        ids = encode_prompt(messages, template, encoder, max_prompt_tokens, record.tools)
        cut += len(ids) < full
        columns["prompt_ids"].append(ids)
        columns["prompt"].append(json.dumps(messages, ensure_ascii=False))
        columns["answer"].append(answer)
        columns["source"].append(record.source)
        with_answer += answer is not None
    audit = {"rows_in": len(records), "rows_out": len(records), "prompts_cut": cut,
             "with_answer": with_answer, "max_prompt_tokens": max_prompt_tokens,
             "prompt_tokens": length_percentiles([len(ids) for ids in columns["prompt_ids"]])}
    return columns, audit


def prepare_prompt_data(data: DataArgs, tokenizer, template: str, max_completion_length: int, seed: int,
                        log=print) -> PreparedPrompts:
    """Read the prompts of a grpo run (any reader's rows; ``eval_files`` or ``eval_fraction`` held
    out) and encode them with the run's template, leaving ``max_completion_length`` tokens of
    ``max_seq_length`` for the completion. Raises ConfigError without train_files and DataError
    when no row is left (naming what happened to each file's rows)."""
    from datasets import Dataset

    if not data.train_files:
        raise ConfigError("train_files: no prompts given; set train_files to instruction data (alpaca, sharegpt, "
                          "messages): each row's conversation before its final answer is a prompt, the answer "
                          "is the reference the rewards may compare with")
    data = localized(data, Path(data.cache_dir or default_cache_dir()), log)
    encoder = PieceEncoder(tokenizer)
    max_prompt = data.max_seq_length - max_completion_length
    records, summaries = load_records(data.train_files, strict=data.strict, dedup=data.dedup, seed=seed,
                                      mix_strategy=data.mix_strategy, interleave_probs=data.interleave_probs)
    eval_summaries = []
    if data.eval_files:
        eval_records, eval_summaries = load_records(data.eval_files, strict=data.strict, dedup=data.dedup, seed=seed)
    else:
        records, eval_records = split_eval(records, data.eval_fraction, seed)
    if not records:
        raise DataError(f"train_files: no prompts left after reading:\n{format_summary(summaries)}")
    train_columns, train_audit = _encode(records, template, encoder, max_prompt)
    evaluation, eval_audit = None, None
    if eval_records:
        eval_columns, eval_audit = _encode(eval_records, template, encoder, max_prompt)
        evaluation = Dataset.from_dict(eval_columns)
    fingerprint = f"grpo-{data_fingerprint(data, template, tokenizer, seed)}"
    audit = {"template": template, "max_seq_length": data.max_seq_length, "stage": "grpo",
             "max_completion_length": max_completion_length,
             "files": [s.to_json() for s in summaries], "eval_files": [s.to_json() for s in eval_summaries],
             "train": train_audit, "eval": eval_audit, "fingerprint": fingerprint}
    return PreparedPrompts(Dataset.from_dict(train_columns), evaluation, audit, fingerprint)


def format_prompt_audit(audit: dict) -> str:
    """The audit as readable lines: rows per file, then per split the prompts, how many were cut,
    how many have a reference answer, and their lengths."""
    lines = [f"prompts (grpo)  template {audit['template']}  max_seq_length {audit['max_seq_length']}  "
             f"max_completion_length {audit['max_completion_length']}"]
    lines += format_file_rows(audit["files"] + audit.get("eval_files", []))
    for split in ("train", "eval"):
        a = audit.get(split)
        if not a:
            continue
        t = a["prompt_tokens"]
        lines.append(f"[{split}] prompts {a['rows_out']}, cut to {a['max_prompt_tokens']} tokens {a['prompts_cut']}, "
                     f"with a reference answer {a['with_answer']}; prompt tokens p50 {t['p50']} max {t['max']}")
    return "\n".join(lines)
