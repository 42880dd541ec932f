"""The one internal record type: a conversation as a list of messages.

A message is a plain dict ``{"role": "system"|"user"|"assistant", "content": str}``.
A user message converted from Alpaca data may also carry ``"input"``: the
Alpaca ``input`` field, kept apart from the instruction so that templates that
show it in its own block (``alpaca``, ``chatglm-tuning``) can; every other
template sees :func:`user_text`, the instruction and input joined.
"""

from __future__ import annotations

from dataclasses import dataclass

from chattune.errors import ChattuneError

ROLES = ("system", "user", "assistant")


class RecordError(ChattuneError, ValueError):
    """A record is malformed; the message names where and what was expected."""


@dataclass
class Record:
    """A conversation plus where it came from (``file:line`` or ``file#index``)."""

    messages: list[dict]
    source: str = ""

    def to_json(self) -> dict:
        """The canonical JSONL row: ``{"messages": [...], "source": ...}``."""
        return {"messages": self.messages, "source": self.source}


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


def validate_messages(messages: list[dict], where: str, *, need_answer: bool = True) -> None:
    """Check roles, order and contents; raise RecordError naming ``where`` and the field.

    Allowed order: an optional system message, then user/assistant turns that
    alternate starting with user. With ``need_answer`` the last message must be
    a non-empty assistant answer.
    """
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: expected a non-empty list of messages")
    expected_role = "user"
    for i, message in enumerate(messages):
        loc = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise RecordError(f"{loc}: expected an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        content = message.get("content")
        if role not in ROLES:
            raise RecordError(f"{loc}.role: expected one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RecordError(f"{loc}.content: expected a string, got {type(content).__name__}")
        _check_text(content, f"{loc}.content")
        if "input" in message:
            if not isinstance(message["input"], str):
                raise RecordError(f"{loc}.input: expected a string, got {type(message['input']).__name__}")
            _check_text(message["input"], f"{loc}.input")
        if role == "system":
            if i != 0:
                raise RecordError(f"{loc}: a system message may only come first (roles out of order)")
            continue
        if role != expected_role:
            raise RecordError(f"{loc}.role: expected {expected_role!r} here (roles out of order), got {role!r}")
        if role == "user" and not user_text(message).strip():
            raise RecordError(f"{loc}.content: empty user message")
        expected_role = "assistant" if role == "user" else "user"
    if need_answer:
        last = messages[-1]
        if last["role"] != "assistant":
            raise RecordError(f"{where}: the last message must be the assistant's answer, got {last['role']!r}")
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and not message["content"].strip():
                raise RecordError(f"{where}: messages[{i}].content: empty response")


def split_prompt(messages: list[dict]) -> tuple[list[dict], str | None]:
    """Split a conversation into the prompt part and the final answer (the reference)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None
