"""Checking an exported Jinja chat template against chattune: render conversations both ways
and describe every difference in ids, with its likely cause.

The check passes ``split_special_tokens=False`` to the tokenizer calls that tokenize the
rendered text (as the exported tokenizer reads it) and leaves the tokenizer as it was. Pass the
tokenizer the run trained with (not the exported copy), so that chattune's side is the training
tokenization. Which pairs are exact: ``docs/templates.md``. The Jinja is checked alone: where the
run's tokenizer keeps special-token text as text, the export also escapes the messages
(``export/escape.py``), which this check does not, so it reports such text.
"""

from __future__ import annotations

from chattune.data.encode import PieceEncoder, encode_prompt
from chattune.data.records import split_prompt, user_text
from chattune.templates.forms import chat_template
from chattune.templates.jinja import AS_EXPORTED, Style, restored, tokenizer_style
from chattune.templates.registry import get_template

PROBE_CONVERSATIONS: list[list[dict]] = [
    [{"role": "user", "content": "Give three tips for staying healthy."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What are the three primary colors?"},
     {"role": "assistant", "content": "Red, blue and yellow."},
     {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！有什么可以帮您？"},
     {"role": "user", "content": "Identify the odd one out.", "input": "Twitter, Instagram, Telegram"}],
]
"""Conversations :func:`check_chat_template` always checks besides the caller's."""


def _plain(messages: list[dict]) -> list[dict]:
    """Messages as a chat template gets them from a client: the user's text includes the input."""
    return [{"role": m["role"], "content": user_text(m) if m["role"] == "user" else m["content"]}
            for m in messages]


def _special_text(tokenizer, messages: list[dict]) -> list[str]:
    """Special tokens whose text occurs in the messages' text."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials |= {str(token) for token in decoder.values()}
    text = "\n".join(user_text(m) if m["role"] == "user" else m["content"] for m in messages)
    return sorted(t for t in specials if t and t in text)


def _describe(label: str, tokenizer, want: list[int], got: list[int], rendered: str, style: Style | None,
              messages: list[dict]) -> str:
    """What differs (the first differing token and its neighbours) and the likely cause."""
    at = next((k for k, (x, y) in enumerate(zip(want, got, strict=False)) if x != y), min(len(want), len(got)))
    lo = max(0, at - 2)

    def tokens(ids: list[int]) -> list[str]:
        return tokenizer.convert_ids_to_tokens(ids[lo:at + 4])

    found = _special_text(tokenizer, messages)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    near = set(want[at:at + 1] + got[at:at + 1])
    if found and getattr(tokenizer, "split_special_tokens", False):
        why = (f"the message text contains {', '.join(found)}, which chattune's tokenizer reads as text and the "
               "exported one (split_special_tokens=False) as special tokens")
    elif style is None and tokenizer.eos_token_id in want[at:at + 1]:
        why = ("chattune ends each history answer with EOS (it trains the model to stop there), the tokenizer's "
               "chat template does not put the EOS token after an answer")
    elif style is None:
        why = ("chattune tokenizes the template's text and the messages apart, the whole rendered text merges "
               "across a boundary between them")
    elif near & special_ids or at == 0:
        why = ("the tokenizer does not give the special-token text the Jinja spells out, or the text next to it, "
               "the ids chattune has there (e.g. ChatGLM-6B puts '▁' before '[gMASK]' at the start of a text and "
               "drops the whitespace next to '<sop>'/'<eop>')")
    elif style.dummy:
        why = ("a merge across a piece boundary: a piece that ends with a space gives '▁▁' with the next "
               "piece's dummy prefix, where chattune has '▁' '▁...'")
    else:
        why = ("whole-text tokenization merges across a piece boundary that chattune tokenizes apart "
               "(e.g. a piece that ends with a space before a word)")
    short = rendered if len(rendered) <= 300 else rendered[:300] + "..."
    return (f"{label}: the chat template gives other ids than chattune from token {at} on "
            f"({len(got)} vs {len(want)} tokens): chat template {tokens(got)} vs chattune {tokens(want)}; "
            f"likely cause: {why}; rendered: {short!r}")


def special_text_conversations(*tokenizers) -> list[list[dict]]:
    """Conversations whose messages spell out every special and added token of ``tokenizers``
    (a user, a system message and a history answer typing them); none when they have none."""
    specials = set()
    for tokenizer in tokenizers:
        specials |= {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
        specials |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()}
    if not specials:
        return []
    typed = " ".join(sorted(specials))
    return [[{"role": "user", "content": "People type special-token text: " + typed}],
            [{"role": "system", "content": "System text " + typed},
             {"role": "user", "content": typed + " and more"},
             {"role": "assistant", "content": "An answer " + typed},
             {"role": "user", "content": "Again: " + typed}]]


def _probes(tokenizer) -> list[tuple[str, list[dict]]]:
    """The built-in probe conversations, one of them made of the tokenizer's special-token text."""
    cases = [(f"probe conversation {i}", messages) for i, messages in enumerate(PROBE_CONVERSATIONS)]
    typed = special_text_conversations(tokenizer)
    if typed:
        cases.append(("probe conversation with special-token text", typed[0]))
    return cases


def check_chat_template(template: str, tokenizer, conversations: list[list[dict]], *,
                        probes: bool = True) -> list[str]:
    """Render each conversation with the Jinja of :func:`chat_template` and with chattune;
    one description per conversation whose ids differ (empty: all equal). With ``probes``
    :data:`PROBE_CONVERSATIONS` and a message made of the tokenizer's special-token text are
    checked too, so that a (template, tokenizer) pair that cannot be exact is always reported.

    chattune's ids: ``encode_prompt(messages, template, PieceEncoder(tokenizer))`` with the
    tokenizer as given: pass the one the run trained with, not the exported copy. The chat
    template's ids: ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``
    tokenized as the exported tokenizer does, with ``split_special_tokens=False`` (passed to
    the tokenizer call; the tokenizer itself is left as it was). A conversation that ends
    with an answer is checked without it. Named templates get the messages as chattune has
    them (an Alpaca ``input`` included); ``tokenizer`` gets them as a client sends them (the
    input inside the user's text), as chattune renders that template.
    """
    jinja = chat_template(template, tokenizer)
    if not jinja:
        name = getattr(tokenizer, "name_or_path", "") or "(unnamed)"
        return [f"template {template!r}: the tokenizer {name} has no chat template"]
    named = get_template(template)
    style = tokenizer_style(tokenizer) if named is not None else None
    encoder = PieceEncoder(tokenizer)
    cases = [(f"conversation {i}", messages) for i, messages in enumerate(conversations)]
    cases += _probes(tokenizer) if probes else []
    problems = []
    for label, messages in cases:
        messages, _ = split_prompt(messages)
        if not messages or messages[-1]["role"] != "user":
            problems.append(f"{label}: expected a conversation that ends with a user message")
            continue
        want = encode_prompt(messages, template, encoder)
        given = messages if named is not None else _plain(messages)
        try:
            with restored(tokenizer):
                rendered = tokenizer.apply_chat_template(given, chat_template=jinja, add_generation_prompt=True,
                                                         tokenize=False)
                got = tokenizer.apply_chat_template(given, chat_template=jinja, add_generation_prompt=True,
                                                    tokenize=True, return_dict=False, tokenizer_kwargs=AS_EXPORTED)
        except Exception as exc:  # jinja2 errors, the template's raise_exception()
            problems.append(f"{label}: the chat template failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
            continue
        if hasattr(got, "tolist"):
            got = got.tolist()
        got = list(got)
        if got != want:
            problems.append(_describe(label, tokenizer, want, got, rendered, style, messages))
    return problems


