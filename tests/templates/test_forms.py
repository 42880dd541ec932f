"""Every template in its three forms — chattune's pieces, the Jinja chat template, Ollama's
TEMPLATE — rendered against the same conversations (system, history, Alpaca input, tools),
agreeing in text everywhere and in token ids where docs/templates.md says the pair is exact;
and a new template added as one Slots entry gets all three forms from it."""

from __future__ import annotations

import dataclasses

import pytest

from chattune.data.encode import PieceEncoder, encode_prompt
from chattune.templates import registry
from chattune.templates.forms import chat_template, ollama_template
from chattune.templates.pieces import render_text
from chattune.templates.registry import NAMED_TEMPLATES, Template, render
from chattune.templates.slots import Slots
from tests.templates.go_template import GoTemplate
from tests.templates.test_jinja import EXACT_ON_TINY

ARCHS = ("llama", "qwen2", "glm4")
SYSTEM = {"role": "system", "content": "Answer in one line."}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Name a colour."}],
    "system": [SYSTEM, {"role": "user", "content": "Name a colour."}],
    "history": [SYSTEM, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "另一个？"}, {"role": "assistant", "content": "蓝色。"},
                {"role": "user", "content": "And one more?"}],
}
TOOLS = [{"name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
TOOL_CONVERSATION = [
    SYSTEM, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": "{\"sky\": \"clear\"}"},
    {"role": "assistant", "content": "Clear."}, {"role": "user", "content": "And Rome?"},
]


@pytest.fixture(scope="module")
def tokenizers(tiny_models):
    from transformers import AutoTokenizer

    return {arch: AutoTokenizer.from_pretrained(tiny_models(arch)) for arch in ARCHS}


def pieces_text(template: str, tokenizer, messages: list[dict], tools=None, specials: str = "") -> str:
    return render_text(render(template, messages, tokenizer, tools), eos=tokenizer.eos_token, specials=specials)


def jinja_text(template: str, tokenizer, messages: list[dict], tools=None) -> str:
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, chat_template=chat_template(template, tokenizer),
                                         add_generation_prompt=True, tokenize=False, **extra)


def ollama_text(template: str, tokenizer, messages: list[dict]) -> str:
    go, note = ollama_template(template, tokenizer)
    assert note is None
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return GoTemplate(go).render({"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                                 for m in messages]})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("template", sorted(NAMED_TEMPLATES))
def test_three_forms_render_the_same_text(template, arch, tokenizers):
    tokenizer = tokenizers[arch]
    for name, messages in CONVERSATIONS.items():
        text = pieces_text(template, tokenizer, messages)
        assert jinja_text(template, tokenizer, messages) == text, (name, "jinja")
        assert ollama_text(template, tokenizer, messages) == text, (name, "ollama")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("template", EXACT_ON_TINY)
def test_three_forms_agree_token_for_token_where_exact(template, arch, tokenizers):
    """The Jinja's ids (and the Ollama text's, tokenized as a runtime does) are chattune's."""
    tokenizer = tokenizers[arch]
    for name, messages in CONVERSATIONS.items():
        want = encode_prompt(messages, template, PieceEncoder(tokenizer))
        jinja_ids = tokenizer.apply_chat_template(
            messages, chat_template=chat_template(template, tokenizer), add_generation_prompt=True,
            tokenize=True, return_dict=False, tokenizer_kwargs={"split_special_tokens": False})
        assert list(jinja_ids) == want, (name, "jinja")
        ollama_ids = tokenizer(ollama_text(template, tokenizer, messages), add_special_tokens=False,
                               split_special_tokens=False)["input_ids"]
        assert list(ollama_ids) == want, (name, "ollama")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("template", [n for n, t in sorted(NAMED_TEMPLATES.items()) if t.slots and t.slots.tools])
def test_tools_calls_and_results_render_the_same_in_pieces_and_jinja(template, arch, tokenizers):
    """Ollama's TEMPLATE has no tools; the Jinja renders them as the pieces do."""
    tokenizer = tokenizers[arch]
    assert jinja_text(template, tokenizer, TOOL_CONVERSATION, TOOLS) == pieces_text(
        template, tokenizer, TOOL_CONVERSATION, TOOLS)


def test_every_template_is_slots_or_says_why_by_hand():
    for name, template in NAMED_TEMPLATES.items():
        if template.slots is None:
            assert template.render_fn and template.jinja_fn and template.ollama_fn, name
            assert name in (registry.handwritten.__doc__ or ""), f"{name}: handwritten.py must say why"
        else:
            assert template.render_fn is template.jinja_fn is template.ollama_fn is None, name


def test_a_new_template_is_one_entry(monkeypatch, tokenizers):
    """Zephyr's format, added as one Slots entry: pieces, Jinja and Ollama agree, and the
    answers are what training supervises."""
    zephyr = Template("zephyr", "Zephyr: <|user|>\\n{q}</s>\\n<|assistant|>\\n{a}</s>", source="test",
                      slots=Slots(system_prefix="<|system|>\n", system_suffix="</s>\n", user_first="<|user|>\n",
                                  user_suffix="</s>\n", generation="<|assistant|>\n", history_suffix="\n"),
                      stop_strings=("<|user|>",))
    monkeypatch.setitem(NAMED_TEMPLATES, "zephyr", zephyr)
    tokenizer = tokenizers["llama"]
    for name, messages in CONVERSATIONS.items():
        text = pieces_text("zephyr", tokenizer, messages)
        assert jinja_text("zephyr", tokenizer, messages) == text == ollama_text("zephyr", tokenizer, messages), name
    eos = tokenizer.eos_token
    assert pieces_text("zephyr", tokenizer, CONVERSATIONS["history"]) == (
        f"<|system|>\nAnswer in one line.</s>\n<|user|>\nName a colour.</s>\n<|assistant|>\nRed.{eos}\n"
        f"<|user|>\n另一个？</s>\n<|assistant|>\n蓝色。{eos}\n<|user|>\nAnd one more?</s>\n<|assistant|>\n")
    trained = [p.text for p in render("zephyr", [*CONVERSATIONS["system"], {"role": "assistant", "content": "Red."}])
               if p.trained]
    assert trained == ["Red.", ""]  # the answer and its EOS
    assert dataclasses.replace(zephyr, name="z").tools is False
