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

import json

from chattune.templates.jinja import jinja_literal

MARK = "\ufdd0"
"""A Unicode noncharacter, reserved for a program's own use, so never in interchanged text."""


def _unescape_steps():
    from tokenizers import Regex, normalizers

    return [normalizers.Replace(Regex(f"(?<!{MARK}){MARK}(?!{MARK})"), ""),
            normalizers.Replace(MARK + MARK, MARK)]


def _state(normalizer) -> dict:
    return json.loads(normalizer.__getstate__())


def _backend(tokenizer):
    return getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None


def keeps_special_text(tokenizer) -> bool:
    """Whether ``tokenizer`` never reads special tokens from text (a fast tokenizer with
    ``split_special_tokens``): then its export escapes the messages' special-token text."""
    return bool(getattr(tokenizer, "split_special_tokens", False)) and _backend(tokenizer) is not None


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


ESCAPE_COMMENT = "{#- chattune: special-token text in messages is escaped, its tokenizer's normalizer unescapes it #}"
_ESCAPE_END = "{{- '' }}"


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
        _ESCAPE_END,
    ])


def unescape_normalizer(normalizer):
    """``normalizer`` (or None) preceded by the steps that undo :func:`escape_text`: a lone
    mark goes, a doubled one becomes one."""
    from tokenizers import normalizers

    return normalizers.Sequence([*_unescape_steps(), *([normalizer] if normalizer is not None else [])])


def add_unescape(tokenizer) -> None:
    """Give a fast tokenizer the unescaping normalizer steps and let it read special tokens
    from text (the chat template's own), as an export's tokenizer does."""
    backend = _backend(tokenizer)
    backend.normalizer = unescape_normalizer(backend.normalizer)
    tokenizer.split_special_tokens = False
    tokenizer.init_kwargs["split_special_tokens"] = False


def _split_unescape(normalizer):
    """(True, the normalizer without the unescaping steps) when it starts with them, else (False, None)."""
    if normalizer is None:
        return False, None
    state = _state(normalizer)
    steps = [_state(step) for step in _unescape_steps()]
    inner = state.get("normalizers") if state.get("type") == "Sequence" else None
    if not inner or inner[:len(steps)] != steps:
        return False, None
    from tokenizers import normalizers

    rest = [normalizer[i] for i in range(len(steps), len(inner))]
    if not rest:
        return True, None
    return True, rest[0] if len(rest) == 1 else normalizers.Sequence(rest)


def is_escaping(tokenizer) -> bool:
    """Whether ``tokenizer`` is an export's that unescapes messages (:func:`add_unescape`)."""
    backend = _backend(tokenizer)
    return backend is not None and _split_unescape(backend.normalizer)[0]


def without_escape(template: str) -> str:
    """A chat template without the escaping :func:`escape_jinja` put before it."""
    if not template.startswith(ESCAPE_COMMENT) or _ESCAPE_END not in template:
        return template
    return template[template.index(_ESCAPE_END) + len(_ESCAPE_END):]


def restore_run_tokenizer(tokenizer) -> bool:
    """An export's tokenizer as its run's was: without the unescaping normalizer steps and the
    chat template's escaping, never reading special tokens from text. False (nothing changed)
    for any other tokenizer."""
    backend = _backend(tokenizer)
    if backend is None:
        return False
    found, rest = _split_unescape(backend.normalizer)
    if not found:
        return False
    backend.normalizer = rest
    tokenizer.split_special_tokens = True
    tokenizer.init_kwargs["split_special_tokens"] = True
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        tokenizer.chat_template = without_escape(tokenizer.chat_template)
    return True
