"""A template's tool call text, parsed back: what a model writes when it calls a function
(the text its template trained, see :mod:`chattune.templates.registry`) as OpenAI-shaped calls,
and the text that forces a call (``tool_choice``).

A template names its call format (``Template.tool_format``; ``tokenizer``: :data:`CHAT_TEMPLATE_FORMAT`),
and everything here follows the format, never the template's name. What is parsed, per format
(``text`` is the model's output after the generation prompt):

- ``json-tags`` (``default``): each ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block is a
  call, wherever it is (the `default` template writes the assistant's text, then one block per line,
  then EOS); the text outside the blocks is the content. A last block without its
  ``</tool_call>`` (the output ended, or a stop string cut it) is still a call.
- ``json-tags-or-name-json`` (``tokenizer``): the same ``<tool_call>`` blocks (Qwen2 / Hermes: a newline on each side of
  the JSON), and, in an output without such a block, GLM-4's form: the first line is exactly
  the name of one of the request's tools and the rest is its arguments as JSON (the
  ``{name}\\n{json}`` that GLM-4's chat template writes after ``<|assistant|>``). No copy
  of any chat template is needed for either; the forced prefix (:func:`call_prefix`) is
  read off the chat template by rendering a probe call through it.
- ``chatglm3``: the output is cut at each ``<|assistant|>`` (ChatGLM3 writes a text message
  before a call as its own message; the server keeps that token in the decoded text, see
  :data:`KEPT_TOKENS`); a part is a call when its first line is a name (one word, the
  metadata line) and the next line opens a code fence whose code starts with ``tool_call``:
  ``tool_call(k=v, ...)``, whose keyword values are Python literals (converted with ``ast.literal_eval`` to a JSON
  object). Generation stops at ``<|observation|>``, which ends a call. Other parts are content.

Inside a call, ``arguments`` (``parameters`` is read too) that are not a JSON object are kept
as the model wrote them and flagged (``valid`` False, with a message in ``errors``); a call
whose name cannot be read is content. Nothing here raises on a model's output: garbage is
content.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

from chattune.templates.pieces import Piece, TemplateError
from chattune.templates.registry import NAMED_TEMPLATES, get_template, render

TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"
CHATGLM3_MARKER = "<|assistant|>"
CHAT_TEMPLATE_FORMAT = "json-tags-or-name-json"
"""The call format read from a tokenizer's own chat template (``tokenizer``)."""
FORMAT_KEPT_TOKENS: dict[str, tuple[str, ...]] = {"chatglm3": (CHATGLM3_MARKER,)}
"""Special tokens a format's calls are written with that must stay in the decoded text
(decoding otherwise drops special tokens): ChatGLM3's ``<|assistant|>`` between a text
message and the call after it."""


def call_format(template_name: str) -> str | None:
    """The call format of a template (resolved, not ``auto``); None: it renders no tools."""
    template = get_template(template_name)
    return CHAT_TEMPLATE_FORMAT if template is None else template.tool_format


KEPT_TOKENS: dict[str, tuple[str, ...]] = {
    name: FORMAT_KEPT_TOKENS[template.tool_format] for name, template in NAMED_TEMPLATES.items()
    if template.tool_format in FORMAT_KEPT_TOKENS}
"""The kept tokens (:data:`FORMAT_KEPT_TOKENS`) per template name."""
PROBE_NAME = "chattune_probe_function"


@dataclass(frozen=True)
class ParsedCall:
    """One call: the function's name and its arguments as a JSON text (OpenAI's
    ``function.arguments``); ``valid`` says whether they parsed as a JSON object (if not,
    they are the text the model wrote)."""

    name: str
    arguments: str
    valid: bool = True


@dataclass
class ParsedOutput:
    """A model's output read back: ``content`` (the text outside calls; None when the calls
    are all there is), the ``calls``, and what could not be read (one line each)."""

    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def tool_names(tools: list[dict] | None) -> list[str]:
    """The names of function objects (OpenAI's ``{"type": "function", "function": ...}``
    wrapper or bare)."""
    names = []
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _loads(text: str):
    """JSON as clients read it (no NaN / Infinity)."""
    return json.loads(text, parse_constant=_reject_constant)


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _why(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (character {exc.pos})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc) or type(exc).__name__


def _arguments(name: str, value, errors: list[str]) -> ParsedCall:
    """A call whose arguments are a parsed JSON value (an object, or a JSON text of one)."""
    if value is None:
        return ParsedCall(name, "{}")
    if isinstance(value, str):
        try:
            decoded = _loads(value)
        except (ValueError, RecursionError) as exc:
            errors.append(f"function {name}: arguments are not valid JSON: {_why(exc)}")
            return ParsedCall(name, value, False)
        if isinstance(decoded, dict):
            return ParsedCall(name, _dumps(decoded))
        errors.append(f"function {name}: arguments are not a JSON object (got {type(decoded).__name__})")
        return ParsedCall(name, value, False)
    if isinstance(value, dict):
        return ParsedCall(name, _dumps(value))
    errors.append(f"function {name}: arguments are not a JSON object (got {type(value).__name__})")
    return ParsedCall(name, _dumps(value), False)


_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*(?:,\s*"(?:arguments|parameters)"\s*:(?P<rest>.*))?\Z',
                   re.DOTALL)


def _raw_arguments(name: str, rest: str | None, errors: list[str]) -> ParsedCall:
    """The arguments of a call whose JSON did not parse as a whole: valid when they are a JSON
    object followed by nothing but the call's closing brace; else the text as written."""
    if rest is None:
        errors.append(f"function {name}: the call has no arguments (its text ends before them)")
        return ParsedCall(name, "", False)
    rest = rest.strip()
    try:
        value, end = json.JSONDecoder(parse_constant=_reject_constant).raw_decode(rest)
    except (ValueError, RecursionError) as exc:
        value, end, why = None, 0, f"arguments are not valid JSON: {_why(exc)}"
    else:
        why = ("arguments are not valid JSON: text after them" if isinstance(value, dict)
               else f"arguments are not a JSON object (got {type(value).__name__})")
    if isinstance(value, dict) and rest[end:].strip() in ("", "}"):
        return ParsedCall(name, _dumps(value))
    if rest.endswith("}") and rest.count("}") > rest.count("{"):
        rest = rest[:-1].rstrip()  # the call object's own closing brace
    errors.append(f"function {name}: {why}")
    return ParsedCall(name, rest, False)


def _json_call(body: str, errors: list[str]) -> ParsedCall | None:
    """A ``{"name": ..., "arguments": {...}}`` call, or None when no name can be read."""
    body = body.strip()
    try:
        value = _loads(body)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        name = value.get("name")
        if not isinstance(name, str) or not name.strip():
            return None
        return _arguments(name, value.get("arguments", value.get("parameters")), errors)
    match = _HEAD.match(body)
    if match is None:
        return None
    try:
        name = _loads(f'"{match[1]}"')
    except (ValueError, RecursionError):
        name = match[1]
    if not name.strip():
        return None
    return _raw_arguments(name, match["rest"], errors)


def _join(parts: list[str]) -> str | None:
    text = "\n".join(part.strip() for part in parts if part.strip())
    return text or None


def _parse_tagged(text: str, errors: list[str]) -> tuple[list[str], list[ParsedCall]] | None:
    """``<tool_call>`` blocks: (text outside calls, calls), or None when there is no block."""
    if TAG_OPEN not in text:
        return None
    outside, calls, pos = [], [], 0
    while True:
        at = text.find(TAG_OPEN, pos)
        if at < 0:
            outside.append(text[pos:])
            break
        outside.append(text[pos:at])
        start = at + len(TAG_OPEN)
        close, reopen = text.find(TAG_CLOSE, start), text.find(TAG_OPEN, start)
        if close >= 0 and (reopen < 0 or close < reopen):
            body, pos = text[start:close], close + len(TAG_CLOSE)
        else:
            body = text[start:reopen] if reopen >= 0 else text[start:]
            pos = reopen if reopen >= 0 else len(text)
        call = _json_call(body, errors)
        if call is None:
            errors.append(f"a {TAG_OPEN} block is not a call {{\"name\": ..., \"arguments\": {{...}}}}; "
                          "it is returned as content")
            outside.append(text[at:pos])
        else:
            calls.append(call)
    return outside, calls


def _parse_name_json(text: str, tools: list[dict] | None, errors: list[str]):
    """GLM-4's ``{name}\\n{arguments JSON}``: the first line is one of the tools' names."""
    first, newline, rest = text.lstrip().partition("\n")
    if not newline or first.strip() not in tool_names(tools):
        return None
    name, rest = first.strip(), rest.strip()
    try:
        value, end = json.JSONDecoder(parse_constant=_reject_constant).raw_decode(rest)
    except (ValueError, RecursionError) as exc:
        errors.append(f"function {name}: arguments are not valid JSON: {_why(exc)}")
        return [], [ParsedCall(name, rest, False)]
    if not isinstance(value, dict):
        errors.append(f"function {name}: arguments are not a JSON object (got {type(value).__name__})")
        return [], [ParsedCall(name, rest, False)]
    return [rest[end:]], [ParsedCall(name, _dumps(value))]


_CHATGLM3_CALL = re.compile(r"[ \t]*(?P<name>[^\s`]+)[ \t]*\n[ \t]*```[^\n]*(?:\n(?P<code>.*))?\Z", re.DOTALL)


def python_call_arguments(code: str) -> dict:
    """``tool_call(k=v, ...)`` (ChatGLM3's call code) as a dict of its keyword values;
    ValueError (or SyntaxError, TypeError) when it is anything else."""
    tree = ast.parse(code.strip(), mode="eval")
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError("expected tool_call(name=value, ...)")
    if call.args or any(keyword.arg is None for keyword in call.keywords):
        raise ValueError("expected keyword arguments only, tool_call(name=value, ...)")
    arguments = {}
    for keyword in call.keywords:
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            value = ast.unparse(keyword.value)
            value = value if len(value) <= 40 else value[:37] + "..."
            raise ValueError(f"{keyword.arg}={value} is not a Python literal") from None
    return arguments


def _chatglm3_call(part: str, errors: list[str]) -> ParsedCall | None:
    match = _CHATGLM3_CALL.match(part)
    if match is None:
        return None
    name, code = match["name"], match["code"] or ""
    if not code.lstrip().startswith("tool_call"):
        return None
    fence = code.rfind("```")
    if fence >= 0:
        code = code[:fence]
    code = code.strip()
    try:
        return ParsedCall(name, _dumps(python_call_arguments(code)))
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as exc:
        why = f"{type(exc).__name__}: {exc}" if isinstance(exc, SyntaxError) else _why(exc)
        errors.append(f"function {name}: arguments are not valid Python keyword literals "
                      f"(tool_call(name=value, ...)): {why}")
    raw = code
    if raw.startswith("tool_call(") and raw.endswith(")"):
        raw = raw[len("tool_call("):-1]
    elif raw.startswith("tool_call("):
        raw = raw[len("tool_call("):]
    return ParsedCall(name, raw.strip(), False)


def _parse_chatglm3(text: str, errors: list[str]):
    outside, calls = [], []
    for part in text.split(CHATGLM3_MARKER):
        call = _chatglm3_call(part, errors)
        if call is None:
            outside.append(part)
        else:
            calls.append(call)
    return outside, calls


def parse_calls(template_name: str, text: str, tools: list[dict] | None) -> ParsedOutput:
    """``text`` (a model's output, after any forced prefix) as content and calls, read in
    the form ``template_name`` trains (see the module's docstring). Without calls the
    content is ``text`` itself (less any kept marker token). Never raises."""
    errors: list[str] = []
    form = call_format(template_name)
    try:
        if form == "chatglm3":
            found = _parse_chatglm3(text, errors)
        else:
            found = _parse_tagged(text, errors)
            if found is None and form == CHAT_TEMPLATE_FORMAT:
                found = _parse_name_json(text, tools, errors)
    except Exception as exc:  # never a 500 for a model's output: what cannot be read is content
        return ParsedOutput(text, [], [f"the output could not be read for tool calls: {_why(exc)}"])
    if not found or not found[1]:
        plain = text.replace(CHATGLM3_MARKER, "") if form == "chatglm3" else text
        return ParsedOutput(plain, [], errors)
    outside, calls = found
    known = tool_names(tools)
    for call in calls:
        if known and call.name not in known:
            errors.append(f"function {call.name!r} is not one of the request's tools ({', '.join(known)})")
    return ParsedOutput(_join(outside), calls, errors)


def streamable(template_name: str, text: str, tools: list[dict] | None) -> int:
    """How much of a growing output is content whatever comes next: the length of the
    prefix of ``text`` that :func:`parse_calls` will return as the start of its content.

    ``default`` / ``tokenizer``: the text before a ``<tool_call>`` (or before a tail that
    may begin one), less trailing whitespace; for ``tokenizer`` nothing while the first line
    may still be a tool's name (GLM-4's form). ``chatglm3``: nothing (a call starts with a
    bare name, which cannot be told from text until the output ends).
    """
    form = call_format(template_name)
    if form == "chatglm3":
        return 0
    if form == CHAT_TEMPLATE_FORMAT and TAG_OPEN not in text:
        first, newline, _ = text.lstrip().partition("\n")
        names = tool_names(tools)
        if (first.strip() in names) if newline else any(name.startswith(first.strip()) for name in names):
            return 0
    at = text.find(TAG_OPEN)
    if at < 0:
        at = len(text)
        for n in range(min(len(TAG_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(TAG_OPEN[:n]):
                at = len(text) - n
                break
    return len(text[:at].rstrip())


# -- forcing a call ---------------------------------------------------------------------------


def forced_name(tool_choice, tools: list[dict] | None) -> str | None:
    """The function ``tool_choice`` makes the model call: the one it names, or for
    ``required`` the only tool there is; None otherwise."""
    if isinstance(tool_choice, dict):
        return (tool_choice.get("function") or {}).get("name")
    names = tool_names(tools)
    if tool_choice == "required" and len(names) == 1:
        return names[0]
    return None


def _probe_call(template_name: str, tokenizer) -> str:
    """The call text the template trains for a call to :data:`PROBE_NAME` with arguments ``{}``."""
    messages = [{"role": "user", "content": "?"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": PROBE_NAME, "arguments": {}}]}]
    pieces = render(template_name, messages, tokenizer, [{"name": PROBE_NAME}])
    return "".join(piece.text for piece in pieces if piece.role == "tool_call")


def call_prefix(template_name: str, tool_choice, tools: list[dict] | None, tokenizer=None) -> list[Piece]:
    """The text that opens a call, appended to the generation prompt so that the model must
    call (as ``tool_call`` pieces, each tokenized on its own as training tokenizes the call's
    pieces); ``[]`` when nothing is forced. ``tool_choice`` is ``auto``, ``none``, ``required``
    or OpenAI's ``{"type": "function", "function": {"name": ...}}``.

    A named function (or ``required`` with one tool): the call up to its arguments, e.g.
    ``<tool_call>{"name": "get_weather", "arguments":`` for ``default``, ``get_weather\\n`` then
    ``` ```python\\ntool_call( ``` for ``chatglm3``. ``required`` with several tools: the call
    up to the name, ``<tool_call>{"name":``; nothing for a template whose calls begin with the
    bare name (chatglm3, GLM-4's form), which no fixed text can force. ``default`` and
    ``tokenizer`` read the text off a probe call rendered through the template itself. The
    forced text stops before a trailing space: a BPE tokenizer joins that space to the word
    after it, so the model writes it with the next token, as in training.
    """
    if tool_choice in (None, "auto", "none") or not tools:
        return []
    name = forced_name(tool_choice, tools)
    if call_format(template_name) == "chatglm3":
        if name is None:
            return []
        return [Piece(f"{name}\n", "tool_call"), Piece("```python\ntool_call(", "tool_call")]
    try:
        probe = _probe_call(template_name, tokenizer)
    except TemplateError:  # the template cannot render a call: nothing can be forced
        return []
    at = probe.find(PROBE_NAME)
    if at < 0:
        return []
    opening = probe[:at]
    if name is None:
        opening = opening.rstrip(' "')
        return [Piece(opening, "tool_call")] if opening.strip() else []
    after = at + len(PROBE_NAME)
    arguments = probe.find("{}", after)
    middle = probe[after:arguments] if arguments >= 0 else ""
    written = json.dumps(name, ensure_ascii=False)[1:-1] if opening.endswith('"') else name
    return [Piece((opening + written + middle).rstrip(" "), "tool_call")]
