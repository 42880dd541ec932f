"""A rendered conversation: pieces of text with roles, and the errors of rendering.

A piece is a span of text with a role:

- ``template``: the template's own markers (never truncated, never trained);
- ``system`` / ``user``: message text (user text may be shortened to fit);
- ``assistant``: an answer (trained), and ``answer_end``: the template's
  end-of-answer text after it (trained, e.g. ``\\nEND\\n``);
- ``eos``: the tokenizer's EOS token (trained);
- ``tools``: the tools a conversation offers, as the template shows them (never trained);
- ``tool_call``: an assistant's tool call text (trained), and ``call_token``: a special token
  the model writes as part of a call (ChatGLM3's ``<|observation|>``: trained);
- ``observation``: a tool's result (never trained, not even with ``train_on_prompt``);
- ``specials``: the special tokens the tokenizer itself adds to an encoded text (LLaMA's
  ``<s>``; ChatGLM's ``[gMASK]`` ``sop``), placed where that model expects them;
- ``token``: one special token named by its text (ChatGLM3's ``<|user|>``), encoded as that
  token's id where the tokenizer has it, else as text. Such a marker never comes from message
  text: a user who types ``<|user|>`` gets the text.
"""

from __future__ import annotations

from dataclasses import dataclass

from chattune.errors import ChattuneError

TRAINED_ROLES = ("assistant", "answer_end", "eos", "tool_call", "call_token")
CALL_ROLES = ("tool_call", "call_token")
"""The roles of a tool call's pieces (counted apart in the data audit)."""


@dataclass(frozen=True)
class Piece:
    """A span of rendered text and what it is."""

    text: str
    role: str
    turn: int = 0

    @property
    def trained(self) -> bool:
        """Whether this piece is supervised by default."""
        return self.role in TRAINED_ROLES


class TemplateError(ChattuneError, ValueError):
    """A template cannot render a conversation (or does not exist)."""


class ToolsNotSupportedError(TemplateError):
    """A template cannot render a conversation's tools or tool calls: at encoding the row
    is dropped with this message as its reason (the same text for every such row)."""


def uses_tools(messages: list[dict], tools: list[dict] | None = None) -> bool:
    """Whether a conversation has tools, tool calls or tool messages."""
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def split_system(messages: list[dict]) -> tuple[str, list[dict]]:
    """The system text (or "") and the messages after it."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return "", messages


def answer_pieces(answer: str, turn: int, end: str = "", eos: bool = True) -> list[Piece]:
    """An answer, the template's end-of-answer text (if any) and EOS (unless ``eos`` is False),
    all trained."""
    pieces = [Piece(answer, "assistant", turn)]
    if end:
        pieces.append(Piece(end, "answer_end", turn))
    return pieces + ([Piece("", "eos", turn)] if eos else [])


def render_text(pieces: list[Piece], eos: str = "", specials: str = "") -> str:
    """The pieces as one string, with ``eos`` and ``specials`` standing for those tokens."""
    out = []
    for piece in pieces:
        if piece.role == "eos":
            out.append(eos)
        elif piece.role == "specials":
            out.append(specials)
        else:
            out.append(piece.text)
    return "".join(out)
