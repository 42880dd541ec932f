"""Preference rows into tokens: the prompt rendered by the run's template and shared by the
answers, each answer's tokens (the only ones whose log-probabilities count), and the audit.

A pair that does not fit ``max_seq_length`` (the prompt and its longer answer) loses its
prompt's oldest turns first, then both answers are cut to what is left; a prompt that leaves
no room for an answer drops the row. The audit counts each.

KTO rows also get a mismatched answer (the next row's, in a seeded order) for KTO's estimate of
the KL term: the model's and the reference's log-probabilities of an answer to another prompt.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from chattune.config import DataArgs
from chattune.data.encode import (
    IGNORE_INDEX,
    EncodeOptions,
    PieceEncoder,
    _drop_oldest_turn,
    _user_turns,
    encode_conversation,
)
from chattune.data.pairs import LABELLED, PAIRED, PreferenceRecord, load_preference_records
from chattune.data.sources import FileSummary, format_file_rows, format_summary, split_eval
from chattune.errors import ConfigError, DataError

UNBOUNDED = 1 << 30


@dataclass
class EncodedPreference:
    """One encoded preference row: ``prompt`` ids and each answer's ``(ids, labels)``
    (labels -100 where a token of the answer's turn is not the model's to say), or why it was dropped."""

    prompt: list[int] = field(default_factory=list)
    answers: list[tuple[list[int], list[int]]] = field(default_factory=list)
    turns_dropped: int = 0
    answers_cut: int = 0
    dropped: str | None = None


def _split(prompt: list[dict], answer: str, template: str, encoder: PieceEncoder, tools=None):
    """(prompt ids, answer ids, answer labels) of ``prompt`` + the assistant's ``answer``:
    the prompt is everything before the answer turn's first supervised token."""
    encoded = encode_conversation(prompt + [{"role": "assistant", "content": answer}], template, encoder,
                                  EncodeOptions(UNBOUNDED, train_last_turn_only=True), tools=tools)
    if encoded.dropped:
        raise DataError(encoded.dropped)
    start = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    return encoded.input_ids[:start], encoded.input_ids[start:], encoded.labels[start:]


def encode_preference(record: PreferenceRecord, template: str, encoder: PieceEncoder,
                      max_seq_length: int) -> EncodedPreference:
    """Encode one row: the prompt once, the chosen (and rejected) answer after it, fitted to
    ``max_seq_length`` (oldest turns dropped first, then the answers cut)."""
    answers = [record.chosen] + ([record.rejected] if record.rejected is not None else [])
    prompt = record.prompt
    turns_dropped = 0
    while True:
        try:
            parts = [_split(prompt, answer, template, encoder) for answer in answers]
        except DataError as exc:
            return EncodedPreference(dropped=str(exc))
        prompt_ids = parts[0][0]
        if any(part[0] != prompt_ids for part in parts[1:]):
            return EncodedPreference(dropped="the template renders the prompt differently before each answer")
        longest = max(len(part[1]) for part in parts)
        if len(prompt_ids) + longest <= max_seq_length or _user_turns(prompt) <= 1:
            break
        prompt = _drop_oldest_turn(prompt)
        turns_dropped += 1
    room = max_seq_length - len(prompt_ids)
    if room < 1:
        return EncodedPreference(turns_dropped=turns_dropped,
                                 dropped="prompt fills max_seq_length: no answer token would remain")
    cut = sum(len(ids) > room for _, ids, _ in parts)
    fitted = [(ids[:room], labels[:room]) for _, ids, labels in parts]
    if any(all(label == IGNORE_INDEX for label in labels) for _, labels in fitted):
        return EncodedPreference(dropped="no token of an answer is supervised")
    if len(fitted) == 2 and fitted[0][0] == fitted[1][0]:
        return EncodedPreference(turns_dropped=turns_dropped,
                                 dropped="chosen and rejected are identical once cut to max_seq_length")
    return EncodedPreference(prompt_ids, fitted, turns_dropped, cut)


def _lengths(values: list[int]) -> dict:
    if not values:
        return {"p50": 0, "max": 0, "mean": 0.0}
    arr = np.asarray(values)
    return {"p50": int(np.percentile(arr, 50)), "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}


def encode_split(records: list[PreferenceRecord], template: str, encoder: PieceEncoder,
                 max_seq_length: int, seed: int) -> tuple[dict, dict]:
    """Encode one split: its columns (``prompt_ids``, ``chosen_ids``/``chosen_labels``, and
    ``rejected_ids``/``rejected_labels`` for pairs, or ``desirable`` and the KL answer
    ``kl_ids``/``kl_labels`` for labelled rows) and its audit."""
    paired = bool(records) and records[0].rejected is not None
    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "chosen_labels": []}
    columns.update({"rejected_ids": [], "rejected_labels": []} if paired else {"desirable": []})
    dropped: Counter = Counter()
    examples: list[str] = []
    truncated = turns = answers_cut = 0
    prompt_lengths, answer_lengths = [], []
    for record in records:
        enc = encode_preference(record, template, encoder, max_seq_length)
        if enc.dropped:
            dropped[enc.dropped] += 1
            if len(examples) < 5:
                examples.append(f"{record.source}: {enc.dropped}")
            continue
        truncated += bool(enc.turns_dropped or enc.answers_cut)
        turns += enc.turns_dropped
        answers_cut += enc.answers_cut
        columns["prompt_ids"].append(enc.prompt)
        prompt_lengths.append(len(enc.prompt))
        names = ("chosen", "rejected") if paired else ("chosen",)
        for name, (ids, labels) in zip(names, enc.answers, strict=True):
            columns[f"{name}_ids"].append(ids)
            columns[f"{name}_labels"].append(labels)
            answer_lengths.append(len(ids))
        if not paired:
            columns["desirable"].append(bool(record.desirable))
    if not paired:
        _add_kl_answers(columns, seed, max_seq_length)
    rows = len(columns["prompt_ids"])
    audit = {
        "kind": PAIRED if paired else LABELLED, "rows_in": len(records), "rows_out": rows,
        "rows_truncated": truncated, "turns_dropped": turns, "answers_cut": answers_cut,
        "rows_dropped": sum(dropped.values()), "dropped_reasons": dict(dropped), "dropped_examples": examples,
        "prompt_length": _lengths(prompt_lengths), "answer_length": _lengths(answer_lengths),
        "answer_tokens": sum(answer_lengths),
    }
    if not paired:
        audit["desirable"] = sum(columns["desirable"])
        audit["undesirable"] = rows - audit["desirable"]
    return columns, audit


def _add_kl_answers(columns: dict, seed: int, max_seq_length: int) -> None:
    """Each labelled row's mismatched answer: the answer of the row after it in a seeded order
    (so never its own, with two rows or more), cut to fit after the row's own prompt."""
    count = len(columns["prompt_ids"])
    order = list(range(count))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % count] for i in range(count)}
    room = [max_seq_length - len(prompt) for prompt in columns["prompt_ids"]]
    columns["kl_ids"] = [columns["chosen_ids"][partner[i]][:room[i]] for i in range(count)]
    columns["kl_labels"] = [columns["chosen_labels"][partner[i]][:room[i]] for i in range(count)]


@dataclass
class PreparedPreference:
    """The encoded train and eval preference sets and their audit."""

    train: object
    eval: object | None
    audit: dict
    fingerprint: str = ""
    reused: bool = False
    cache_path: object = None


def prepare_preference_data(data: DataArgs, tokenizer, template: str, stage: str, seed: int) -> PreparedPreference:
    """Read and encode the preference rows of a run (pairs for dpo/orpo/simpo, labelled rows
    for kto) into Hugging Face Datasets, with what happened to every row.

    Raises ConfigError without ``train_files``, DataFileError/RecordError for unreadable files
    or (strict) bad rows, and DataError when no row is left (naming what happened to each file's rows)."""
    from datasets import Dataset

    if not data.train_files:
        raise ConfigError("train_files: no preference data given; set train_files to a file of pairs "
                          "(chosen/rejected) or, for stage kto, of labelled answers")
    kind = LABELLED if stage == "kto" else PAIRED
    encoder = PieceEncoder(tokenizer)
    records, summaries = load_preference_records(data.train_files, kind, strict=data.strict, dedup=data.dedup,
                                                 seed=seed)
    eval_summaries: list[FileSummary] = []
    if data.eval_files:
        eval_records, eval_summaries = load_preference_records(data.eval_files, kind, strict=data.strict,
                                                               dedup=data.dedup, seed=seed)
    else:
        records, eval_records = split_eval(records, data.eval_fraction, seed)
    train_columns, train_audit = encode_split(records, template, encoder, data.max_seq_length, seed)
    if not train_columns["prompt_ids"]:
        raise DataError(f"train_files: no {kind} preference rows left after reading and encoding "
                        f"(stage needs {'chosen/rejected pairs' if kind == PAIRED else 'rows with a boolean label'}):\n"
                        f"{format_summary(summaries)}\n{_dropped_line(train_audit)}")
    if kind == LABELLED and len(train_columns["prompt_ids"]) < 2:
        raise DataError("train_files: kto needs at least 2 labelled rows (its KL estimate pairs a prompt "
                        "with another row's answer)")
    evaluation, eval_audit = None, None
    if eval_records:
        eval_columns, eval_audit = encode_split(eval_records, template, encoder, data.max_seq_length, seed)
        if eval_columns["prompt_ids"]:
            evaluation = Dataset.from_dict(eval_columns)
    audit = {"template": template, "max_seq_length": data.max_seq_length, "stage": stage, "kind": kind,
             "files": [s.to_json() for s in summaries], "eval_files": [s.to_json() for s in eval_summaries],
             "train": train_audit, "eval": eval_audit, "fingerprint": ""}
    return PreparedPreference(Dataset.from_dict(train_columns), evaluation, audit)


def _dropped_line(audit: dict) -> str:
    return f"encoded {audit['rows_out']} of {audit['rows_in']}; dropped {audit['dropped_reasons'] or 'none'}"


def format_preference_audit(audit: dict) -> str:
    """The audit as readable lines: rows per file, then per split the pairs (or labelled
    rows), how many were truncated and how, and the prompt and answer lengths."""
    lines = [f"preference data ({audit['stage']}, {audit['kind']})  template {audit['template']}  "
             f"max_seq_length {audit['max_seq_length']}"]
    lines += format_file_rows(audit["files"] + audit.get("eval_files", []))
    for split in ("train", "eval"):
        a = audit.get(split)
        if not a:
            continue
        what = "pairs" if a["kind"] == PAIRED else "rows"
        line = (f"[{split}] {what} in {a['rows_in']}, out {a['rows_out']}, truncated {a['rows_truncated']} "
                f"({a['turns_dropped']} oldest turns dropped, {a['answers_cut']} answers cut), "
                f"dropped {a['rows_dropped']}")
        if a["dropped_reasons"]:
            line += f" {a['dropped_reasons']}"
        lines.append(line)
        p, r = a["prompt_length"], a["answer_length"]
        label = f"; desirable {a['desirable']}, undesirable {a['undesirable']}" if "desirable" in a else ""
        lines.append(f"[{split}] prompt tokens p50 {p['p50']} max {p['max']}; answer tokens p50 {r['p50']} "
                     f"max {r['max']}, {a['answer_tokens']} in all (the only tokens scored){label}")
    return "\n".join(lines)
