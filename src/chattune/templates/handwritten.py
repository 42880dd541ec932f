"""The templates whose rules are not slots (see ``templates/slots.py``), each written by hand.

- ``chatglm`` (ChatGLM-6B ``chat()``): the bare query when there is no history, rounds only
  with history (a rule on the conversation's length, not a slot); past answers without EOS.
- ``chatglm3`` (ChatGLM3-6B ``build_chat_input``): role tokens that are single special tokens,
  a newline the model writes before each answer, EOS only at the end of the conversation, and
  its own tool format (a tools system message, calls as Python code, ``<|observation|>``).
- ``chinese-alpaca`` (Chinese-LLaMA-Alpaca): the last prompt ends with ``### Response: `` (the
  space in the prompt) while a history answer carries that space itself.

Their Jinja and Ollama translations are written by hand too, next to the derived ones.
"""

from __future__ import annotations

import json

from chattune.data.records import user_text
from chattune.templates.jinja import HEAD, LOOP, USER_TEXT, Style, Writer, jinja_literal, raw
from chattune.templates.ollama import (
    CONTENT,
    COUNT_USERS,
    ELSE,
    END,
    IF_SYSTEM,
    LAST_TURN,
    NEXT_TURN,
    SYSTEM,
    go_literal,
    messages,
)
from chattune.templates.pieces import Piece, ToolsNotSupportedError, answer_pieces, split_system


def _turns(messages: list[dict]) -> tuple[str, list[tuple[dict, str | None]]]:
    """Split messages into the system text and (user message, answer or None) turns."""
    system, rest = split_system(messages)
    turns = []
    for i in range(0, len(rest), 2):
        user = rest[i]
        answer = rest[i + 1]["content"] if i + 1 < len(rest) else None
        turns.append((user, answer))
    return system, turns


def render_chatglm(messages: list[dict]) -> list[Piece]:
    """ChatGLM-6B ``chat()``: the bare query without history, otherwise
    ``[Round {i}]\\n问：{q}\\n答：{a}\\n`` per past turn (from 0) and
    ``[Round {n}]\\n问：{q}\\n答：``; its tokenizer appends ``[gMASK]`` ``sop``."""
    system, turns = _turns(messages)
    pieces = []
    if system:
        pieces += [Piece(system, "system"), Piece("\n", "template")]
    last = len(turns) - 1
    for i, (user, answer) in enumerate(turns):
        if last == 0:
            pieces.append(Piece(user_text(user), "user", i))
        else:
            pieces += [Piece(f"[Round {i}]\n问：", "template", i), Piece(user_text(user), "user", i),
                       Piece("\n答：", "template", i)]
        if i == last:
            pieces.append(Piece("", "specials", i))
            pieces += answer_pieces(answer, i) if answer is not None else []
        elif answer is not None:
            pieces += [Piece(answer, "assistant", i), Piece("\n", "template", i)]
    return pieces



CHATGLM3_TOOLS_PROMPT = ("Answer the following questions as best as you can. "
                         "You have access to the following tools:\n")
"""ChatGLM3's system text before its tools (finetune_chatmodel_demo ``TOOL_DEFINITION_PREFIX``;
``build_chat_input`` joins the same sentence and the tools with ``\\n``)."""


def chatglm3_call_code(arguments: dict) -> str:
    """ChatGLM3's call text: ``tool_call(k=v, ...)`` in a fenced python block (three backticks
    and ``python``, a newline, the call, a newline, three backticks), each value as its Python
    ``repr`` (what the finetune demo's ``astunparse`` of ``ast.Constant`` values writes)."""
    args = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"```python\ntool_call({args})\n```"


def render_chatglm3(messages: list[dict], tools: list[dict] | None = None) -> list[Piece]:
    """ChatGLM3-6B ``build_chat_input``: per message the role token, ``{metadata}\\n``
    and the text, each tokenized on its own (``build_single_message``), ending with
    ``<|assistant|>``; the answer is ``\\n`` then the text, EOS after the last one
    only (its finetune demo ends the conversation with EOS).

    Tools as its tool format (PROMPT.md, finetune_chatmodel_demo): a first system message
    ``<|system|>\\n`` + CHATGLM3_TOOLS_PROMPT + ``json.dumps(tools, indent=4, ensure_ascii=False)``
    (before the conversation's own system message); a call is ``<|assistant|>{name}\\n`` and
    :func:`chatglm3_call_code`, then ``<|observation|>``, which ends the call (trained with it:
    the demo's shifted loss mask trains it, and generation stops on it);
    the result is ``\\n{result}`` after it (not trained), then ``<|assistant|>`` for the next
    message. Text before a call is its own message, ``\\n{text}`` then ``<|assistant|>`` (trained:
    the model writes it). One call per assistant message (the format has no parallel calls):
    a message with more calls raises ToolsNotSupportedError."""
    system, rest = split_system(messages)
    pieces = [Piece("", "specials")]
    if tools:
        tools_text = CHATGLM3_TOOLS_PROMPT + json.dumps(tools, indent=4, ensure_ascii=False)
        pieces += [Piece("<|system|>", "token"), Piece("\n", "template"), Piece(tools_text, "tools")]
    if system:
        pieces += [Piece("<|system|>", "token"), Piece("\n", "template"), Piece(system, "system")]
    users = 0
    for k, message in enumerate(rest):
        role, turn = message["role"], max(users - 1, 0)
        if role == "user":
            turn, users = users, users + 1
            pieces += [Piece("<|user|>", "token", turn), Piece("\n", "template", turn),
                       Piece(user_text(message), "user", turn), Piece("<|assistant|>", "token", turn)]
        elif role == "tool":
            if not (pieces[-1].role == "call_token" and pieces[-1].text == "<|observation|>"):
                pieces.append(Piece("<|observation|>", "token", turn))
            pieces += [Piece("\n", "template", turn), Piece(message["content"], "observation", turn)]
            if k + 1 == len(rest) or rest[k + 1]["role"] == "assistant":
                pieces.append(Piece("<|assistant|>", "token", turn))
        elif message.get("tool_calls"):
            calls = message["tool_calls"]
            if len(calls) > 1:
                raise ToolsNotSupportedError(
                    "template 'chatglm3' renders one tool call per assistant message (ChatGLM3's format "
                    "has no parallel calls); templates that render several: default, tokenizer")
            if message["content"]:
                pieces += [Piece("\n", "assistant", turn), Piece(message["content"], "assistant", turn),
                           Piece("<|assistant|>", "call_token", turn)]
            pieces += [Piece(f"{calls[0]['name']}\n", "tool_call", turn),
                       Piece(chatglm3_call_code(calls[0].get("arguments") or {}), "tool_call", turn),
                       Piece("<|observation|>", "call_token", turn)]
        else:
            pieces += [Piece("\n", "assistant", turn), Piece(message["content"], "assistant", turn)]
            if k == len(rest) - 1:
                pieces.append(Piece("", "eos", turn))
    return pieces



ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
"""Stanford Alpaca's preamble of ``prompt_no_input`` (also Chinese-Alpaca's system text)."""


def render_chinese_alpaca(messages: list[dict]) -> list[Piece]:
    """Chinese-Alpaca (ymcui/Chinese-LLaMA-Alpaca): ``{system}\\n\\n### Instruction:\\n{q}\\n\\n### Response: {a}``,
    the input joined to the instruction with ``\\n``; one preamble, and a space after ``### Response:``.

    Training (``scripts/training/build_dataset.py``): the prompt is one text with the BOS token,
    the answer ``{output}{eos_token}`` tokenized on its own. History as its OpenAI-API demo
    (``generate_chat_prompt``): ``### Response: {a}\\n\\n`` then the next instruction, no EOS
    inside the history; a system message replaces the preamble. A history answer is trained
    with the space before it (the prompt is tokenized as one text, where that space joins the
    answer's first word, as in the demo's prompt)."""
    system, turns = _turns(messages)
    pieces = [Piece("", "specials"), Piece(system or ALPACA_SYSTEM, "system"), Piece("\n\n", "template")]
    last = len(turns) - 1
    for i, (user, answer) in enumerate(turns):
        pieces += [Piece("### Instruction:\n", "template", i), Piece(user_text(user), "user", i)]
        if i == last:
            pieces.append(Piece("\n\n### Response: ", "template", i))
            pieces += answer_pieces(answer, i) if answer is not None else []
        else:
            pieces += [Piece("\n\n### Response:", "template", i), Piece(" " + answer, "assistant", i),
                       Piece("\n\n", "template", i)]
    return pieces



# ---- their Jinja chat templates (see templates/jinja.py for the writer)

def chatglm_jinja(w: Writer, s: Style) -> str:
    """ChatGLM-6B ``chat()``'s prompt as Jinja (joined: one text run)."""
    return "\n".join([
        HEAD + "{%- if system %}{{- system }}{{- '\\n' }}{%- endif %}",
        LOOP + "{%- if message['role'] == 'user' %}" + USER_TEXT,
        "{%- if n == 1 %}{{- q }}{%- else %}{{- '[Round ' ~ i ~ ']\\n问：' }}{{- q }}"
        "{%- if gen %}{{- '\\n答：' }}{%- endif %}{%- endif %}",
        "{%- if gen and i == n - 1 %}" + w.special(s.specials) + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}",
        "{%- if i == n - 1 %}" + w.special(s.eos) + "{%- else %}{{- '\\n' }}{%- endif %}",
        "{%- endif %}\n{%- endfor %}",
    ])




def chatglm3_jinja(w: Writer, s: Style) -> str:
    """ChatGLM3's prompt as Jinja: role tokens as tokens where the tokenizer has them (no tools)."""
    system_token, after_system_token = w.token("<|system|>", "start")
    user_first, after_user = w.token("<|user|>", "start")
    user_later, _ = w.token("<|user|>", "text")  # after the system text or an answer
    assistant_token, after_assistant = w.token("<|assistant|>", "text")
    user = user_first if user_first == user_later else (
        "{%- if i == 0 and not system %}" + user_first + "{%- else %}" + user_later + "{%- endif %}")
    return "\n".join([
        HEAD + w.special(s.specials),
        "{%- if system %}" + system_token + w.lit("\n", after_system_token) + w.var("system", "text", True)
        + "{%- endif %}",
        LOOP + "{%- if message['role'] == 'user' %}" + USER_TEXT,
        user + w.lit("\n", after_user) + w.var("q", "text"),
        "{%- if gen %}" + assistant_token + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}" + w.lit("\n", after_assistant)
        + w.var("message['content']", "text"),
        "{%- if i == n - 1 %}" + w.special(s.eos) + "{%- endif %}",
        "{%- endif %}\n{%- endfor %}",
    ])




def chinese_alpaca_jinja(w: Writer, s: Style) -> str:
    """Chinese-Alpaca's prompt as Jinja (joined)."""
    return "\n".join([
        HEAD + w.special(s.specials),
        "{%- set system = system if system else " + jinja_literal(ALPACA_SYSTEM) + " %}",
        w.var("system", "start", True) + raw("\n\n"),
        LOOP + "{%- if message['role'] == 'user' %}" + USER_TEXT,
        raw("### Instruction:\n") + "{{- q }}{%- if gen %}" + raw("\n\n### Response: ") + "{%- endif %}",
        "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}",
        "{%- if i == n - 1 %}" + w.special(s.eos) + "{%- else %}" + raw("\n\n") + "{%- endif %}",
        "{%- endif %}\n{%- endfor %}",
    ])




# ---- their Ollama TEMPLATEs (see templates/ollama.py)


def chatglm_go(eos: str, specials: str, turn_specials: str) -> str:
    """ChatGLM-6B ``chat()`` as Ollama's TEMPLATE: one turn, the bare query; more, rounds from 0,
    past answers without EOS; the specials close the last prompt."""
    sp = go_literal(specials)
    last = LAST_TURN + sp + END if sp else ""
    return (COUNT_USERS + IF_SYSTEM + SYSTEM + "\n" + END
            + messages("{{ if eq (len $total) 1 }}" + CONTENT + ELSE + "[Round {{ len $n }}]\n问：" + CONTENT
                       + "\n答：" + END + NEXT_TURN + last, CONTENT + "\n"))


def chatglm3_go(eos: str, specials: str, turn_specials: str) -> str:
    """ChatGLM3 as Ollama's TEMPLATE: the answer's leading newline is the model's (and history's)."""
    return (go_literal(specials) + IF_SYSTEM + "<|system|>\n" + SYSTEM + END
            + messages("<|user|>\n" + CONTENT + "<|assistant|>", "\n" + CONTENT))


def chinese_alpaca_go(eos: str, specials: str, turn_specials: str) -> str:
    """Chinese-Alpaca as Ollama's TEMPLATE: past answers without EOS."""
    return (go_literal(specials) + IF_SYSTEM + SYSTEM + ELSE + go_literal(ALPACA_SYSTEM) + END + "\n\n"
            + messages("### Instruction:\n" + CONTENT + "\n\n### Response: ", CONTENT + "\n\n"))
