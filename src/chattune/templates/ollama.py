"""A template's Ollama TEMPLATE (Go template syntax), derived from its slots.

Inside ``range .Messages`` the dot is one message (``.Role``, ``.Content``); ``.System`` is the
system prompt (the request's, else the Modelfile's SYSTEM). A user branch ends with the text
before the answer, so that the last user message leaves the prompt where the model starts
answering; every answer in such a prompt is a history answer. Ollama has no Alpaca ``input``:
a client folds it into the content, which renders as chattune renders such a message.
"""

from __future__ import annotations

from chattune.templates.slots import ROUND, Slots

IF_SYSTEM, SYSTEM, CONTENT = "{{ if .System }}", "{{ .System }}", "{{ .Content }}"
ELSE, END = "{{ else }}", "{{ end }}"
COUNTER = '{{ $n := "" }}'
"""``len $n`` counts the user messages as they go by (Go templates have no arithmetic: a
string grows by one character per message, :data:`NEXT_TURN`)."""
NEXT_TURN = '{{ $n = print $n "x" }}'
COUNT_USERS = ('{{ $total := "" }}{{ range .Messages }}{{ if eq .Role "user" }}'
               '{{ $total = print $total "x" }}{{ end }}{{ end }}' + COUNTER)
"""``len $total``: the number of user messages."""
LAST_TURN = "{{ if eq (len $n) (len $total) }}"


def messages(user: str, assistant: str) -> str:
    """Each message: ``user`` for a user's, ``assistant`` for an answer (system ones: nothing)."""
    return ('{{ range .Messages }}{{ if eq .Role "user" }}' + user
            + '{{ else if eq .Role "assistant" }}' + assistant + "{{ end }}{{ end }}")


def go_literal(text: str) -> str:
    """Literal text in a Go template (``{{`` spelled as a string action)."""
    return text.replace("{{", '{{ "{{" }}')


def _prefix(text: str, round_from: int) -> str:
    if ROUND not in text:
        return go_literal(text)
    if round_from != 1:  # $n has grown by this turn already: it counts from 1
        raise ValueError("a slots template's Ollama TEMPLATE counts rounds from 1 only")
    before, after = text.split(ROUND)
    return go_literal(before) + "{{ len $n }}" + go_literal(after)


def slots_go(slots: Slots, eos: str, specials: str, turn_specials: str) -> str:
    """Ollama's TEMPLATE of a slots template. ``specials``: the tokenizer's special tokens as
    text, less what the runtime adds itself (its BOS); ``turn_specials``: the same where a
    template puts them again at a later turn, which the runtime does not add there."""
    sp, e = go_literal(specials), go_literal(eos)
    later = slots.user_first if slots.user_later is None else slots.user_later
    counted = (ROUND in slots.user_first + later or later != slots.user_first
               or slots.specials in ("each_turn", "last_prompt"))
    prefix = _prefix(slots.user_first, slots.round_from) if later == slots.user_first else (
        "{{ if eq (len $n) 1 }}" + _prefix(slots.user_first, slots.round_from) + ELSE
        + _prefix(later, slots.round_from) + END)
    user = (NEXT_TURN if counted else "") + (
        "{{ if eq (len $n) 1 }}" + ELSE + go_literal(turn_specials) + END if slots.specials == "each_turn" and turn_specials
        else "") + prefix + CONTENT + go_literal(slots.user_suffix) + go_literal(slots.generation)
    if slots.specials == "last_prompt" and sp:
        user += LAST_TURN + sp + END
    history = go_literal(slots.answer_end) + (e if slots.eos else "") if slots.history_eos else ""
    answer = go_literal(slots.answer_lead) + CONTENT + history + go_literal(slots.history_suffix)
    if slots.default_system:
        system = (go_literal(slots.system_prefix) + IF_SYSTEM + SYSTEM + ELSE + go_literal(slots.default_system)
                  + END + go_literal(slots.system_suffix))
    else:
        system = IF_SYSTEM + go_literal(slots.system_prefix) + SYSTEM + go_literal(slots.system_suffix) + END
    start = sp if slots.specials in ("first", "each_turn") else ""
    count = (COUNT_USERS if slots.specials == "last_prompt" and sp else COUNTER) if counted else ""
    return start + system + count + messages(user, answer)
