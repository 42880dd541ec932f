"""``chattune templates``: every prompt template, what it is, where it comes from, and how it
renders a conversation, so that a user can see and pick.

Without a tokenizer the tokenizer's own tokens are shown as placeholders: ``<specials>``
where a tokenizer puts its special prefix or suffix (BOS, ChatGLM's ``[gMASK] sop``) and
``<eos>`` for the end-of-sequence token; with ``--model`` their real text. In a rendered
conversation the spans training supervises are marked ``⟪…⟫``.
"""

from __future__ import annotations

import json
from pathlib import Path

from chattune.errors import ConfigError, DataError
from chattune.templates.pieces import Piece, render_text
from chattune.templates.registry import NAMED_TEMPLATES, PROBE_CONVERSATION, get_template, render

TRAINED_OPEN, TRAINED_CLOSE = "⟪", "⟫"


def describe(name: str) -> str:
    """A named template's one-line description."""
    return NAMED_TEMPLATES[name].description


def _placeholders(tokenizer) -> tuple[str, str]:
    if tokenizer is None:
        return "<eos>", "<specials>"
    from chattune.templates.tokens import special_token_ids

    specials = "".join(tokenizer.convert_ids_to_tokens(special_token_ids(tokenizer)))
    return tokenizer.eos_token or "<eos>", specials


def marked(pieces: list[Piece], tokenizer=None) -> str:
    """The rendered text with every trained span between ``⟪`` and ``⟫``."""
    eos, specials = _placeholders(tokenizer)
    out, open_span = [], False
    for piece in pieces:
        text = eos if piece.role == "eos" else specials if piece.role == "specials" else piece.text
        if piece.trained and not open_span:
            out.append(TRAINED_OPEN)
            open_span = True
        elif not piece.trained and open_span:
            out.append(TRAINED_CLOSE)
            open_span = False
        out.append(text)
    if open_span:
        out.append(TRAINED_CLOSE)
    return "".join(out)


def catalog(tokenizer=None) -> str:
    """Every named template: name, description, source, stops, and its rendering of the probe
    conversation (a system message and two turns), trained spans marked."""
    blocks = []
    eos, specials = _placeholders(tokenizer)
    for name in sorted(NAMED_TEMPLATES):
        template = NAMED_TEMPLATES[name]
        stops = [repr(s) for s in template.stop_strings] + list(template.stop_tokens)
        rendering = marked(render(name, PROBE_CONVERSATION, tokenizer), tokenizer)
        blocks.append("\n".join([
            f"{name}: {describe(name)}",
            f"  source: {template.source or '-'}",
            f"  stops:  {', '.join(stops) if stops else 'EOS only'}",
            "  renders (system + two turns; ⟪trained⟫):",
            *("    " + line for line in rendering.split("\n")),
        ]))
    blocks.append("tokenizer: the tokenizer's own chat template (Jinja), rendered by transformers\n"
                  "auto: a converted ChatGLM folder's template, else tokenizer when the tokenizer has a "
                  f"chat template, else default\n(placeholders: {eos} = end of sequence, "
                  f"{specials or '(none)'} = the tokenizer's special prefix/suffix)")
    return "\n\n".join(blocks)


def read_messages(path: str) -> list[dict]:
    """A conversation from a JSON file: a list of ``{role, content}`` messages, an object with
    ``messages``, or the first row of any data file chattune reads (Alpaca, ShareGPT, ...)."""
    file = Path(path)
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        value = None
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        value = value["messages"]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        from chattune.data.records import validate_messages

        validate_messages(value, str(file), need_answer=False)
        return value
    from chattune.data.formats import read_rows, to_record

    for row in read_rows(file):
        return to_record(row, "auto", need_answer=False, base_dir=Path(file).parent).messages
    raise DataError(f"{file}: no conversation in it; expected a JSON list of {{role, content}} messages "
                    "or a data file with at least one row")


def show(name: str, messages: list[dict], tokenizer=None) -> str:
    """``messages`` rendered with the template ``name``, trained spans marked."""
    if name not in NAMED_TEMPLATES and name != "tokenizer":
        get_template(name)  # raises with the list of names
    if name == "tokenizer" and tokenizer is None:
        raise ConfigError("template 'tokenizer' renders with a tokenizer's chat template: add --model PATH")
    pieces = render(name, messages, tokenizer)
    eos, specials = _placeholders(tokenizer)
    plain = render_text(pieces, eos=eos, specials=specials)
    return f"{marked(pieces, tokenizer)}\n\n({len(plain)} characters; ⟪…⟫ = trained)"
