"""Special-token text typed in an exported model's messages stays text, as in its run.

A run whose tokenizer never reads special tokens from text (``split_special_tokens``:
chattune's ChatGLM2/3 tokenizers, as THUDM's code) encodes a user's ``<|user|>`` or
``[gMASK]`` as text. An exported chat template spells the template's own special tokens out
as text, so the exported tokenizer has to read special tokens from text, and would read the
ones in a message too: a message could forge turns. So the export escapes the messages'
text in its chat template (:func:`escape_jinja`, before the template proper): a mark after
the first character of every special token's text, which then no longer matches the token,
and a mark typed in the text doubled. The exported tokenizer's normalizer
(:func:`unescape_normalizer`), which runs after special tokens are matched and before the
text is tokenized, takes the marks out again, so a message gets the run's ids; only the
template's own text yields special tokens.

chattune itself reads an export as its run did (:func:`restore_run_tokenizer`, when the
tokenizer is loaded): the normalizer steps and the template's escaping go, and special tokens
are never read from text.
"""

from __future__ import annotations

from chattune.special_text import ESCAPE_COMMENT, ESCAPE_END, MARK
from chattune.templates.jinja import jinja_literal


def special_texts(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens, longest first (escaped in that order); a
    one-character token cannot be escaped and is left out."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {str(token) for token in decoder.values() if getattr(token, "special", False)}
    texts |= {str(token) for token in getattr(tokenizer, "all_special_tokens", []) or []}
    return sorted((t for t in texts if len(t) > 1), key=lambda t: (-len(t), t))


def _passes(text: str) -> int:
    """Replacements of ``text`` that leave none of it: one, or its length when it overlaps
    itself (``aa`` in ``aaa``)."""
    return len(text) if any(text[:k] == text[-k:] for k in range(1, len(text))) else 1


def escape_text(text: str, specials: list[str]) -> str:
    """``text`` as :func:`escape_jinja` writes it: each mark doubled, then a mark after the first
    character of every occurrence of each of ``specials`` (longest first)."""
    text = text.replace(MARK, MARK + MARK)
    for special in specials:
        if len(special) < 2:
            continue
        for _ in range(_passes(special)):
            text = text.replace(special, special[0] + MARK + special[1:])
    return text


def _escape_expression(expr: str, specials: list[str]) -> str:
    out = f"{expr} | replace({jinja_literal(MARK)}, {jinja_literal(MARK + MARK)})"
    for special in specials:
        if len(special) >= 2:
            escaped = jinja_literal(special[0] + MARK + special[1:])
            out += f" | replace({jinja_literal(special)}, {escaped})" * _passes(special)
    return "(" + out + ")"




def escape_jinja(specials: list[str]) -> str:
    """Jinja to put before a chat template: ``messages`` with each message's ``content`` (and
    an Alpaca ``input``) escaped as :func:`escape_text` does, where it is a string. It writes
    nothing, and keeps the template's own leading text as it was."""
    def esc(expr: str) -> str:
        return _escape_expression(expr, specials)

    return "".join([
        ESCAPE_COMMENT,
        "{%- set chattune_escaped = namespace(messages=[]) %}",
        "{%- for chattune_m in messages %}",
        "{%- set chattune_e = dict(chattune_m, content=" + esc("chattune_m['content']")
        + ") if chattune_m['content'] is string else chattune_m %}",
        "{%- set chattune_e = dict(chattune_e, input=" + esc("chattune_m['input']")
        + ") if chattune_m['input'] is string else chattune_e %}",
        "{%- set chattune_escaped.messages = chattune_escaped.messages + [chattune_e] %}",
        "{%- endfor %}",
        "{%- set messages = chattune_escaped.messages %}",
        ESCAPE_END,
    ])











