"""Readers: raw files (JSON, JSON Lines, CSV, Parquet) in Alpaca, ShareGPT,
OpenAI-messages or column-mapped layouts, turned into :class:`Record` s.

Every raw row gets a location (``file:line`` for JSON Lines and CSV,
``file#index`` for a JSON array or Parquet) that any error about it names.

Tool calling data (see :mod:`chattune.data.records` for the canonical form) comes in two
layouts. ShareGPT as LLaMA-Factory writes it (e.g. ``glaive_toolcall_en_demo.json``):
``function_call`` turns whose value is a JSON call ``{"name", "arguments"}`` or a JSON list of
them (parallel calls), ``observation`` turns with the results, and a top-level ``tools`` column
holding a JSON string (or a list) of function objects. OpenAI messages: assistant messages with
``tool_calls`` (``{"id", "type": "function", "function": {"name", "arguments": "<JSON>"}}``),
``tool`` messages with ``tool_call_id``, and a top-level ``tools`` list.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.data.records import (
    Record,
    RecordError,
    check_tools,
    unwrap_function,
    validate_messages,
)
from chattune.errors import ChattuneError
from chattune.vision.images import PLACEHOLDER, count_placeholders, load_image, resolve_ref

FORMATS = ("auto", "alpaca", "sharegpt", "openai", "columns")
COLUMN_TARGETS = ("prompt", "query", "response", "system", "history")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
SHAREGPT_TOOL_TURNS = ("function_call", "observation")
"""LLaMA-Factory's ShareGPT speakers for an assistant's tool call and the tool's result."""


DATA_FILE_TYPES = ".json, .jsonl, .csv or .parquet"
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)
"""Longest CSV cell read (the csv module's default, 128 KiB, is short for long documents)."""
CSV_EXTRA_CELLS = "(cells past the header)"
"""The key under which a CSV row keeps cells beyond its header's columns."""
UTF8_BOM = b"\xef\xbb\xbf"


class DataFileError(ChattuneError, ValueError):
    """A data file cannot be read at all (missing, malformed JSON, unknown type)."""


def check_data_file(path: str | Path, expected: str | None = None) -> Path:
    """``path`` as a Path if it is a regular file, else raise DataFileError saying what it is and
    what was ``expected`` (default: a data file of the types chattune reads)."""
    path = Path(path)
    wanted = expected or f"a data file ({DATA_FILE_TYPES})"
    if path.is_dir():
        raise DataFileError(f"{path}: is a directory; expected {wanted}")
    if not path.exists():
        raise DataFileError(f"{path}: no such file" + (f"; expected {expected}" if expected else ""))
    if not path.is_file():
        raise DataFileError(f"{path}: not a regular file; expected {wanted}")
    return path


def _unreadable(path: Path, exc: OSError) -> DataFileError:
    return DataFileError(f"{path}: cannot read: {exc.strerror or exc}")


@dataclass
class RawRow:
    """One raw row of a file and where it is."""

    value: Any
    where: str


def _read_json_text(path: Path, text: str) -> Iterator[RawRow]:
    """A JSON array, one JSON object, or (several top-level values) JSON Lines."""
    if not text.strip():
        return
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            yield from _read_jsonl_text(path, text)
            return
        raise DataFileError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:
        raise _unusable_json(str(path), exc) from exc
    if isinstance(whole, list):
        for i, value in enumerate(whole):
            yield RawRow(value, f"{path}#{i}")
    elif isinstance(whole, dict):
        yield RawRow(whole, f"{path}#0")
    else:
        raise DataFileError(f"{path}: expected a JSON array or object, got {type(whole).__name__}")


def _read_jsonl_text(path: Path, text: str) -> Iterator[RawRow]:
    # split on "\n" only: U+2028 and friends are legal inside JSON strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        row = _jsonl_row(path, lineno, line)
        if row is not None:
            yield row


def utf8_lines(handle, not_utf8) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line of a binary file ``handle``, decoded one at a time (a
    leading BOM dropped, the ``\n`` ending too); a line that is not UTF-8 raises
    ``not_utf8(lineno, exc, byte offset in the file)``."""
    offset = 0
    for lineno, raw in enumerate(handle, start=1):
        skip = len(UTF8_BOM) if lineno == 1 and raw.startswith(UTF8_BOM) else 0
        try:
            line = raw[skip:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise not_utf8(lineno, exc, offset + skip + exc.start) from exc
        offset += len(raw)
        yield lineno, line.removesuffix("\n")


def _read_jsonl_lines(path: Path) -> Iterator[RawRow]:
    """A JSON Lines file read a line at a time (split on ``\n`` only, as :func:`_read_jsonl_text`
    splits): memory holds one line, however long the file; a line that is not UTF-8 is an error
    naming its byte offset in the file, met when it is read."""

    def not_utf8(lineno: int, exc: UnicodeDecodeError, offset: int) -> DataFileError:
        return DataFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {offset})")

    try:
        with path.open("rb") as handle:
            for lineno, line in utf8_lines(handle, not_utf8):
                row = _jsonl_row(path, lineno, line)
                if row is not None:
                    yield row
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _jsonl_row(path: Path, lineno: int, line: str) -> RawRow | None:
    """One line of JSON Lines as a row (None for a blank line)."""
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}:{lineno}:{exc.colno}: malformed JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:
        raise _unusable_json(f"{path}:{lineno}", exc) from exc
    return RawRow(value, f"{path}:{lineno}")


def _unusable_json(where: str, exc: Exception) -> DataFileError:
    """Well-formed JSON that Python's reader refuses: nesting too deep, an integer too long."""
    if isinstance(exc, RecursionError):
        return DataFileError(f"{where}: JSON nested too deeply to read; expected records of objects, "
                             "lists and strings")
    return DataFileError(f"{where}: unreadable JSON value: {exc}")


def _read_csv(path: Path) -> Iterator[RawRow]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter, restkey=CSV_EXTRA_CELLS)
            while True:
                # the limit is the csv module's global: raised only while this reader parses
                previous = csv.field_size_limit(CSV_FIELD_LIMIT)
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise DataFileError(f"{path}:{reader.reader.line_num}: malformed CSV: {exc}") from exc
                finally:
                    csv.field_size_limit(previous)
                yield RawRow(dict(row), f"{path}:{reader.line_num}")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def parquet_file(path: Path):
    """``path`` opened as a ``pyarrow.parquet.ParquetFile`` (DataFileError if it is not one)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with datasets
        raise DataFileError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataFileError(f"{path}: not a readable Parquet file: {' '.join(str(exc).split())}") from exc


def _read_parquet(path: Path) -> Iterator[RawRow]:
    with parquet_file(path) as parquet:
        table = parquet.read()
    for i, value in enumerate(table.to_pylist()):
        yield RawRow(value, f"{path}#{i}")


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every raw row of a file, detecting its type by extension and content.

    JSON Lines (``.jsonl``, ``.ndjson``) and CSV are read a row at a time: memory holds one row
    however long the file, and a row is read when it is asked for. A ``.json`` file (an array,
    one object, or JSON Lines under that name) and Parquet are read whole first: a JSON array
    cannot be parsed in parts."""
    path = check_data_file(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    if head.startswith(b"PAR1"):
        yield from _read_parquet(path)
        return
    if suffix in (".csv", ".tsv"):
        yield from _read_csv(path)
        return
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl_lines(path)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    if suffix == ".json" or text.lstrip()[:1] in ("[", "{"):
        yield from _read_json_text(path, text)
    else:
        raise DataFileError(
            f"{path}: unknown file type {suffix or '(none)'}; expected {DATA_FILE_TYPES}"
        )


def detect_format(value: Any, where: str) -> str:
    """Name the layout of one raw record from its keys."""
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(value).__name__}")
    if "messages" in value:
        return "openai"
    if "conversations" in value:
        return "sharegpt"
    if "instruction" in value and "output" in value:
        return "alpaca"
    raise RecordError(
        f"{where}: unknown format: keys {sorted(map(str, value))}; expected alpaca (instruction, input, output), "
        "sharegpt (conversations), openai (messages), or a column map (format: columns)"
    )


def _string_field(value: dict, key: str, where: str, *, required: bool = True) -> str:
    if key not in value or value[key] is None:
        if required:
            raise RecordError(f"{where}: missing field {key!r}")
        return ""
    field_value = value[key]
    if not isinstance(field_value, str):
        raise RecordError(f"{where}.{key}: expected a string, got {type(field_value).__name__}")
    return field_value


def _history_messages(history: Any, where: str) -> list[dict]:
    if history in (None, ""):
        return []
    if not isinstance(history, list):
        raise RecordError(f"{where}.history: expected a list of [query, answer] pairs")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordError(f"{where}.history[{i}]: expected a [query, answer] pair")
        query, answer = pair
        if not isinstance(query, str) or not isinstance(answer, str):
            raise RecordError(f"{where}.history[{i}]: expected two strings")
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    return messages


def from_alpaca(value: dict, where: str) -> list[dict]:
    """Alpaca ``instruction``/``input``/``output`` (+ ``system``, ``history``) to messages."""
    instruction = _string_field(value, "instruction", where)
    extra = _string_field(value, "input", where, required=False)
    output = _string_field(value, "output", where)
    system = _string_field(value, "system", where, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    messages += _history_messages(value.get("history"), where)
    user = {"role": "user", "content": instruction}
    if extra:
        user["input"] = extra
    return messages + [user, {"role": "assistant", "content": output}]


def _load_json(text: str, loc: str, what: str) -> Any:
    """``text`` parsed as JSON, or RecordError ``loc: <what> is not valid JSON: <why>``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{loc}: {what} not valid JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise RecordError(f"{loc}: {what} not valid JSON: {why}") from exc


def _arguments(value: Any, loc: str) -> Any:
    """A call's arguments: a JSON string is parsed, nothing is ``{}``; anything else is kept
    as it is (validate_messages then says unless it is an object)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        return _load_json(value, loc, "function call arguments are")
    return value


def read_tools(value: dict, where: str) -> list[dict] | None:
    """A row's top-level ``tools`` (a list, or a JSON string of one) as canonical function
    objects; None when absent, empty, ``""`` or ``"[]"``."""
    tools = value.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None
        tools = _load_json(tools, f"{where}.tools", "tools are")
    return check_tools(tools, where)


def _sharegpt_calls(text: str, loc: str) -> list[dict]:
    """A ``function_call`` turn's value: a JSON call ``{"name", "arguments"}`` or a list of them."""
    value = _load_json(text, f"{loc}.value", "function call is")
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RecordError(f"{loc}.value: expected a function call {{name, arguments}} or a list of "
                          "them, got an empty list")
    parsed = []
    for c, call in enumerate(calls):
        call_loc = f"{loc}.value[{c}]" if isinstance(value, list) else f"{loc}.value"
        if not isinstance(call, dict):
            raise RecordError(f"{call_loc}: expected a function call {{name, arguments}} (or a "
                              f"list of them), got {type(call).__name__}")
        arguments = _arguments(call.get("arguments"), f"{call_loc}.arguments")
        parsed.append({"name": call.get("name"), "arguments": arguments})
    return parsed


def _split_results(text: str, count: int) -> list[str] | None:
    """One observation's value as ``count`` results when it is a JSON list of that many items."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, list) or len(value) != count:
        return None
    return [item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            for item in value]


def _is_observation(turn: Any) -> bool:
    return isinstance(turn, dict) and turn.get("from", turn.get("role")) == "observation"


def from_sharegpt(value: dict, where: str) -> list[dict]:
    """ShareGPT ``conversations`` of ``{from, value}`` (+ top-level ``system``) to messages.

    A ``function_call`` turn becomes an assistant message with ``tool_calls`` and content
    ``""``; each ``observation`` turn a tool message named after the call it answers. Results
    come one observation per call, in order; for N parallel calls a single observation whose
    value is a JSON list of N items (LLaMA-Factory's layout) is split into N results.
    """
    turns = value.get("conversations")
    if not isinstance(turns, list):
        raise RecordError(f"{where}.conversations: expected a list of {{from, value}} objects")
    messages = []
    system = _string_field(value, "system", where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    unanswered: list = []  # the names of the last function_call's calls still without a result
    first_result = False
    for i, turn in enumerate(turns):
        loc = f"{where}.conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{loc}: expected an object with from and value")
        speaker = turn.get("from", turn.get("role"))
        if not isinstance(speaker, str) or (speaker not in SHAREGPT_ROLES
                                            and speaker not in SHAREGPT_TOOL_TURNS):
            raise RecordError(f"{loc}.from: expected one of {sorted(SHAREGPT_ROLES)}, got "
                              f"{speaker!r}; or 'function_call' / 'observation' for tool calls and "
                              "their results")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise RecordError(f"{loc}.value: expected a string, got {type(text).__name__}")
        if speaker == "function_call":
            calls = _sharegpt_calls(text, loc)
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            unanswered, first_result = [call["name"] for call in calls], True
        elif speaker == "observation":
            results = None
            if first_result and len(unanswered) > 1 and not (
                    i + 1 < len(turns) and _is_observation(turns[i + 1])):
                results = _split_results(text, len(unanswered))
            for result in results or [text]:
                message = {"role": "tool", "content": result}
                name = unanswered.pop(0) if unanswered else None
                if isinstance(name, str) and name:
                    message["name"] = name
                messages.append(message)
            first_result = False
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": text})
            unanswered, first_result = [], False
    return messages


def _call_id(value: Any, loc: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RecordError(f"{loc}: expected a string, got {type(value).__name__}")
    return value


def _openai_calls(calls: Any, loc: str) -> tuple[list[dict], dict[str, tuple[int, Any]]]:
    """An assistant's OpenAI ``tool_calls`` as canonical calls, and their ids -> (index, name).

    Each call is ``{"id", "type": "function", "function": {"name", "arguments"}}`` with the
    arguments a JSON string (or an object), or a canonical ``{"name", "arguments"}``.
    """
    if not isinstance(calls, list):
        raise RecordError(f"{loc}.tool_calls: expected a list of tool calls, got "
                          f"{type(calls).__name__}")
    parsed, ids = [], {}
    for c, call in enumerate(calls):
        call_loc = f"{loc}.tool_calls[{c}]"
        if not isinstance(call, dict):
            raise RecordError(f"{call_loc}: expected a tool call object, got {type(call).__name__}")
        function, function_loc = unwrap_function(call, call_loc)
        if not isinstance(function, dict):
            raise RecordError(f"{function_loc}: expected an object with name and arguments, "
                              f"got {type(function).__name__}")
        name = function.get("name")
        arguments = _arguments(function.get("arguments"), f"{function_loc}.arguments")
        parsed.append({"name": name, "arguments": arguments})
        call_id = _call_id(call.get("id"), f"{call_loc}.id")
        if call_id is not None:
            if call_id in ids:
                raise RecordError(f"{call_loc}.id: duplicate call id {call_id!r}")
            ids[call_id] = (c, name)
    return parsed, ids


def from_openai(value: dict, where: str) -> list[dict]:
    """OpenAI ``messages`` of ``{role, content}`` to messages (extra keys dropped).

    An assistant's ``tool_calls`` become canonical ``{name, arguments}`` calls (content null
    becomes ``""``); a tool message keeps its content and gets the ``name`` of the call its
    ``tool_call_id`` names. The results of parallel calls are put in the calls' order.
    """
    raw = value.get("messages")
    if not isinstance(raw, list):
        raise RecordError(f"{where}.messages: expected a list of {{role, content}} objects")
    messages = []
    order: list[int | None] = []  # for a tool message, the index of the call it answers
    ids: dict[str, tuple[int, Any]] = {}  # the last assistant message's call ids
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise RecordError(f"{where}.messages[{i}]: expected an object with role and content")
        loc = f"{where}.messages[{i}]"
        role = message.get("role")
        kept = {"role": role, "content": message.get("content")}
        if "input" in message:
            kept["input"] = message["input"]
        position = None
        if role == "assistant":
            ids = {}
            if message.get("tool_calls") not in (None, []):
                kept["tool_calls"], ids = _openai_calls(message["tool_calls"], loc)
                if kept["content"] is None:
                    kept["content"] = ""
        elif role == "tool":
            name = message.get("name")
            call_id = _call_id(message.get("tool_call_id"), f"{loc}.tool_call_id")
            if call_id is not None:
                if call_id not in ids:
                    known = (f"the calls before it have ids {sorted(ids)}" if ids
                             else "no call before it has an id")
                    raise RecordError(f"{loc}.tool_call_id: no tool call with id {call_id!r}; "
                                      f"{known}")
                position, called = ids[call_id]
                if name is None:
                    name = called
            if name is not None:
                kept["name"] = name
        messages.append(kept)
        order.append(position)
    return _results_in_call_order(messages, order)


def _results_in_call_order(messages: list[dict], order: list[int | None]) -> list[dict]:
    """Sort each run of tool messages that all carry a call index into the calls' order."""
    result, i = [], 0
    while i < len(messages):
        end = i
        while end < len(messages) and messages[end].get("role") == "tool":
            end += 1
        if end == i:
            result.append(messages[i])
            i += 1
            continue
        run = list(zip(order[i:end], messages[i:end], strict=True))
        if all(position is not None for position, _ in run):
            run.sort(key=lambda item: item[0])
        result += [message for _, message in run]
        i = end
    return result


def from_columns(value: dict, where: str, columns: dict[str, str], need_answer: bool = True) -> list[dict]:
    """Any layout through a column map such as ``{prompt: content, response: summary}``; without
    ``need_answer`` a row may lack the response (the conversation then ends with the user)."""
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
    names = {"prompt": "instruction", "query": "input", "response": "output",
             "system": "system", "history": "history"}
    mapped = {}
    unanswered = not need_answer and not value.get(columns.get("response", ""))
    if unanswered:
        columns = {target: column for target, column in columns.items() if target != "response"}
        mapped["output"] = ""
    for target, column in columns.items():
        cell = value.get(column)
        if cell is None or (cell == "" and target in ("prompt", "response")):
            if target in ("prompt", "response"):
                raise RecordError(f"{where}: missing or empty column {column!r} (mapped to {target})")
            continue
        if target == "history" and isinstance(cell, str):
            try:
                cell = json.loads(cell) if cell.strip() else None
            except json.JSONDecodeError as exc:
                raise RecordError(f"{where}.{column}: history is not a JSON list of pairs: {exc.msg}") from exc
        elif target != "history" and not isinstance(cell, str):
            raise RecordError(f"{where}.{column}: expected a string, got {type(cell).__name__}")
        mapped[names[target]] = cell
    messages = from_alpaca(mapped, where)
    return messages[:-1] if unanswered else messages


def check_columns(columns: dict[str, str] | None, where: str, need_answer: bool = True) -> dict[str, str]:
    """Validate a column map; it must map at least prompt and (with ``need_answer``) response."""
    if not columns:
        raise DataFileError(f"{where}: format 'columns' needs a column map, e.g. prompt=content,response=summary")
    for target in columns:
        if target not in COLUMN_TARGETS:
            raise DataFileError(f"{where}: column map target {target!r} unknown; expected {list(COLUMN_TARGETS)}")
    for needed in ("prompt", "response") if need_answer else ("prompt",):
        if needed not in columns:
            raise DataFileError(f"{where}: column map needs {needed!r}")
    return columns


def _text_of_parts(content: list, loc: str, images: list) -> str:
    """OpenAI content parts as one text: text parts in order, each image part a
    :data:`~chattune.vision.images.PLACEHOLDER` (its URL appended to ``images``)."""
    texts = []
    for j, part in enumerate(content):
        where = f"{loc}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "image"):
            url = part.get("image_url", part.get("image"))
            images.append((url.get("url") if isinstance(url, dict) else url, where))
            texts.append(PLACEHOLDER)
        else:
            raise RecordError(f"{where}: expected a content part {{\"type\": \"text\", \"text\": ...}} or "
                              f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}, got {part!r:.80}")
    return "".join(texts)


def _with_part_images(value: dict, where: str) -> tuple[dict, list]:
    """``value`` with each message's OpenAI content parts made one text, and the images the
    parts named (``(url, where)`` pairs, in order)."""
    raw = value.get("messages")
    if not isinstance(raw, list) or not any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in raw):
        return value, []
    images: list = []
    messages = [dict(m, content=_text_of_parts(m["content"], f"{where}.messages[{i}]", images))
                if isinstance(m, dict) and isinstance(m.get("content"), list) else m for i, m in enumerate(raw)]
    return {**value, "messages": messages}, images


def read_images(value: dict, messages: list[dict], part_images: list, where: str,
                base_dir: str | Path | None) -> list[str] | None:
    """The images of one row, canonical (:func:`~chattune.vision.images.resolve_ref`), each read
    and decoded once to prove it usable; None for a row without images.

    A row that names no image is text, whatever its text holds. Raises RecordError (an
    ImageError for an image) for images given both as content parts and in ``images``, a count
    that differs from the placeholders', and an image that cannot be used.
    """
    given = value.get("images")
    if isinstance(given, str):
        given = [given]
    if given and not isinstance(given, list):
        raise RecordError(f"{where}.images: expected a list of image paths, got {type(given).__name__}")
    if given and part_images:
        raise RecordError(f"{where}: images given both as content parts and in 'images'; expected one of the two")
    named = part_images or [(ref, f"{where}.images[{i}]") for i, ref in enumerate(given or [])]
    if not named:  # a text row: an "<image>" in its text is text (a vision-language run drops it)
        return None
    marks = count_placeholders(messages)
    if marks != len(named):
        raise RecordError(f"{where}: {marks} {PLACEHOLDER} placeholder{'s' if marks != 1 else ''} in the messages "
                          f"but {len(named)} image{'s' if len(named) != 1 else ''}; expected one image per "
                          "placeholder, in order")
    refs = []
    for ref, loc in named:
        resolved = resolve_ref(ref, base_dir, loc)
        load_image(resolved, loc)
        refs.append(resolved)
    return refs


def to_record(row: RawRow, fmt: str, columns: dict[str, str] | None = None, *,
              need_answer: bool = True, base_dir: str | Path | None = None) -> Record:
    """Convert one raw row to a validated Record, or raise RecordError naming the row.

    With ``need_answer`` False a conversation may end with the user's message
    (prediction input without a reference). A row's images (an ``images`` list of paths
    relative to ``base_dir``, the data file's folder, with one ``<image>`` placeholder each in
    the messages; or OpenAI ``image_url`` content parts) are checked and kept in ``images``.
    """
    if fmt not in FORMATS:
        raise RecordError(f"{row.where}: unknown format {fmt!r}; expected one of {list(FORMATS)}")
    if columns and fmt == "auto":
        fmt = "columns"
    if fmt == "auto":
        fmt = detect_format(row.value, row.where)
    if not isinstance(row.value, dict):
        raise RecordError(f"{row.where}: expected a JSON object, got {type(row.value).__name__}")
    tools = None
    value, part_images = _with_part_images(row.value, row.where)
    row = RawRow(value, row.where)
    if fmt == "alpaca":
        messages = from_alpaca(row.value, row.where)
    elif fmt == "sharegpt":
        messages = from_sharegpt(row.value, row.where)
        tools = read_tools(row.value, row.where)
    elif fmt == "openai":
        messages = from_openai(row.value, row.where)
        tools = read_tools(row.value, row.where)
    else:
        messages = from_columns(row.value, row.where, check_columns(columns, row.where, need_answer), need_answer)
    validate_messages(messages, row.where, need_answer=need_answer, tools=tools)
    images = read_images(row.value, messages, part_images, row.where, base_dir)
    return Record(messages=messages, source=row.where, tools=tools, images=images)
