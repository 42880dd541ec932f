"""A plain template as one declarative description, and the pieces it renders.

:class:`Slots` says where each kind of text goes (LLaMA-Factory's slot lists are the idea):
the special tokens, the system block, the text before and after each user message, the
generation prompt, what an answer carries, what a history answer ends with, and (for a
template that renders tools) the tools block, the call markers and the tool results. From
it chattune derives the pieces for training and inference (:func:`render_slots`), the Jinja
chat template (``templates/jinja.py``) and Ollama's TEMPLATE (``templates/ollama.py``), so a
plain template is written once. Templates whose rules are not slots are hand-written in
``templates/handwritten.py``, each saying why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from chattune.data.records import user_text
from chattune.templates.pieces import Piece, answer_pieces, split_system

ROUND = "{round}"
"""In a user prefix, the turn's number counted from :attr:`Slots.round_from`."""


@dataclass(frozen=True)
class ToolSlots:
    """How a template shows tools, calls and results (chattune's own JSON form for ``default``).

    The tools go after the system block as ``tools_prefix + json + tools_suffix``; an
    assistant's calls after its text (and ``call_separator`` if it has text), each
    ``call_open + {"name", "arguments"} + call_close``, joined by ``call_separator``, then
    EOS; each result as ``result_prefix + result``, and after the last one the generation
    prompt for the answer."""

    tools_prefix: str
    tools_suffix: str
    call_open: str
    call_close: str
    call_separator: str
    result_prefix: str


@dataclass(frozen=True)
class Slots:
    """Where a plain template puts each kind of text (every field is literal text)."""

    specials: str = "first"
    """Where the tokenizer's special tokens go: ``first`` (before everything), ``last_prompt``
    (after the last generation prompt, ChatGLM-Tuning's ``encode()``), ``each_turn`` (before
    each turn, Llama-2's BOS) or ``none``."""
    system_prefix: str = ""
    system_suffix: str = ""
    default_system: str = ""
    """The system text when the conversation has none ("": no system block then)."""
    default_system_with_input: str = ""
    """The system text instead when the first user message has an Alpaca ``input``."""
    user_first: str = ""
    """The text before the first user message."""
    user_later: str | None = None
    """The text before every later user message (None: the same as ``user_first``)."""
    round_from: int = 0
    """The number that :data:`ROUND` in a user prefix stands for at the first turn."""
    user_suffix: str = ""
    input_prefix: str | None = None
    """The text before an Alpaca ``input`` (then ``input_suffix`` after it); None: the input
    is joined to the user's text with a newline."""
    input_suffix: str = ""
    generation: str = ""
    """The generation prompt: the text after a user message (or tool results) where the
    answer starts."""
    answer_lead: str = ""
    """Text the model writes before every answer (trained with it)."""
    answer_end: str = ""
    """Text the model writes after an answer (trained, role ``answer_end``)."""
    eos: bool = True
    """Whether an answer ends with the EOS token."""
    history_eos: bool = True
    """Whether an answer before the last turn ends like the last one (``answer_end``, EOS);
    False: it is followed by ``history_suffix`` only."""
    history_suffix: str = ""
    """Template text after an answer before the last turn."""
    tools: ToolSlots | None = None

    def user_prefix(self, turn: int) -> str:
        """The text before the user message of ``turn`` (from 0)."""
        prefix = self.user_first if turn == 0 or self.user_later is None else self.user_later
        return prefix.replace(ROUND, str(turn + self.round_from))


def call_json(call: dict) -> str:
    """One call as ``{"name": ..., "arguments": {...}}`` (JSON, non-ASCII kept)."""
    return json.dumps({"name": call["name"], "arguments": call.get("arguments", {})}, ensure_ascii=False)


def _system_text(slots: Slots, system: str, rest: list[dict]) -> str:
    if system:
        return system
    if slots.default_system_with_input and rest and rest[0].get("input"):
        return slots.default_system_with_input
    return slots.default_system


def _template(text: str, turn: int = 0) -> list[Piece]:
    return [Piece(text, "template", turn)] if text else []


def _user(slots: Slots, message: dict, turn: int) -> list[Piece]:
    pieces = _template(slots.user_prefix(turn), turn)
    if slots.input_prefix is None:
        pieces.append(Piece(user_text(message), "user", turn))
        return pieces + _template(slots.user_suffix, turn)
    pieces += [Piece(message["content"], "user", turn), *_template(slots.user_suffix, turn)]
    if message.get("input"):
        pieces += [*_template(slots.input_prefix, turn), Piece(message["input"], "user", turn),
                   *_template(slots.input_suffix, turn)]
    return pieces


def _answer(slots: Slots, content: str, turn: int, history: bool) -> list[Piece]:
    text = slots.answer_lead + content
    if history and not slots.history_eos:
        return [Piece(text, "assistant", turn), *_template(slots.history_suffix, turn)]
    pieces = answer_pieces(text, turn, slots.answer_end, slots.eos)
    return pieces + (_template(slots.history_suffix, turn) if history else [])


def _calls(tools: ToolSlots, message: dict, turn: int) -> list[Piece]:
    content = message["content"]
    calls = tools.call_separator.join(f"{tools.call_open}{call_json(call)}{tools.call_close}"
                                      for call in message["tool_calls"])
    pieces = [Piece(content, "assistant", turn)] if content else []
    text = tools.call_separator + calls if content else calls
    return pieces + [Piece(text, "tool_call", turn), Piece("", "eos", turn)]


def render_slots(slots: Slots, messages: list[dict], tools: list[dict] | None = None) -> list[Piece]:
    """The pieces of a conversation (ending with an answer for training, with a user message
    or tool results for inference, which then end with the generation prompt)."""
    system, rest = split_system(messages)
    last_turn = sum(m["role"] == "user" for m in rest) - 1
    pieces = [Piece("", "specials")] if slots.specials in ("first", "each_turn") else []
    system = _system_text(slots, system, rest)
    if system:
        pieces += [*_template(slots.system_prefix), Piece(system, "system"), *_template(slots.system_suffix)]
    if tools and slots.tools:
        pieces += [*_template(slots.tools.tools_prefix), Piece(json.dumps(tools, ensure_ascii=False), "tools"),
                   *_template(slots.tools.tools_suffix)]
    users = 0
    for k, message in enumerate(rest):
        role, turn = message["role"], max(users - 1, 0)
        if role == "user":
            turn, users = users, users + 1
            if slots.specials == "each_turn" and turn:
                pieces.append(Piece("", "specials", turn))
            pieces += [*_user(slots, message, turn), *_template(slots.generation, turn)]
            if slots.specials == "last_prompt" and turn == last_turn:
                pieces.append(Piece("", "specials", turn))
        elif role == "tool" and slots.tools:
            pieces += [*_template(slots.tools.result_prefix, turn), Piece(message["content"], "observation", turn)]
            if k + 1 == len(rest) or rest[k + 1]["role"] == "assistant":
                pieces += _template(slots.generation, turn)
        elif message.get("tool_calls") and slots.tools:
            pieces += _calls(slots.tools, message, turn)
        else:
            pieces += _answer(slots, message["content"], turn, history=turn < last_turn)
    return pieces
