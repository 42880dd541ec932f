"""Tool calls in the API: a request's tools and ``tool_choice`` as a plan for its generation,
and the output read back (:func:`chattune.templates.tool_calls.parse_calls`) as OpenAI's ``tool_calls``.

What a plan changes (prompt, stops, kept marker tokens), the response and stream shapes and
where unreadable calls are reported: docs/design/tool_calls_api.md.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from chattune.inference.runs import LoadedRun, ServedModel
from chattune.templates.pieces import Piece
from chattune.templates.tool_calls import (
    KEPT_TOKENS,
    TAG_CLOSE,
    ParsedOutput,
    call_prefix,
    forced_name,
    parse_calls,
    streamable,
)

ARGUMENT_CHUNK = 16
"""Characters of a call's arguments per streamed chunk."""
CALL_END_TOKENS = {"tokenizer": ("<|observation|>",)}
CALL_END_STRINGS = {"default": ("\nTool:",)}


@dataclass
class ToolPlan:
    """How one request with tools is generated and read back."""

    template: str
    tools: list[dict]
    choice: str | dict
    prefix: list[Piece] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    kept_ids: frozenset[int] = frozenset()

    @property
    def prefix_text(self) -> str:
        """The forced text the output continues."""
        return "".join(piece.text for piece in self.prefix)

    def parse(self, text: str) -> ParsedOutput:
        """The output (after the forced text) as content, calls and errors; a required call
        that is not there is an error too."""
        parsed = parse_calls(self.template, self.prefix_text + text, self.tools)
        if not parsed.calls and self.choice not in ("auto", "none"):
            name = forced_name(self.choice, self.tools)
            wanted = f"a call to {name!r}" if name else "a call"
            forced = "" if self.prefix else " (this template's calls cannot be forced with several tools)"
            parsed.errors.append(f"tool_choice: {wanted} was required, but the output is not a call{forced}")
        return parsed

    def streamable(self, text: str) -> int:
        """How much of the output so far is content whatever follows (nothing after a prefix)."""
        return 0 if self.prefix else streamable(self.template, text, self.tools)


def plan_tools(served: LoadedRun, profile: ServedModel, tools: list[dict] | None, choice, parallel: bool | None
               ) -> ToolPlan | None:
    """The plan for a request's tools and ``tool_choice`` (None when there are none to call)."""
    if not tools or choice == "none":
        return None
    template = profile.template
    plan = ToolPlan(template, tools, choice, call_prefix(template, choice, tools, served.tokenizer))
    plan.stop_strings = list(CALL_END_STRINGS.get(template, ()))
    if parallel is False and template in ("default", "tokenizer"):
        plan.stop_strings.append(TAG_CLOSE)
    plan.stop_token_ids = served.token_ids(CALL_END_TOKENS.get(template, ()))
    plan.kept_ids = served.token_ids(KEPT_TOKENS.get(template, ()))
    return plan


def prefix_ids(served: LoadedRun, plan: ToolPlan | None) -> list[int]:
    """The forced text's token ids, each piece tokenized on its own as in training."""
    if plan is None or not plan.prefix:
        return []
    with served.tokenizer_lock:
        return [i for piece in plan.prefix for i in served.encoder.ids(piece)]


def call_id() -> str:
    """A new call id, ``call_`` and 24 random hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


def openai_calls(parsed: ParsedOutput) -> list[dict]:
    """The calls as OpenAI's ``tool_calls``."""
    return [{"id": call_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in parsed.calls]


def finish_reason(parsed: ParsedOutput, reason: str | None) -> str | None:
    """``tool_calls`` when the output called, unless it was cut (``length``)."""
    return "tool_calls" if parsed.calls and reason != "length" else reason


def extension(parsed: ParsedOutput) -> dict:
    """The response's ``chattune`` field (``{}`` when everything was read)."""
    return {"chattune": {"tool_call_errors": parsed.errors}} if parsed.errors else {}


def message(plan: ToolPlan, text: str) -> tuple[dict, ParsedOutput]:
    """A whole output as the choice's ``message``, and what was read from it."""
    parsed = plan.parse(text)
    body = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        body["tool_calls"] = openai_calls(parsed)
    return body, parsed


class ToolStream:
    """A streamed output with tools: :meth:`feed` says what content may go now, :meth:`end`
    gives the deltas after the output has ended."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent = plan, "", 0

    def feed(self, delta: str) -> str:
        """The content to send after ``delta`` came ("" while it may be a call)."""
        self.text += delta
        safe = self.plan.streamable(self.text)
        if safe <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def end(self) -> tuple[list[dict], ParsedOutput]:
        """The deltas that complete the message (the rest of the content, then the calls),
        and what was read."""
        parsed = self.plan.parse(self.text)
        deltas = []
        content, sent = parsed.content or "", self.text[:self.sent]
        if content.startswith(sent) and len(content) > len(sent):
            deltas.append({"content": content[len(sent):]})
        for index, call in enumerate(openai_calls(parsed)):
            function = call["function"]
            deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                           "function": {"name": function["name"], "arguments": ""}}]})
            arguments = function["arguments"]
            for start in range(0, len(arguments), ARGUMENT_CHUNK):
                piece = arguments[start:start + ARGUMENT_CHUNK]
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        return deltas, parsed
