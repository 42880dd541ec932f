"""The ``tokenizer`` template on long conversations: rendered in windows, piece for piece as
prefix by prefix, in work that grows with the conversation's length."""

from __future__ import annotations

import pytest

from chattune.templates import chat_template
from chattune.templates.registry import render
from tests.templates.tool_cases import (
    PARALLEL,
    QWEN_TOOLS_TEMPLATE,
    TOOLS,
    WEATHER,
    char_tokenizer_with,
)

GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for m in loop_messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ first if loop.first else '' }}{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
"""Gemma's form: the system text inside the first user turn, roles that must alternate."""

NUMBERED = (
    "{% for m in messages %}[Round {{ loop.index }}]<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[Round {{ messages | length + 1 }}]<|assistant|>\n{% endif %}"
)
"""Turns numbered from the start: a window's numbers differ, so it renders prefix by prefix."""


def turns(count: int, system: bool = True) -> list[dict]:
    """A system message (or none) and ``count`` alternating user and assistant messages."""
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(count):
        message = {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}" + " x" * (i % 3)}
        if i % 4 == 2:
            message["input"] = "IN"
        messages.append(message)
    return messages


def tokenizer_for(name: str, tiny_models, char_tokenizer):
    from transformers import AutoTokenizer

    if name in ("glm4", "qwen2"):
        return AutoTokenizer.from_pretrained(tiny_models(name))
    if name == "qwen-tools":
        return char_tokenizer_with(char_tokenizer, chat_template=QWEN_TOOLS_TEMPLATE,
                                   specials=["<|im_start|>", "<|im_end|>"], eos="<|im_end|>")
    return char_tokenizer_with(char_tokenizer, chat_template={"gemma-like": GEMMA_LIKE, "numbered": NUMBERED}[name])


def prefix_by_prefix(monkeypatch, *args) -> list:
    """render(), every answer rendered after the whole conversation before it."""
    with monkeypatch.context() as patched:
        patched.setattr(chat_template, "WINDOWED_FROM", 10 ** 9)
        return render("tokenizer", *args)


@pytest.mark.parametrize("name", ["glm4", "qwen2", "qwen-tools", "gemma-like", "numbered"])
@pytest.mark.parametrize("count", [7, 8, 41])
def test_a_long_conversation_renders_as_prefix_by_prefix(name, count, tiny_models, char_tokenizer, monkeypatch):
    tokenizer = tokenizer_for(name, tiny_models, char_tokenizer)
    for messages in (turns(count), turns(count, system=False)):
        assert render("tokenizer", messages, tokenizer) == prefix_by_prefix(monkeypatch, messages, tokenizer)


@pytest.mark.parametrize("ends_with_answer", [True, False])
def test_long_tool_conversations_render_as_prefix_by_prefix(ends_with_answer, char_tokenizer, monkeypatch):
    tokenizer = tokenizer_for("qwen-tools", None, char_tokenizer)
    messages = [*WEATHER, *WEATHER[1:], *PARALLEL, *WEATHER[1:]]
    messages = messages if ends_with_answer else messages[:-1]
    pieces = render("tokenizer", messages, tokenizer, TOOLS)
    assert pieces == prefix_by_prefix(monkeypatch, messages, tokenizer, TOOLS)
    assert [p.role for p in pieces].count("tool_call") == 4


def rendered_messages(tokenizer, monkeypatch, messages) -> tuple[int, int]:
    """The chat template's renders for ``messages`` and the messages they took, together."""
    calls: list[int] = []
    apply = tokenizer.apply_chat_template

    def counting(conversation, *args, **kwargs):
        calls.append(len(conversation))
        return apply(conversation, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(tokenizer, "apply_chat_template", counting)
        render("tokenizer", messages, tokenizer)
    return len(calls), sum(calls)


@pytest.mark.parametrize("name", ["glm4", "gemma-like"])
def test_the_rendering_work_grows_with_the_conversation_not_its_square(name, tiny_models, char_tokenizer,
                                                                       monkeypatch):
    tokenizer = tokenizer_for(name, tiny_models, char_tokenizer)
    renders, taken = rendered_messages(tokenizer, monkeypatch, turns(1001))
    assert renders <= 3 * 501 and taken <= 12 * 1002  # three short windows per answer, and the whole once
    renders_twice, taken_twice = rendered_messages(tokenizer, monkeypatch, turns(2001))
    assert taken_twice <= 2.1 * taken
    prefix_renders = sum(i + 1 for i in range(1, 2002, 2))  # prefix by prefix: ~n * n / 4 messages
    assert taken_twice * 50 < prefix_renders
