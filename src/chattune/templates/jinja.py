"""A template's Jinja chat template, for an exported model: the writer that spells chattune's
piece-by-piece tokenization in one rendered string, and the derivation from slots.

An exported model folder carries a ``chat_template`` so that any runtime builds the prompt the
model was trained on: ``apply_chat_template(messages, add_generation_prompt=True)`` should give
chattune's prompt ids. The Jinja spells out the tokenizer's special prefix/suffix, its EOS where
the template puts EOS and ChatGLM3's role tokens; for tokenizers that give every text its own
dummy prefix ``▁`` (sentencepiece) it puts the space chattune's separate tokenization gives a
text piece. Which (template, tokenizer) pairs are exact and why the others cannot be:
``docs/templates.md``; ``export/jinja_check.py`` checks a pair and names each difference.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from chattune.templates.slots import ROUND, Slots
from chattune.templates.tokens import special_token_ids, token_id


def jinja_literal(text: str) -> str:
    """``text`` as a Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return "'" + escaped.replace("\t", "\\t") + "'"


AS_EXPORTED = {"split_special_tokens": False}


def exported_ids(tokenizer, text: str) -> list[int]:
    """``text``'s ids as the exported tokenizer gives them (special tokens read from text)."""
    return list(tokenizer(text, add_special_tokens=False, **AS_EXPORTED)["input_ids"])


@contextmanager
def restored(tokenizer):
    """Put back the fast tokenizer's backend flag that a ``split_special_tokens`` argument sets."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        yield
    finally:
        if backend is not None and hasattr(backend, "encode_special_tokens"):
            backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))


@dataclass(frozen=True)
class Style:
    """How a tokenizer's whole-text tokenization differs from chattune's piece-by-piece one."""

    dummy: bool  # every text gets its own dummy prefix (sentencepiece ``▁``)
    trims: bool  # a text's outer spaces are dropped (ChatGLM-6B)
    prefix_after_special: bool  # a text after a special token gets the dummy prefix by itself
    specials: str  # the special prefix/suffix tokens, as text
    eos: str
    tokens: frozenset[str]  # ChatGLM3 role tokens this tokenizer has as tokens


def tokenizer_style(tokenizer) -> Style:
    specials = "".join(tokenizer.convert_ids_to_tokens(special_token_ids(tokenizer)))
    eos = tokenizer.eos_token or ""
    tokens = frozenset(t for t in ("<|system|>", "<|user|>", "<|assistant|>")
                       if token_id(tokenizer, t) is not None)
    with restored(tokenizer):
        a, b = exported_ids(tokenizer, "a"), exported_ids(tokenizer, "b")
        dummy = exported_ids(tokenizer, "a b") == a + b
        trims = dummy and exported_ids(tokenizer, "a ") == a
        after_special = True
        if dummy and eos:
            after_special = exported_ids(tokenizer, "a" + eos + "b")[-len(b):] == b
    return Style(dummy, trims, after_special, specials, eos, tokens)


class Writer:
    """Jinja for text pieces; ``after`` is what precedes a piece: ``"start"`` (the start of
    the text or a special token) or ``"text"`` (a text piece)."""

    def __init__(self, style: Style):
        self.style = style

    def _space(self, after: str) -> bool:
        style = self.style
        return style.dummy and (after == "text" or (after == "start" and not style.prefix_after_special))

    def lit(self, text: str, after: str) -> str:
        """A template text piece."""
        if self.style.trims:
            text = text.strip(" ")
        if not text:
            return ""
        return "{{- " + jinja_literal((" " if self._space(after) else "") + text) + " }}"

    def var(self, expr: str, after: str, nonempty: bool = False) -> str:
        """A message's text (the expression ``expr``, known to be ``nonempty`` or else
        checked: an empty piece has no tokens, so no space either)."""
        if self._space(after):
            if nonempty:
                return "{{- ' ' + " + expr + " }}"
            return "{%- if " + expr + " %}{{- ' ' + " + expr + " }}{%- endif %}"
        return "{{- " + expr + " }}"

    def special(self, text: str) -> str:
        """Special tokens, as their text."""
        return "{{- " + jinja_literal(text) + " }}" if text else ""

    def token(self, text: str, after: str) -> tuple[str, str]:
        """A ``token`` piece (its id where the tokenizer has it, else text) and what follows it."""
        if text in self.style.tokens:
            return self.special(text), "start"
        return self.lit(text, after), "text"



HEAD = """\
{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 %}
{%- set system = messages[0]['content'] if offset else '' %}
{%- set n = (messages | length - offset + 1) // 2 %}
"""
USER_TEXT = ("{%- set q = message['content'] ~ ('\\n' ~ message['input'] if message['input'] is defined "
             "and message['input'] and message['content'] else (message['input'] if message['input'] "
             "is defined and message['input'] else '')) %}")
"""The user's text as chattune joins an Alpaca ``input`` to it (``q``)."""
LOOP = ("{%- for message in messages[offset:] %}\n{%- set i = loop.index0 // 2 %}\n"
        "{%- set gen = not loop.last or add_generation_prompt %}\n")
HAS_INPUT = "message['input'] is defined and message['input']"


def raw(text: str) -> str:
    """Template text inside a joined run (tokenized with its neighbours)."""
    return "{{- " + jinja_literal(text) + " }}" if text else ""


def run_start(w: Writer, text: str) -> str:
    """Template text that starts a joined run (after the specials or EOS)."""
    return "{{- " + jinja_literal((" " if w._space("start") else "") + text) + " }}"


class _Emitter:
    """Jinja for a slots template's text, tracking at render time (``ns.start``) whether the
    text so far ends at the start of a text or a special token, which decides the dummy-prefix
    space (only a dummy-prefix tokenizer needs the tracking)."""

    def __init__(self, w: Writer, joined: bool):
        self.w, self.joined, self.tracked = w, joined, w.style.dummy

    def _either(self, at_start: str, after_text: str) -> str:
        if at_start == after_text:
            return at_start
        return "{%- if ns.start %}" + at_start + "{%- else %}" + after_text + "{%- endif %}"

    def lit(self, text: str) -> str:
        """Literal template text."""
        if not text:
            return ""
        at_start = run_start(self.w, text) if self.joined else self.w.lit(text, "start")
        after_text = raw(text) if self.joined else self.w.lit(text, "text")
        return self._either(at_start, after_text) + ("{%- set ns.start = false %}" if self.tracked else "")

    def var(self, expr: str, nonempty: bool = False) -> str:
        """A message's text (a Jinja expression)."""
        if not self.tracked:
            return "{{- " + expr + " }}"
        after_text = "{{- " + expr + " }}" if self.joined else self.w.var(expr, "text", True)
        out = self._either(self.w.var(expr, "start", True), after_text) + "{%- set ns.start = false %}"
        return out if nonempty else "{%- if " + expr + " %}" + out + "{%- endif %}"

    def special(self, text: str) -> str:
        """Special tokens, as their text."""
        if not text:
            return ""
        return self.w.special(text) + ("{%- set ns.start = true %}" if self.tracked else "")


def _tools_jinja(slots: Slots, e: _Emitter) -> tuple[str, str, str, str]:
    """The tools block, the tool-result branch and the call branch of a slots template."""
    tools = slots.tools
    unwrap = ("{%- for tool in (tools or []) %}"
              "{%- set ns.tools = ns.tools + [tool['function'] if tool['function'] is defined else tool] %}"
              "{%- endfor %}")
    block = "{%- if ns.tools %}" + e.lit(tools.tools_prefix) + e.var("(ns.tools | tojson)", True) \
        + e.lit(tools.tools_suffix) + "{%- endif %}"
    result = ("{%- elif message['role'] == 'tool' %}" + e.lit(tools.result_prefix) + e.var("message['content']")
              + "{%- if (loop.last and add_generation_prompt) or (not loop.last and loop.nextitem['role'] == "
              "'assistant') %}" + e.lit(slots.generation) + "{%- endif %}")
    opening = jinja_literal(tools.call_open + '{"name": ')
    calls = ("{%- set ns.calls = [] %}{%- for call in message['tool_calls'] %}"
             "{%- set f = call['function'] if call['function'] is defined else call %}"
             "{%- set args = f['arguments'] if f['arguments'] is defined else {} %}"
             "{%- set ns.calls = ns.calls + [" + opening + " ~ (f['name'] | tojson) ~ ', \"arguments\": ' ~ "
             "(args if args is string else args | tojson) ~ " + jinja_literal("}" + tools.call_close) + "] %}"
             "{%- endfor %}{%- set calls = (" + jinja_literal(tools.call_separator) + " if message['content'] "
             "else '') ~ (ns.calls | join(" + jinja_literal(tools.call_separator) + ")) %}")
    call = ("{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and "
            "message['tool_calls'] %}" + e.var("(message['content'] or '')") + calls + e.var("calls", True)
            + e.special(e.w.style.eos))
    return unwrap, block, result, call


def _user_jinja(slots: Slots, e: _Emitter) -> str:
    def prefix(text: str) -> str:
        if ROUND not in text:
            return e.lit(text)
        before, after = text.split(ROUND)
        return e.var(jinja_literal(before) + " ~ (i + " + str(slots.round_from) + ") ~ " + jinja_literal(after), True)

    later = slots.user_first if slots.user_later is None else slots.user_later
    out = prefix(slots.user_first) if later == slots.user_first else (
        "{%- if i == 0 %}" + prefix(slots.user_first) + "{%- else %}" + prefix(later) + "{%- endif %}")
    if slots.input_prefix is None:
        out += USER_TEXT + e.var("q") + e.lit(slots.user_suffix)
    else:
        out += (e.var("message['content']") + e.lit(slots.user_suffix) + "{%- if " + HAS_INPUT + " %}"
                + e.lit(slots.input_prefix) + e.var("message['input']") + e.lit(slots.input_suffix) + "{%- endif %}")
    last_specials = ("{%- if i == n - 1 %}" + e.special(e.w.style.specials) + "{%- endif %}"
                     if slots.specials == "last_prompt" else "")
    return out + "{%- if gen %}" + e.lit(slots.generation) + last_specials + "{%- endif %}"


def _answer_jinja(slots: Slots, e: _Emitter) -> str:
    content = "message['content']" if not slots.answer_lead else (
        jinja_literal(slots.answer_lead) + " + message['content']")
    text = e.var(content, bool(slots.answer_lead))
    full = text + e.lit(slots.answer_end) + (e.special(e.w.style.eos) if slots.eos else "")
    if slots.history_suffix:
        full += "{%- if i < n - 1 %}" + e.lit(slots.history_suffix) + "{%- endif %}"
    if slots.history_eos:
        return full
    return "{%- if i < n - 1 %}" + text + e.lit(slots.history_suffix) + "{%- else %}" + text + e.lit(
        slots.answer_end) + (e.special(e.w.style.eos) if slots.eos else "") + "{%- endif %}"


def slots_jinja(slots: Slots, joined: bool, w: Writer) -> str:
    """The Jinja chat template of a slots template for the tokenizer style ``w`` writes for."""
    s, e = w.style, _Emitter(w, joined)
    answer = _answer_jinja(slots, e)
    unwrap, tools_block, result, call = _tools_jinja(slots, e) if slots.tools else ("", "", "", "")
    system = "{%- set system = system if system else " + (
        "(" + jinja_literal(slots.default_system_with_input) + " if messages | length > offset and "
        "messages[offset]['input'] is defined and messages[offset]['input'] else "
        + jinja_literal(slots.default_system) + ")" if slots.default_system_with_input
        else jinja_literal(slots.default_system)) + " %}" if slots.default_system else ""
    return "\n".join([
        "{%- set ns = namespace(start=true, users=0, tools=[], calls=[]) %}",
        "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 %}",
        "{%- set system = messages[0]['content'] if offset else '' %}",
        "{%- set n = messages[offset:] | selectattr('role', 'equalto', 'user') | list | length %}" + unwrap,
        e.special(s.specials) if slots.specials in ("first", "each_turn") else "",
        system + "{%- if system %}" + e.lit(slots.system_prefix) + e.var("system", True)
        + e.lit(slots.system_suffix) + "{%- endif %}" + tools_block,
        "{%- for message in messages[offset:] %}{%- set gen = not loop.last or add_generation_prompt %}",
        "{%- if message['role'] == 'user' %}{%- set ns.users = ns.users + 1 %}{%- endif %}{%- set i = ns.users - 1 %}",
        "{%- if message['role'] == 'user' %}"
        + ("{%- if i > 0 %}" + e.special(s.specials) + "{%- endif %}" if slots.specials == "each_turn" else "")
        + _user_jinja(slots, e) + result + call,
        "{%- elif message['role'] == 'assistant' %}" + answer,
        "{%- endif %}\n{%- endfor %}",
    ])
