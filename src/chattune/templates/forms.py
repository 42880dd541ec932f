"""A named template in the two other forms an exported model carries: its Jinja chat template
and its Ollama TEMPLATE, derived from its slots or written by hand (``templates/handwritten.py``),
and the stop strings a runtime needs."""

from __future__ import annotations

import re

from chattune.templates.jinja import Writer, slots_jinja, tokenizer_style
from chattune.templates.ollama import (
    CONTENT,
    ELSE,
    END,
    IF_SYSTEM,
    SYSTEM,
    go_literal,
    messages,
    slots_go,
)
from chattune.templates.registry import get_template
from chattune.templates.role_pattern import RolePattern, role_pattern
from chattune.templates.tokens import special_token_ids


def chat_template(template: str, tokenizer) -> str | None:
    """The Jinja chat template that renders the named chattune ``template`` for ``tokenizer``
    (resolved, not ``auto``; TemplateError for an unknown name); for ``tokenizer`` the
    tokenizer's own chat template (None when it has none).

    Messages have roles system (first only), user and assistant (and, for a template that
    renders tools, ``tools=``, calls and tool results); a user message may carry an Alpaca
    ``input`` (rendered as chattune renders it). ``add_generation_prompt`` adds the text
    before the answer. A conversation that ends with an answer renders as chattune's training
    text (with EOS where the template trains one).
    """
    named = get_template(template)
    if named is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        return own or None
    style = tokenizer_style(tokenizer)
    writer = Writer(style)
    if named.slots is not None:
        return slots_jinja(named.slots, named.joined, writer)
    return named.jinja_fn(writer, style)


GENERIC_TEMPLATE_NOTE = (
    "the tokenizer's chat template could not be translated to Ollama's template syntax "
    "(it does not render each message as prefix + text + suffix); this TEMPLATE is chattune's "
    "generic 'default' format (System: / Human: / Assistant:), which the model was not trained "
    "on: write the model's own format here before 'ollama create'")


def _specials_text(tokenizer, add_bos: bool | None) -> str:
    """The text of the special tokens the tokenizer adds to every encoded text (chattune's
    ``specials`` piece: LLaMA's ``<s>``, ChatGLM's ``[gMASK]sop``), less the BOS token when
    the GGUF runtime adds that itself (``add_bos``; None: a SentencePiece BOS is added)."""
    ids = special_token_ids(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if ids and bos is not None and ids[0] == bos and add_bos is not False:
        ids = ids[1:]
    return "".join(tokenizer.convert_ids_to_tokens(ids))


def _named_go(name: str, eos: str, specials: str, turn_specials: str) -> str:
    named = get_template(name)
    if named.slots is not None:
        return slots_go(named.slots, eos, specials, turn_specials)
    return named.ollama_fn(eos, specials, turn_specials)


def _pattern_go(pattern: RolePattern) -> str:
    """A role pattern in Ollama's Go-template syntax."""
    without = ELSE + go_literal(pattern.without_system) if pattern.without_system else ""
    return (go_literal(pattern.common) + IF_SYSTEM + go_literal(pattern.with_system) + SYSTEM
            + go_literal(pattern.system_suffix) + without + END
            + messages(go_literal(pattern.user_prefix) + CONTENT + go_literal(pattern.generation),
                       CONTENT + go_literal(pattern.answer_suffix)))


def ollama_template(template: str, tokenizer, *, add_bos: bool | None = None) -> tuple[str, str | None]:
    """Ollama's TEMPLATE (Go template syntax) for chattune's ``template`` and ``tokenizer``:
    for a conversation ending with a user message it renders the text chattune's template
    renders (special tokens by their text, which Ollama parses back into the tokens), up to
    where the answer starts. ``add_bos``: whether the GGUF runtime adds the BOS token itself
    (its ``tokenizer.ggml.add_bos_token``; None: unknown, taken as yes), which the template
    then leaves out (also where the chat template writes it, as Llama 3's does).

    Returns ``(template, note)``: ``note`` is None, or why the template is only the generic
    fallback (:data:`GENERIC_TEMPLATE_NOTE`: a tokenizer chat template that is not a
    prefix/text/suffix pattern per message)."""
    eos = tokenizer.eos_token or ""
    specials = _specials_text(tokenizer, add_bos)
    if template != "tokenizer":
        get_template(template)
        return _named_go(template, eos, specials, _specials_text(tokenizer, False)), None
    runtime_bos = (tokenizer.bos_token or "") if add_bos is not False else ""
    pattern = role_pattern(tokenizer, eos, runtime_bos)
    if pattern is None:
        return _named_go("default", eos, specials, specials), GENERIC_TEMPLATE_NOTE
    return _pattern_go(pattern), None


def stop_strings(template: str, tokenizer) -> list[str]:
    """Stop strings for a runtime: the template's stop strings, its stop tokens that the
    tokenizer has (as chattune stops on them; not a bare word such as ChatGLM's ``eop``, which
    as a stop string would cut ``people``), then the EOS token's text."""
    named = get_template(template) if template != "tokenizer" else None
    tokens = []
    for token in named.stop_tokens if named else ():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if (isinstance(token_id, int) and token_id != tokenizer.unk_token_id
                and not re.fullmatch(r"\w+", token)):
            tokens.append(token)
    stops = [*(named.stop_strings if named else ()), *tokens, tokenizer.eos_token or ""]
    return list(dict.fromkeys(s for s in stops if s))
