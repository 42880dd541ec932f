"""A chat template read as one pattern per role (what the export's Jinja fallback and the
Ollama TEMPLATE are written from), on real templates the tiny models' did not show."""

from __future__ import annotations

import copy

import pytest

from chattune.templates.forms import ollama_template
from chattune.templates.pieces import render_text
from chattune.templates.registry import render
from chattune.templates.role_pattern import role_pattern
from tests.templates.go_template import GoTemplate

# SmolLM2-135M-Instruct's (its GGUF's tokenizer.chat_template): a default system turn
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def smollm2_like(tiny_models):
    """The tiny LLaMA's ChatML tokenizer (EOS <|im_end|>) with SmolLM2's chat template."""
    from transformers import AutoTokenizer

    tokenizer = copy.deepcopy(AutoTokenizer.from_pretrained(tiny_models("llama")))
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"
    return tokenizer


def test_a_default_system_turn_leaves_the_eos_with_the_answer(smollm2_like):
    pattern = role_pattern(smollm2_like, "<|im_end|>")
    assert pattern.answer_suffix == "<|im_end|>" and pattern.user_prefix == "\n<|im_start|>user\n"
    assert pattern.without_system.endswith("trained by Hugging Face<|im_end|>")


def test_its_jinja_and_ollama_forms_render_the_chat_template(smollm2_like):
    pattern = role_pattern(smollm2_like, "<|im_end|>")
    go, note = ollama_template("tokenizer", smollm2_like, add_bos=False)
    assert note is None
    for messages in CONVERSATIONS:
        want = smollm2_like.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert smollm2_like.apply_chat_template(messages, chat_template=pattern.jinja(), add_generation_prompt=True,
                                                tokenize=False) == want
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        shown = GoTemplate(go).render({"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                                     for m in messages]})
        assert shown == want, (shown, want)  # one <|im_end|> after an answer in the history, not two


def test_training_on_the_pattern_s_jinja_ends_each_answer_once(smollm2_like):
    """An export carries the pattern's Jinja: training on the export renders one EOS per answer."""
    exported = copy.deepcopy(smollm2_like)
    exported.chat_template = role_pattern(smollm2_like, "<|im_end|>").jinja()
    messages = [*CONVERSATIONS[2], {"role": "assistant", "content": "Goodbye!"}]
    text = render_text(render("tokenizer", messages, exported), eos="<|im_end|>")
    assert "<|im_end|><|im_end|>" not in text and text.count("Hello!<|im_end|>\n<|im_start|>user") == 1
    assert text.endswith("Goodbye!<|im_end|>")
