"""The ``tokenizer`` template: pieces from the tokenizer's own Jinja chat template.

Each assistant span is what the template adds for that message; tools, calls and results are
found by rendering with and without them (see :func:`render_with_chat_template`). A long
conversation is rendered once whole and each answer in a window of about two turns, so the
work grows with the conversation's length, not with its square.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from chattune.data.records import user_text
from chattune.templates.pieces import Piece, TemplateError, ToolsNotSupportedError, uses_tools


def move_newline_into_answer(pieces: list[Piece]) -> list[Piece]:
    """An ``answer_end`` piece just before its answer becomes part of the answer: template
    text the model generates first (ChatGLM3's newline after ``<|assistant|>``, or a chat
    template's text between the generation prompt and the answer) is trained with it."""
    result: list[Piece] = []
    for piece in pieces:
        if piece.role == "assistant" and result and result[-1].role == "answer_end":
            newline = result.pop()
            result.append(Piece(newline.text + piece.text, "assistant", piece.turn))
        else:
            result.append(piece)
    return result


def _locate_messages(text: str, messages: list[dict], turn: int) -> list[Piece]:
    """Split a rendered prompt span into template text and the messages found in it
    (a tool message's text is an ``observation``)."""
    pieces: list[Piece] = []
    cursor = 0
    for message in messages:
        content = message["content"] if message["role"] != "user" else user_text(message)
        at = text.find(content, cursor) if content else -1
        if at < 0:
            continue
        if at > cursor:
            pieces.append(Piece(text[cursor:at], "template", turn))
        pieces.append(Piece(content, "observation" if message["role"] == "tool" else message["role"], turn))
        cursor = at + len(content)
    if cursor < len(text):
        pieces.append(Piece(text[cursor:], "template", turn))
    return pieces


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: str, b: str) -> int:
    return _common_prefix(a[::-1], b[::-1])


def _mark_tools(pieces: list[Piece], start: int, end: int) -> list[Piece]:
    """The template text at ``[start, end)`` of the rendered text becomes ``tools`` pieces."""
    result: list[Piece] = []
    offset = 0
    for piece in pieces:
        lo, hi = offset, offset + len(piece.text)
        offset = hi
        if piece.role != "template" or hi <= start or lo >= end:
            result.append(piece)
            continue
        a, b = max(start, lo) - lo, min(end, hi) - lo
        for text, role in ((piece.text[:a], "template"), (piece.text[a:b], "tools"),
                           (piece.text[b:], "template")):
            if text:
                result.append(Piece(text, role, piece.turn))
    return result


def _chat_message(message: dict) -> dict:
    """A message as chat templates take it: the user's full text; an assistant's calls in
    OpenAI's shape ``{"type": "function", "function": {"name", "arguments"}}``; a tool
    message with its ``name`` when it has one."""
    role = message["role"]
    out = {"role": role, "content": user_text(message) if role == "user" else message["content"]}
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = [{"type": "function",
                              "function": {"name": call["name"], "arguments": call.get("arguments", {})}}
                             for call in message["tool_calls"]]
    if role == "tool" and message.get("name"):
        out["name"] = message["name"]
    return out


def _chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """OpenAI function objects as chat templates take them: ``{"type": "function", "function": f}``."""
    if not tools:
        return None
    return [t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t}
            for t in tools]


def _template_source(tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return "\n".join(str(v) for v in template.values())
    return str(template)


WINDOWED_FROM = 3
"""Answers from which a conversation is rendered in windows (:func:`_windowed_turns`)."""

Apply = Callable[..., str]


@dataclass(frozen=True)
class _Turn:
    """An answer as rendered: the text the prompt adds before it (after the previous answer's
    span), its span, and the messages and prompt text its span was rendered after."""

    prompt: str
    span: str
    before: list[dict]
    before_text: str


def _exact_turns(apply: Apply, plain: list[dict]) -> tuple[Iterator[_Turn], Callable[[], str]]:
    """Each answer rendered after the whole conversation before it (two renders of a prefix per
    answer: quadratic in the conversation's length), and the text after the last answer; a
    TemplateError, when the turn that shows it is reached, for a template that does not render
    prefixes as prefixes."""
    consumed = [""]

    def turns() -> Iterator[_Turn]:
        for i, message in enumerate(plain):
            if message["role"] != "assistant":
                continue
            prompt_text = apply(plain[:i], True)
            full_text = apply(plain[: i + 1], False)
            if not prompt_text.startswith(consumed[0]) or not full_text.startswith(prompt_text):
                raise TemplateError("the tokenizer's chat template does not render conversation prefixes as "
                                    "prefixes; choose a named template")
            turn = _Turn(prompt_text[len(consumed[0]):], full_text[len(prompt_text):], plain[:i], prompt_text)
            consumed[0] = full_text
            yield turn

    def rest() -> str:
        prompt_text = apply(plain, True)
        if not prompt_text.startswith(consumed[0]):
            raise TemplateError("the tokenizer's chat template is not prefix-stable; choose a named template")
        return prompt_text[len(consumed[0]):]

    return turns(), rest


def _windowed_turns(apply: Apply, plain: list[dict]) -> tuple[Iterator[_Turn], Callable[[], str]] | None:
    """:func:`_exact_turns` in linear time: the conversation rendered once whole, and each answer
    in a window from the last user message before the previous answer (the first answer after
    the whole conversation before it), its texts checked against the whole rendering's at that
    point. None when a window fails or differs from the whole rendering (a template that
    numbers its turns, say): then only rendering prefix by prefix says what the template does."""
    ends_with_answer = plain[-1]["role"] == "assistant"
    turns: list[_Turn] = []
    at, start, last_user, previous = 0, 0, 0, None
    try:
        whole = apply(plain, not ends_with_answer)
        for i, message in enumerate(plain):
            if message["role"] == "user":
                last_user = i
            if message["role"] != "assistant":
                continue
            consumed = apply(plain[start:previous + 1], False) if previous is not None else ""
            prompt_text = apply(plain[start:i], True)
            full_text = apply(plain[start:i + 1], False)
            if not prompt_text.startswith(consumed) or not full_text.startswith(prompt_text):
                return None
            turn = _Turn(prompt_text[len(consumed):], full_text[len(prompt_text):], plain[start:i], prompt_text)
            if not (whole.startswith(turn.prompt, at) and whole.startswith(turn.span, at + len(turn.prompt))):
                return None
            at += len(turn.prompt) + len(turn.span)
            turns.append(turn)
            previous, start = i, last_user
    except TemplateError:
        return None
    if ends_with_answer and at != len(whole):
        return None
    return iter(turns), lambda: whole[at:]


def render_with_chat_template(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[Piece]:
    """Pieces from the tokenizer's Jinja chat template (the tokenizer must have one).

    Each assistant span is what the template adds for that message: the text
    of ``messages[:i+1]`` past the generation prompt of ``messages[:i]``. The
    template must render each prefix of the conversation as a prefix of the
    whole (true of nearly all chat templates); otherwise this raises. From
    :data:`WINDOWED_FROM` answers on, each span is rendered in a window of about two turns
    and checked against one rendering of the whole conversation (:func:`_windowed_turns`).

    Tools go to the template as ``tools=`` (``{"type": "function", "function": ...}`` each),
    calls as OpenAI's ``tool_calls``, results as ``tool`` messages (GLM-4's and Qwen2's
    templates take them so). The tools block is the text that the first prompt span gains
    with ``tools=`` (``tools``, not trained); an assistant message's calls are the text its
    span gains over the same message without calls (``tool_call``, trained, as is the rest of
    the span: its text and end markers); tool results are found in the prompt spans
    (``observation``). A template without ``tools`` in its source raises
    ToolsNotSupportedError for a conversation with tools.
    """
    with_tools = uses_tools(messages, tools)
    if with_tools and "tools" not in _template_source(tokenizer):
        raise ToolsNotSupportedError(
            "template 'tokenizer': the tokenizer's chat template ignores tools (no 'tools' in its "
            "source); templates that render tools: chatglm3, default, or a tokenizer whose chat "
            "template does")
    plain = [_chat_message(m) for m in messages]
    chat_tools = _chat_tools(tools)

    def apply(msgs: list[dict], generation: bool, offered: list[dict] | None = chat_tools) -> str:
        """The chat template's text of ``msgs``; TemplateError when the template fails."""
        extra = {"tools": offered} if offered else {}
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation, **extra)
        except Exception as exc:  # jinja2 syntax/undefined errors, the template's raise_exception()
            detail = " ".join(str(exc).split())
            raise TemplateError(f"the tokenizer's chat template failed: {type(exc).__name__}: {detail}; "
                                "fix the template or choose a named template") from exc
        if not isinstance(text, str):
            raise TemplateError(f"the tokenizer's chat template rendered {type(text).__name__}, "
                                "expected text; choose a named template")
        return text

    ends_with_answer = plain[-1]["role"] == "assistant"
    eos = getattr(tokenizer, "eos_token", None)
    answers = sum(m["role"] == "assistant" for m in plain)
    found = _windowed_turns(apply, plain) if answers >= WINDOWED_FROM else None
    turns, rest = found or _exact_turns(apply, plain)
    pieces: list[Piece] = []
    users = 0
    first_prompt = None  # the messages of the first prompt span and its generation flag
    pending: list[dict] = []
    for i, message in enumerate(plain):
        users += message["role"] == "user"
        if message["role"] != "assistant":
            pending.append(message)
            continue
        turn = max(users - 1, 0)
        rendered = next(turns)
        first_prompt = first_prompt or (plain[:i], True)
        pieces += _locate_messages(rendered.prompt, pending, turn)
        span = rendered.span
        if message.get("tool_calls"):
            pieces += _call_pieces(span, message, apply, rendered.before, rendered.before_text, eos, turn)
        else:
            at = span.find(message["content"])
            if at > 0:
                pieces.append(Piece(span[:at], "answer_end", turn))
            pieces.append(Piece(message["content"], "assistant", turn))
            tail = span[at + len(message["content"]):] if at >= 0 else ""
            if tail:
                pieces.append(Piece(tail, "answer_end", turn))
            if not (eos and eos in tail):
                pieces.append(Piece("", "eos", turn))
        pending = []
    if not ends_with_answer:
        first_prompt = first_prompt or (plain, True)
        pieces += _locate_messages(rest(), pending, max(users - 1, 0))
    if chat_tools:
        msgs, generation = first_prompt
        shown, bare = apply(msgs, generation), apply(msgs, generation, None)
        start = _common_prefix(shown, bare)
        end = len(shown) - min(_common_suffix(shown, bare), len(shown) - start, len(bare) - start)
        if end <= start:
            raise ToolsNotSupportedError(
                "template 'tokenizer': the tokenizer's chat template does not show the tools it is "
                "given; templates that render tools: chatglm3, default")
        pieces = _mark_tools(pieces, start, end)
    return [p for p in pieces if p.text or p.role in ("eos", "specials")]


def _call_pieces(span: str, message: dict, apply, before: list[dict], prompt_text: str,
                 eos: str | None, turn: int) -> list[Piece]:
    """An assistant message with tool calls: its text (``assistant``), the calls (``tool_call``:
    the text the span gains over the same message without calls) and the end (``answer_end``),
    all trained; an EOS piece unless the span has the EOS text after the text."""
    content = message["content"]
    bare_message = {"role": "assistant", "content": content}
    try:
        bare = apply([*before, bare_message], False)
    except TemplateError:
        bare = None
    bare_span = bare[len(prompt_text):] if bare is not None and bare.startswith(prompt_text) else None
    shared = _common_prefix(span, bare_span) if bare_span is not None else 0
    at = span.find(content) if content else 0
    head = at + len(content) if content and 0 <= at and at + len(content) <= shared else 0
    end = len(span)
    if bare_span is not None:
        bare_at = bare_span.find(content) if content else 0
        bare_tail = len(bare_span) - (bare_at + len(content)) if bare_at >= 0 else 0
        end -= min(_common_suffix(span, bare_span), bare_tail, len(span) - head)
    if end <= head:
        raise ToolsNotSupportedError(
            "template 'tokenizer': the tokenizer's chat template does not render the assistant's "
            "tool_calls; templates that render tools: chatglm3, default")
    pieces = []
    if head:
        if at > 0:
            pieces.append(Piece(span[:at], "answer_end", turn))
        pieces.append(Piece(content, "assistant", turn))
    pieces.append(Piece(span[head:end], "tool_call", turn))
    if end < len(span):
        pieces.append(Piece(span[end:], "answer_end", turn))
    if not (eos and eos in span[head:]):
        pieces.append(Piece("", "eos", turn))
    return pieces

