"""The one internal record type: a conversation as a list of messages, plus the tools it may call
and the images it shows.

A message is a plain dict ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``.
A user message converted from Alpaca data may also carry ``"input"``: the
Alpaca ``input`` field, kept apart from the instruction so that templates that
show it in its own block (``alpaca``, ``chatglm-tuning``) can; every other
template sees :func:`user_text`, the instruction and input joined.

Tool calling: an assistant message may carry ``"tool_calls": [{"name": str, "arguments": {...}}]``
(arguments a parsed JSON object; its content may then be ``""``); each call is answered, in
order, by one ``{"role": "tool", "content": str}`` message (plus an optional ``"name"``: the
function whose result it is), and then the assistant speaks again. A record's ``tools`` are
OpenAI *function* objects ``{"name", "description"?, "parameters"?}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chattune.errors import ChattuneError

ROLES = ("system", "user", "assistant", "tool")
PLAIN_ROLES = ("system", "user", "assistant")
"""The roles of a conversation without tool calls (named in the unknown-role error)."""


class RecordError(ChattuneError, ValueError):
    """A record is malformed; the message names where and what was expected."""


@dataclass
class Record:
    """A conversation plus where it came from (``file:line`` or ``file#index``) and, for tool
    calling data, the function objects the assistant may call."""

    messages: list[dict]
    source: str = ""
    tools: list[dict] | None = None
    images: list[str] | None = None  # one per <image> placeholder, in order (absolute paths or data URLs)

    def to_json(self) -> dict:
        """The canonical JSONL row: ``{"messages": [...], "tools": [...], "images": [...], "source": ...}``
        (``tools`` and ``images`` only when there are some)."""
        row: dict = {"messages": self.messages}
        if self.tools:
            row["tools"] = self.tools
        if self.images:
            row["images"] = self.images
        row["source"] = self.source
        return row


def user_text(message: dict) -> str:
    """A user message's full text: the instruction, then the Alpaca input if any."""
    parts = [message["content"], message.get("input") or ""]
    return "\n".join(part for part in parts if part)


def _check_text(text: str, loc: str) -> None:
    """Raise RecordError unless ``text`` can be written as UTF-8 (no unpaired surrogates,
    which JSON's ``\\ud800`` escapes can produce)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(
            f"{loc}: not valid Unicode text (unpaired surrogate {text[exc.start]!r} at character "
            f"{exc.start}); expected text without lone \\ud800-\\udfff escapes"
        ) from exc


def _check_json(value: Any, loc: str) -> None:
    """Raise RecordError unless ``value`` can be written as JSON text in UTF-8."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise RecordError(f"{loc}: not writable as JSON ({exc}); expected plain JSON values") \
            from exc
    _check_text(text, loc)


def unwrap_function(value, loc: str) -> tuple:
    """The function object inside OpenAI's ``{"type": "function", "function": {...}}`` wrapper
    (and where it is, for messages), or ``value`` itself when it is not wrapped."""
    if isinstance(value, dict) and "function" in value:
        kind = value.get("type", "function")
        if kind != "function":
            raise RecordError(f"{loc}.type: expected 'function', got {kind!r}")
        return value["function"], f"{loc}.function"
    return value, loc


def check_tools(tools: Any, where: str) -> list[dict] | None:
    """The tools of a record as canonical function objects, or None when there are none.

    ``tools`` is a list whose items are function objects ``{"name", "description"?,
    "parameters"?}`` or OpenAI tools ``{"type": "function", "function": {...}}`` (unwrapped);
    other keys are dropped. Raise RecordError naming ``where.tools[i]`` for anything else.
    """
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise RecordError(f"{where}.tools: expected a list of function objects, got "
                          f"{type(tools).__name__}")
    functions: list[dict] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        tool, loc = unwrap_function(tool, f"{where}.tools[{i}]")
        if not isinstance(tool, dict):
            raise RecordError(f"{loc}: expected a function object with name, description and "
                              f"parameters, got {type(tool).__name__}")
        name = tool.get("name")
        if not isinstance(name, str) or not name.strip():
            got = repr(name) if name is None or isinstance(name, str) else type(name).__name__
            raise RecordError(f"{loc}.name: expected a non-empty function name, got {got}")
        if name in names:
            raise RecordError(f"{loc}.name: duplicate tool name {name!r}")
        names.add(name)
        function = {"name": name}
        for key, kind, expected in (("description", str, "a string"),
                                    ("parameters", dict, "a JSON schema object")):
            value = tool.get(key)
            if value is None:
                continue
            if not isinstance(value, kind):
                raise RecordError(f"{loc}.{key}: expected {expected}, got {type(value).__name__}")
            function[key] = value
        _check_json(function, loc)
        functions.append(function)
    return functions


def _check_calls(calls: Any, loc: str, tool_names: list[str]) -> list[str]:
    """Check an assistant message's ``tool_calls``; return the called names in order."""
    if not isinstance(calls, list) or not calls:
        got = "an empty list" if calls == [] else type(calls).__name__
        raise RecordError(f"{loc}.tool_calls: expected a non-empty list of {{name, arguments}} "
                          f"calls, got {got}")
    names = []
    for c, call in enumerate(calls):
        call_loc = f"{loc}.tool_calls[{c}]"
        if not isinstance(call, dict):
            raise RecordError(f"{call_loc}: expected an object with name and arguments, got "
                              f"{type(call).__name__}")
        name = call.get("name")
        if name is not None and not isinstance(name, str):
            raise RecordError(f"{call_loc}.name: expected a string, got {type(name).__name__}")
        if not name or not name.strip():
            raise RecordError(f"{call_loc}.name: empty call name")
        _check_text(name, f"{call_loc}.name")
        if tool_names and name not in tool_names:
            raise RecordError(f"{call_loc}.name: unknown tool {name!r}; the record's tools are "
                              f"{tool_names}")
        arguments = call.get("arguments")
        if not isinstance(arguments, dict):
            raise RecordError(f"{call_loc}.arguments: expected a JSON object, got "
                              f"{type(arguments).__name__}")
        _check_json(arguments, f"{call_loc}.arguments")
        names.append(name)
    return names


def validate_messages(messages: list[dict], where: str, *, need_answer: bool = True,
                      tools: list[dict] | None = None) -> None:
    """Check roles, order and contents; raise RecordError naming ``where`` and the field.

    Allowed order: an optional system message, then user/assistant turns that
    alternate starting with user. An assistant message with ``tool_calls`` is
    followed by one tool message per call, in order, and then by another
    assistant message (a further call or the answer). With ``need_answer`` the
    last message must be the assistant's: a non-empty answer or a tool call.
    When ``tools`` are given, every call must name one of them.
    """
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: expected a non-empty list of messages")
    tool_names = [tool["name"] for tool in tools or []]
    expected_role = "user"
    pending: list[tuple[str, str]] = []  # (messages[i].tool_calls[c], name): calls awaiting results
    for i, message in enumerate(messages):
        loc = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise RecordError(f"{loc}: expected an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        content = message.get("content")
        if role not in ROLES:
            raise RecordError(f"{loc}.role: expected one of {list(PLAIN_ROLES)}, got {role!r}; "
                              "or 'tool' for a tool's result after an assistant's tool_calls")
        if not isinstance(content, str):
            raise RecordError(f"{loc}.content: expected a string, got {type(content).__name__}")
        _check_text(content, f"{loc}.content")
        if "input" in message:
            if not isinstance(message["input"], str):
                raise RecordError(f"{loc}.input: expected a string, got {type(message['input']).__name__}")
            _check_text(message["input"], f"{loc}.input")
        if "tool_calls" in message and role != "assistant":
            raise RecordError(f"{loc}.tool_calls: only an assistant message may carry tool_calls, "
                              f"got one on a {role!r} message")
        if role == "system":
            if i != 0:
                raise RecordError(f"{loc}: a system message may only come first (roles out of order)")
            continue
        if pending and role != "tool":
            call, name = pending[0]
            raise RecordError(f"{where}: {call}: call to {name!r} has no tool result "
                              f"(messages[{i}] is {role!r}, expected 'tool'; one tool message per "
                              "call, in order)")
        if role == "tool":
            if not pending:
                raise RecordError(f"{loc}.role: expected {expected_role!r} here (roles out of "
                                  "order), got 'tool'; a tool message must answer an assistant's "
                                  "tool_calls")
            call, called = pending.pop(0)
            name = message.get("name")
            if name is not None:
                if not isinstance(name, str):
                    raise RecordError(f"{loc}.name: expected a string, got {type(name).__name__}")
                if name != called:
                    raise RecordError(f"{loc}.name: expected {called!r} (the result of {call}), "
                                      f"got {name!r}")
            expected_role = "tool" if pending else "assistant"
            continue
        if role != expected_role:
            raise RecordError(f"{loc}.role: expected {expected_role!r} here (roles out of order), got {role!r}")
        if role == "user" and not user_text(message).strip():
            raise RecordError(f"{loc}.content: empty user message")
        if role == "assistant" and "tool_calls" in message:
            names = _check_calls(message["tool_calls"], loc, tool_names)
            pending = [(f"messages[{i}].tool_calls[{c}]", name) for c, name in enumerate(names)]
            expected_role = "tool"
            continue
        expected_role = "assistant" if role == "user" else "user"
    if pending and messages[-1]["role"] == "tool":
        call, name = pending[0]
        raise RecordError(f"{where}: {call}: call to {name!r} has no tool result (the "
                          "conversation ends; one tool message per call, in order)")
    if need_answer:
        last = messages[-1]
        if last["role"] != "assistant":
            raise RecordError(f"{where}: the last message must be the assistant's answer, got {last['role']!r}")
        for i, message in enumerate(messages):
            if (message["role"] == "assistant" and "tool_calls" not in message
                    and not message["content"].strip()):
                raise RecordError(f"{where}: messages[{i}].content: empty response")


def tool_call_count(messages: list[dict]) -> int:
    """How many tool calls the assistant messages of a conversation make."""
    return sum(len(m.get("tool_calls") or ()) for m in messages if m.get("role") == "assistant")


def split_prompt(messages: list[dict]) -> tuple[list[dict], str | None]:
    """Split a conversation into the prompt part and the final answer (the reference)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None
