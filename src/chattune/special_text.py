"""Special-token text in messages, as an exported tokenizer escapes it and chattune reads it back.

An export of a run whose tokenizer never reads special tokens from text escapes the special-token
text typed in messages inside its chat template (``chattune.export.escape``); its tokenizer's
normalizer takes the marks out again after special tokens are matched (:func:`add_unescape`).
chattune loading that export undoes both (:func:`restore_run_tokenizer`), so it reads the
export as its run did.
"""

from __future__ import annotations

import json

MARK = "\ufdd0"
"""A Unicode noncharacter, reserved for a program's own use, so never in interchanged text."""

ESCAPE_COMMENT = "{#- chattune: special-token text in messages is escaped, its tokenizer's normalizer unescapes it #}"
ESCAPE_END = "{{- '' }}"


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
    if not template.startswith(ESCAPE_COMMENT) or ESCAPE_END not in template:
        return template
    return template[template.index(ESCAPE_END) + len(ESCAPE_END):]


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
