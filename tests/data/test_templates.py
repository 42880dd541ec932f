"""Golden strings for every named template, checked against the published code:

- alpaca: the tutorial's cover_alpaca2jsonl.py output (shared/seed/tutorial.md, 3.1.3).
- chatglm-tuning: mymusise/ChatGLM-Tuning cover_alpaca2jsonl.py ``format_example``
  (commit 17efef6f): context "Instruction: {instruction}\\n" + "Input: {input}\\n" + "Answer: ".
- chatglm: THUDM/chatglm-6b modeling_chatglm.py ``chat``/``stream_chat`` (mirror
  greensheng/chatglm-6b @0564795e): bare query without history, else
  "[Round {i}]\\n问：{q}\\n答：{a}\\n" from 0; the tokenizer appends [gMASK] sop.
- chatglm2: THUDM/chatglm2-6b tokenization_chatglm.py ``build_prompt`` (mirror
  bq-xiao/chatglm2-6b-model @06510a81): "[Round {i}]\\n\\n问：{q}\\n\\n答：{a}\\n\\n" from 1,
  prefix tokens [gMASK] sop.
- chatglm3: THUDM/chatglm3-6b tokenization_chatglm.py ``build_single_message`` /
  ``build_chat_input``: <|role|> + "{metadata}\\n" + text, the prompt ends with <|assistant|>.
- vicuna: lm-sys/FastChat fastchat/conversation.py ``vicuna_v1.1`` (@2e7855bb),
  ADD_COLON_TWO with sep " " and sep2 "</s>".
"""

from __future__ import annotations

import pytest

from chattune.data.templates import (
    NAMED_TEMPLATES,
    PROBE_CONVERSATION,
    TemplateError,
    render,
    render_text,
    resolve_template_name,
    template_provenance,
)

EOS = "<EOS>"
SP = "<SP>"


def text(name, messages, tokenizer=None):
    return render_text(render(name, messages, tokenizer), eos=EOS, specials=SP)


def alpaca_record(instruction, output, extra=""):
    user = {"role": "user", "content": instruction}
    if extra:
        user["input"] = extra
    return [user, {"role": "assistant", "content": output}]


TWO_TURNS = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
]


def test_alpaca_matches_the_tutorial_text_format():
    messages = alpaca_record("Identify the odd one out.", "Telegram", "Twitter, Instagram, Telegram")
    assert text("alpaca", messages) == (
        SP + "### Instruction:\nIdentify the odd one out.\n\n### Input:\nTwitter, Instagram, Telegram"
        "\n\n### Response:\nTelegram\nEND\n" + EOS
    )


def test_alpaca_leaves_out_the_input_block_when_input_is_empty():
    assert text("alpaca", alpaca_record("Give three tips.", "Eat well.")) == (
        SP + "### Instruction:\nGive three tips.\n\n### Response:\nEat well.\nEND\n" + EOS
    )


def test_chatglm_tuning_format_example():
    assert text("chatglm-tuning", alpaca_record("Do it", "Done", "now")) == (
        "Instruction: Do it\nInput: now\nAnswer: " + SP + "Done" + EOS
    )
    assert text("chatglm-tuning", alpaca_record("Do it", "Done")) == (
        "Instruction: Do it\nAnswer: " + SP + "Done" + EOS
    )


def test_chatglm_bare_query_without_history():
    assert text("chatglm", alpaca_record("你好", "你好！")) == "你好" + SP + "你好！" + EOS


def test_chatglm_rounds_from_zero_with_history():
    assert text("chatglm", TWO_TURNS) == (
        "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：" + SP + "a2" + EOS
    )


def test_chatglm2_rounds_from_one():
    assert text("chatglm2", TWO_TURNS) == (
        SP + "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答：a2" + EOS
    )  # as build_prompt: no EOS inside the history, only after the answer trained last
    assert text("chatglm2", TWO_TURNS[2:3]) == SP + "[Round 1]\n\n问：q2\n\n答："


def test_chatglm3_role_tokens():
    messages = [{"role": "system", "content": "S"}] + TWO_TURNS
    assert text("chatglm3", messages) == (
        SP + "<|system|>\nS<|user|>\nq1<|assistant|>\na1<|user|>\nq2<|assistant|>\na2" + EOS
    )  # as build_chat_input and the finetune demo: EOS ends the conversation, not each answer
    assert text("chatglm3", messages[:4]) == SP + "<|system|>\nS<|user|>\nq1<|assistant|>\na1" + \
        "<|user|>\nq2<|assistant|>"


def test_vicuna_v1_1_matches_fastchat():
    messages = [{"role": "system", "content": "S"}] + TWO_TURNS
    pieces = render("vicuna", messages)
    assert render_text(pieces, eos="</s>") == "S USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
    prompt = render_text(render("vicuna", messages[:4]), eos="</s>")
    assert prompt == "S USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"


def test_vicuna_default_system_message():
    assert text("vicuna", TWO_TURNS[:2]).startswith(
        SP + "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. USER: q1"
    )


def test_default_template():
    messages = [{"role": "system", "content": "S"}] + TWO_TURNS
    assert text("default", messages) == (
        SP + "System: S\nHuman: q1\nAssistant: a1" + EOS + "\nHuman: q2\nAssistant: a2" + EOS
    )


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_generation_prompt_is_the_training_text_before_the_answer(name):
    """No template drift: what the model sees at inference is byte-for-byte the
    training text up to the last answer."""
    full = render(name, PROBE_CONVERSATION)
    prompt = render(name, PROBE_CONVERSATION[:-1])
    last_turn = max(p.turn for p in full if p.role == "assistant")
    last_answer = min(i for i, p in enumerate(full) if p.role == "assistant" and p.turn == last_turn)
    assert prompt == full[:last_answer]


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_only_answers_and_their_end_markers_are_trained(name):
    trained = "".join(p.text for p in render(name, PROBE_CONVERSATION) if p.trained)
    assert "A1" in trained and "A2" in trained
    assert "Q1" not in trained and "Q2" not in trained and "SYSTEM" not in trained


def test_tokenizer_chat_template_pieces(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("glm4"))
    pieces = render("tokenizer", PROBE_CONVERSATION, tokenizer)
    rendered = render_text(pieces, eos=tokenizer.eos_token)
    assert rendered == (
        "[gMASK]<sop><|system|>\nSYSTEM<|user|>\nQ1<|assistant|>\nA1<|endoftext|><|user|>\nQ2\nIN2"
        "<|assistant|>\nA2<|endoftext|>"
    )
    assert [p.text for p in pieces if p.role == "assistant"] == ["A1", "A2"]
    assert [p.text for p in pieces if p.role == "user"] == ["Q1", "Q2\nIN2"]
    prompt = render("tokenizer", PROBE_CONVERSATION[:-1], tokenizer)
    assert prompt == pieces[: len(prompt)]


def test_chatml_chat_template_keeps_its_end_token_and_adds_no_second_eos(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("qwen2"))
    pieces = render("tokenizer", TWO_TURNS[:2], tokenizer)
    assert [p.role for p in pieces if p.trained] == ["assistant", "answer_end"]
    assert [p.text for p in pieces if p.trained] == ["a1", "<|im_end|>\n"]


def test_auto_picks_the_chat_template_or_default(tiny_models, char_tokenizer):
    from transformers import AutoTokenizer

    assert resolve_template_name("auto", AutoTokenizer.from_pretrained(tiny_models("glm4"))) == "tokenizer"
    assert resolve_template_name("auto", char_tokenizer) == "default"
    assert resolve_template_name("vicuna", char_tokenizer) == "vicuna"


def test_unknown_template_is_a_clear_error(char_tokenizer):
    with pytest.raises(TemplateError, match="unknown template 'alpacca'.*alpaca"):
        resolve_template_name("alpacca", char_tokenizer)
    with pytest.raises(TemplateError, match="no chat template"):
        render("tokenizer", TWO_TURNS, char_tokenizer)


def test_provenance_records_the_probe_rendering(char_tokenizer):
    provenance = template_provenance("alpaca", char_tokenizer)
    assert provenance["name"] == "alpaca"
    assert "### Instruction:\nQ2\n\n### Input:\nIN2" in provenance["probe_rendering"]
    assert provenance["stop_strings"] == ["\nEND"]


def glm4_with_template(tiny_models, chat_template):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("glm4"))
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize(
    "chat_template,reason",
    [
        ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
         "supported') }}{% endif %}{{ m['content'] }}{% endfor %}", "TemplateError: System role not supported"),
        ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError: unexpected '}'"),
        ("{{ messages[0]['content'].nope.nope }}", "UndefinedError: 'str object' has no attribute 'nope'"),
    ],
)
def test_a_failing_chat_template_is_a_template_error(tiny_models, chat_template, reason):
    tokenizer = glm4_with_template(tiny_models, chat_template)
    with pytest.raises(TemplateError, match=f"the tokenizer's chat template failed: {reason}.*named template"):
        render("tokenizer", PROBE_CONVERSATION, tokenizer)
    with pytest.raises(TemplateError, match="template 'tokenizer', rendering a probe conversation") as info:
        template_provenance("tokenizer", tokenizer)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_no_chat_template_names_the_tokenizer_and_the_choices(char_tokenizer):
    with pytest.raises(TemplateError) as info:
        template_provenance("tokenizer", char_tokenizer)
    message = str(info.value)
    assert message.startswith("template 'tokenizer': the tokenizer ")
    assert "has no chat template; choose a named template (alpaca, chatglm" in message
    assert "probe" not in message


def test_auto_must_be_resolved_before_rendering(char_tokenizer):
    with pytest.raises(TemplateError, match="template 'auto' is chosen per tokenizer: resolve it"):
        render("auto", TWO_TURNS, char_tokenizer)


def test_chat_template_text_before_the_answer_is_trained_with_it(tiny_models):
    # the "\n" GLM-4's template puts after <|assistant|> is generated by the model: it
    # belongs to the answer piece, not to a separate piece before it
    tokenizer = glm4_with_template(
        tiny_models,
        "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{{ '\\n' }}{% endif %}"
        "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
    )
    pieces = render("tokenizer", TWO_TURNS[:2], tokenizer)
    assert [(p.text, p.role) for p in pieces if p.trained] == [("\na1", "assistant"), ("", "eos")]
