"""Preference data: a prompt with a chosen and a rejected answer (DPO, ORPO, SimPO), or a
prompt with one answer labelled desirable or not (KTO), read from the layouts users have.

Paired layouts (each row: a prompt conversation ending with the user's turn, and two answers):

- LLaMA-Factory's ranking ShareGPT: ``conversations`` + ``chosen`` + ``rejected``, the answers
  ``{"from": "gpt", "value": ...}`` objects (or strings);
- Alpaca ranking: ``instruction``, ``input`` (+ ``system``, ``history``) + ``chosen`` + ``rejected`` strings;
- OpenAI messages: ``messages`` (the prompt) + ``chosen`` / ``rejected`` assistant messages
  (``{"role": "assistant", "content": ...}``, a one-message list, or strings);
- TRL's: ``prompt`` (a string or a list of messages) + ``chosen`` / ``rejected``.

Labelled layouts (KTO): ``messages`` whose last message is the assistant's answer + a boolean
``label`` (LLaMA-Factory's kto_en_demo), or TRL's ``prompt`` + ``completion`` + ``label``.

Every row is accounted for as the instruction readers do (:mod:`chattune.data.sources`):
converted, skipped with the reason (or, with ``strict``, a :class:`RecordError` naming the
file, row and field), or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from chattune.config import DataSource
from chattune.data.formats import from_alpaca, from_openai, from_sharegpt
from chattune.data.records import RecordError, _check_text, validate_messages
from chattune.data.sources import FileSummary, apply_sampling, read_counted

PAIRED = "paired"
LABELLED = "labelled"


@dataclass
class PreferenceRecord:
    """A prompt (messages ending with the user's turn) and its answers: ``chosen`` and
    ``rejected`` for a pair; for a labelled row ``chosen`` is the answer and ``desirable`` its label."""

    prompt: list[dict]
    chosen: str
    rejected: str | None = None
    desirable: bool | None = None
    source: str = ""

    def to_json(self) -> dict:
        """The canonical JSONL row."""
        if self.rejected is None:
            return {"messages": self.prompt + [{"role": "assistant", "content": self.chosen}],
                    "label": self.desirable, "source": self.source}
        return {"messages": self.prompt, "chosen": {"role": "assistant", "content": self.chosen},
                "rejected": {"role": "assistant", "content": self.rejected}, "source": self.source}


def _answer(value, loc: str, allow_empty: bool = False) -> str:
    """An answer's text from a string, a ShareGPT ``{from, value}``, an OpenAI ``{role, content}``
    or a one-message list of either; an empty one only where ``allow_empty``."""
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError(f"{loc}: expected one assistant message, got a list of {len(value)}")
        value, loc = value[0], f"{loc}[0]"
    if isinstance(value, dict):
        # errors name the keys the row has: ShareGPT's from/value, OpenAI's role/content
        sharegpt = "role" not in value and ("from" in value or "value" in value)
        role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
        speaker = value.get(role_key)
        if speaker not in ("assistant", "gpt", "bot", "model"):
            raise RecordError(f"{loc}.{role_key}: expected 'assistant' (or ShareGPT's 'gpt'), got {speaker!r}")
        if value.get("tool_calls"):
            raise RecordError(f"{loc}: expected a text answer; tool calls in preference answers are not supported")
        value = value.get(text_key)
        loc = f"{loc}.{text_key}"
    if not isinstance(value, str):
        raise RecordError(f"{loc}: expected a string, got {type(value).__name__}")
    _check_text(value, loc)
    if not value.strip() and not allow_empty:
        raise RecordError(f"{loc}: empty response")
    return value


def _prompt_messages(value: dict, where: str) -> list[dict]:
    """The prompt conversation of a row in any of the layouts, ending with the user's turn."""
    if "conversations" in value:
        messages = from_sharegpt(value, where)
    elif "messages" in value:
        messages = from_openai(value, where)
    elif "instruction" in value:
        messages = from_alpaca({**value, "output": "-"}, where)[:-1]
    elif "prompt" in value:
        prompt = value["prompt"]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            messages = from_openai({"messages": prompt}, where)
        else:
            raise RecordError(f"{where}.prompt: expected a string or a list of messages, got {type(prompt).__name__}")
    else:
        raise RecordError(f"{where}: unknown format: keys {sorted(map(str, value))}; expected a prompt as "
                          "conversations (ShareGPT), messages (OpenAI), instruction/input (Alpaca) or prompt (TRL)")
    return messages


def _prompt_field(value: dict) -> str:
    """The key of a row that holds its prompt (as :func:`_prompt_messages` reads it)."""
    return next(key for key in ("conversations", "messages", "instruction", "prompt") if key in value)


def _check_prompt(messages: list[dict], where: str, field: str) -> None:
    validate_messages(messages, where, need_answer=False)
    if messages[-1]["role"] != "user":
        raise RecordError(f"{where}.{field}: the prompt must end with the user's message, got "
                          f"{messages[-1]['role']!r} (the last message must be the user's)")


def to_pair(value, where: str) -> PreferenceRecord:
    """One paired row as a :class:`PreferenceRecord`, or RecordError naming the row and field."""
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(value).__name__}")
    for key in ("chosen", "rejected"):
        if value.get(key) is None:
            raise RecordError(f"{where}: missing field {key!r} (a pair needs a chosen and a rejected answer)")
    prompt = _prompt_messages(value, where)
    _check_prompt(prompt, where, _prompt_field(value))
    chosen = _answer(value["chosen"], f"{where}.chosen")
    rejected = _answer(value["rejected"], f"{where}.rejected")
    if chosen.strip() == rejected.strip():
        raise RecordError(f"{where}: chosen and rejected are identical (nothing to prefer)")
    return PreferenceRecord(prompt, chosen, rejected, source=where)


def to_answered(conversation, where: str) -> PreferenceRecord:
    """A conversation that ends with the assistant's answer (OpenAI ``{role, content}`` messages)
    as a :class:`PreferenceRecord` of its prompt and that answer (no rejected one): what a reward
    model scores. The answer may be empty: a policy that stops at once still gets a score.
    RecordError naming ``where`` and the message at fault."""
    if not isinstance(conversation, list) or len(conversation) < 2:
        got = f"a list of {len(conversation)}" if isinstance(conversation, list) else type(conversation).__name__
        raise RecordError(f"{where}: expected a list of messages (the prompt, then the assistant's answer), got {got}")
    last = len(conversation) - 1
    answer = _answer(conversation[last], f"{where}[{last}]", allow_empty=True)
    prompt = from_openai({"messages": conversation[:last]}, where)
    _check_prompt(prompt, where, "messages")
    return PreferenceRecord(prompt, answer, source=where)


def to_labelled(value, where: str) -> PreferenceRecord:
    """One KTO row (an answer and its boolean ``label``) as a :class:`PreferenceRecord`."""
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(value).__name__}")
    if "label" not in value:
        raise RecordError(f"{where}: missing field 'label' (true: a desirable answer, false: an undesirable one)")
    label = value["label"]
    if not isinstance(label, bool):
        raise RecordError(f"{where}.label: expected one of true or false, got {label!r}")
    if "completion" in value:
        prompt = _prompt_messages(value, where)
        answer = _answer(value["completion"], f"{where}.completion")
    else:
        messages = _prompt_messages(value, where)
        if not messages or messages[-1]["role"] != "assistant":
            raise RecordError(f"{where}: the last message must be the assistant's answer that label judges")
        last = len(messages) - 1
        answer = _answer(messages[-1], f"{where}.messages[{last}]")
        prompt = messages[:-1]
    _check_prompt(prompt, where, _prompt_field(value))
    return PreferenceRecord(prompt, answer, desirable=label, source=where)


def record_key(record: PreferenceRecord) -> str:
    """A content hash of a row (prompt, answers, label), for exact-duplicate detection."""
    content = [record.prompt, record.chosen, record.rejected, record.desirable]
    return hashlib.sha1(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_preference_source(source: DataSource, kind: str, *, strict: bool = False, dedup: bool = True,
                           seen: set[str] | None = None) -> tuple[list[PreferenceRecord], FileSummary]:
    """Read one file of pairs (``kind`` :data:`PAIRED`) or labelled answers (:data:`LABELLED`);
    bad rows are skipped and counted, or raise with ``strict``."""
    convert = to_pair if kind == PAIRED else to_labelled
    summary = FileSummary(path=source.path, format=kind)
    records = read_counted(source.path, summary, lambda row: convert(row.value, row.where), record_key,
                           strict=strict, dedup=dedup, seen=set() if seen is None else seen)
    return records, summary


def load_preference_records(sources: list[DataSource], kind: str, *, strict: bool = False, dedup: bool = True,
                            seed: int = 42) -> tuple[list[PreferenceRecord], list[FileSummary]]:
    """Read, validate, de-duplicate and mix several preference files (max_samples and weight
    applied as for instruction data)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[PreferenceRecord] = []
    summaries = []
    for source in sources:
        file_records, summary = read_preference_source(source, kind, strict=strict, dedup=dedup, seen=seen)
        records += apply_sampling(file_records, source, summary, rng)
        summaries.append(summary)
    return records, summaries
