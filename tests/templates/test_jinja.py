"""Exported chat templates against chattune's own prompt ids (see docs/templates.md).

For each named template and tokenizer: ``apply_chat_template(messages,
add_generation_prompt=True, tokenize=True)`` must equal ``encode_prompt(messages, template,
PieceEncoder(tokenizer))`` where docs/templates.md says the pair is exact, and
``check_chat_template`` must report the difference where it says it is not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.data.encode import PieceEncoder, encode_prompt
from chattune.export.jinja_check import PROBE_CONVERSATIONS, check_chat_template
from chattune.templates.forms import chat_template
from chattune.templates.pieces import render_text
from chattune.templates.registry import NAMED_TEMPLATES, render
from chattune.templates.tokens import special_token_ids

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "chatglm"
TINY_ARCHS = ("glm4", "llama", "qwen2")
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Who are you?"}],
    "system": [SYSTEM, {"role": "user", "content": "Give three tips for staying healthy."}],
    "history": [
        SYSTEM,
        {"role": "user", "content": "What are the three primary colors?"},
        {"role": "assistant", "content": "Red, blue and yellow."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮您？"},
        {"role": "user", "content": "中国的首都是哪里？"},
    ],
    "alpaca input": [{"role": "user", "content": "Identify the odd one out.",
                      "input": "Twitter, Instagram, Telegram"}],
    "history with input": [
        {"role": "user", "content": "Translate to French.", "input": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Now to German.", "input": "Good night"},
    ],
}
JOINED_NEW = ("alpaca", "chinese-alpaca", "chinese-alpaca-2", "moss", "gpt4all")
EXACT_ON_TINY = ("tutorial-alpaca", "chatglm", "chatglm2", "chatglm3", *JOINED_NEW)
NOT_EXACT = ("default", "vicuna", "chatglm-tuning")


def ids_both_ways(template: str, tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(chat template ids, chattune ids); the chat template reads special tokens from text."""
    jinja = chat_template(template, tokenizer)
    got = tokenizer.apply_chat_template(messages, chat_template=jinja, add_generation_prompt=True,
                                        tokenize=True, return_dict=False,
                                        tokenizer_kwargs={"split_special_tokens": False})
    want = encode_prompt(messages, template, PieceEncoder(tokenizer))
    return list(got), want


def rendered(template: str, tokenizer, messages: list[dict], generation: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template(template, tokenizer),
                                         add_generation_prompt=generation, tokenize=False)


def chattune_text(template: str, tokenizer, messages: list[dict]) -> str:
    specials = "".join(tokenizer.convert_ids_to_tokens(special_token_ids(tokenizer)))
    return render_text(render(template, messages), eos=tokenizer.eos_token, specials=specials)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    from transformers import AutoTokenizer

    loaded = {}

    def get(arch: str):
        if arch not in loaded:
            loaded[arch] = AutoTokenizer.from_pretrained(tiny_models(arch))
        return loaded[arch]

    return get


def _fixture(family: str, name: str) -> Path:
    path = FIXTURES / family / name
    if not path.is_file():
        pytest.skip(f"ChatGLM fixtures not found at {path} (a clone without ../shared)")
    return path


@pytest.fixture(scope="module")
def glm():
    """ChatGLM2-6B / ChatGLM3-6B fast tokenizers as chattune builds them (split_special_tokens=True)."""
    from chattune.chatglm.glm_tokenizer import build_glm_tokenizer

    built = {}

    def get(family: str):
        if family not in built:
            template = {"chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3"}[family]
            built[family] = build_glm_tokenizer(_fixture(family, "tokenizer.model"), family, template=template,
                                                max_length=8192)
        return built[family]

    return get


@pytest.fixture(scope="module")
def glm6b():
    pytest.importorskip("sentencepiece")
    from chattune.chatglm.glm6b_tokenizer import ChatGLM6BTokenizer

    return ChatGLM6BTokenizer(str(_fixture("chatglm-6b", "ice_text.model")))


# ---- the byte-level tiny models -------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("template", EXACT_ON_TINY)
def test_exact_templates_give_chattunes_ids_on_tiny_models(template, arch, tiny):
    tokenizer = tiny(arch)
    for name, messages in CONVERSATIONS.items():
        got, want = ids_both_ways(template, tokenizer, messages)
        assert got == want, name
    assert check_chat_template(template, tokenizer, list(CONVERSATIONS.values())) == []


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("template", sorted(NAMED_TEMPLATES))
def test_rendered_text_is_chattunes_text_on_byte_level_tokenizers(template, arch, tiny):
    """No dummy prefix, so the Jinja renders chattune's text as it is: prompts, and whole
    conversations (ending with an answer) as chattune renders them for training."""
    tokenizer = tiny(arch)
    for name, messages in CONVERSATIONS.items():
        assert rendered(template, tokenizer, messages) == chattune_text(template, tokenizer, messages), name
        full = messages + [{"role": "assistant", "content": "Sure."}]
        assert rendered(template, tokenizer, full, generation=False) == chattune_text(template, tokenizer, full), name


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("template", NOT_EXACT)
def test_a_space_before_a_message_is_reported_on_tiny_models(template, arch, tiny):
    """``Human: ``/``USER: ``/``Instruction: `` end with a space: one string merges it into the word."""
    tokenizer = tiny(arch)
    problems = check_chat_template(template, tokenizer, [CONVERSATIONS["history"]], probes=False)
    assert len(problems) == 1
    assert problems[0].startswith("conversation 0: the chat template gives other ids than chattune")
    assert "merges across a piece boundary" in problems[0]
    got, want = ids_both_ways(template, tokenizer, CONVERSATIONS["history"])
    assert got != want
    assert tokenizer.decode(got) == tokenizer.decode(want)  # the same text, other tokens


def test_alpaca_input_is_rendered_as_chattune_renders_it(tiny):
    text = rendered("tutorial-alpaca", tiny("glm4"), CONVERSATIONS["alpaca input"])
    assert text == ("### Instruction:\nIdentify the odd one out.\n\n### Input:\nTwitter, Instagram, Telegram"
                    "\n\n### Response:\n")
    # other templates put the input inside the user's text (records.user_text)
    assert rendered("chatglm3", tiny("glm4"), CONVERSATIONS["alpaca input"]) == (
        "<|user|>\nIdentify the odd one out.\nTwitter, Instagram, Telegram<|assistant|>")
    # a client that already folded the input into the content gets the plain user turn
    folded = [{"role": "user", "content": "Identify the odd one out.\nTwitter, Instagram, Telegram"}]
    assert rendered("chatglm3", tiny("glm4"), folded) == rendered("chatglm3", tiny("glm4"),
                                                                  CONVERSATIONS["alpaca input"])


def test_history_answers_end_with_eos_where_the_template_trains_it(tiny):
    tokenizer = tiny("llama")
    history = CONVERSATIONS["history"]
    assert "Red, blue and yellow.<|im_end|>\nHuman: " in rendered("default", tokenizer, history)
    assert "Red, blue and yellow.\nEND\n<|im_end|>### Instruction:" in rendered("tutorial-alpaca", tokenizer, history)
    assert "Red, blue and yellow.<|user|>" in rendered("chatglm3", tokenizer, history)  # EOS ends only the last
    assert rendered("chatglm2", tokenizer, history).endswith("[Round 3]\n\n问：中国的首都是哪里？\n\n答：")
    assert not rendered("chatglm2", tokenizer, history[:2], generation=False).endswith("答：")


def test_stanford_alpaca_jinja_chooses_the_preamble_by_the_first_input(tiny):
    tokenizer = tiny("qwen2")
    assert rendered("alpaca", tokenizer, CONVERSATIONS["alpaca input"]) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nIdentify the odd one "
        "out.\n\n### Input:\nTwitter, Instagram, Telegram\n\n### Response:")
    # a client that folded the input into the content gets prompt_no_input, as chattune renders it
    folded = [{"role": "user", "content": "Identify the odd one out.\nTwitter, Instagram, Telegram"}]
    assert rendered("alpaca", tokenizer, folded) == chattune_text("alpaca", tokenizer, folded)
    assert rendered("alpaca", tokenizer, folded).startswith("Below is an instruction that describes a task. ")
    history = CONVERSATIONS["history with input"]
    assert "### Response:Bonjour<|im_end|>\n\n### Instruction:\nNow to German." in rendered("alpaca", tokenizer, history)


def test_new_templates_history_as_their_code(tiny):
    tokenizer = tiny("llama")  # EOS <|im_end|>, no special prefix
    history = CONVERSATIONS["history"]
    assert "### Response: Red, blue and yellow.\n\n### Instruction:\n你好" in rendered(
        "chinese-alpaca", tokenizer, history)  # no EOS inside the history
    assert "[/INST]Red, blue and yellow.<|im_end|>[INST] 你好 [/INST]" in rendered(
        "chinese-alpaca-2", tokenizer, history)
    assert "<|MOSS|>: Red, blue and yellow.<eom>\n<|Human|>: 你好<eoh>\n<|MOSS|>:" in rendered(
        "moss", tokenizer, history)
    assert "### Assistant:\nRed, blue and yellow.<|im_end|>### Human:\n你好\n### Assistant:\n" in rendered(
        "gpt4all", tokenizer, history)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_template_is_kept_and_exact_for_chatml(arch, tiny):
    tokenizer = tiny(arch)
    assert chat_template("tokenizer", tokenizer) == tokenizer.chat_template
    assert check_chat_template("tokenizer", tokenizer, list(CONVERSATIONS.values())) == []


def test_tokenizer_template_without_eos_after_answers_is_reported(tiny):
    """The tiny GLM-4 template puts no EOS after an answer; chattune trains one there."""
    tokenizer = tiny("glm4")
    assert chat_template("tokenizer", tokenizer) == tokenizer.chat_template
    assert check_chat_template("tokenizer", tokenizer, [CONVERSATIONS["one turn"], CONVERSATIONS["system"]],
                               probes=False) == []
    problems = check_chat_template("tokenizer", tokenizer, [CONVERSATIONS["history"]], probes=False)
    assert len(problems) == 1 and "EOS" in problems[0] and "<|endoftext|>" in problems[0]


def test_a_conversation_ending_with_an_answer_is_checked_without_it(tiny):
    tokenizer = tiny("glm4")
    full = CONVERSATIONS["history"] + [{"role": "assistant", "content": "北京。"}]
    assert check_chat_template("chatglm3", tokenizer, [full], probes=False) == []
    assert check_chat_template("chatglm3", tokenizer, [[SYSTEM]], probes=False) == [
        "conversation 0: expected a conversation that ends with a user message"]


def test_probes_report_a_pair_that_cannot_be_exact_whatever_the_conversations(tiny):
    problems = check_chat_template("vicuna", tiny("qwen2"), [])
    assert len(problems) >= len(PROBE_CONVERSATIONS)
    assert all(p.startswith("probe conversation") for p in problems)


def test_saved_and_reloaded_tokenizer_renders_chattunes_ids(tiny, tmp_path):
    """As the export does: the Jinja saved in the tokenizer folder, loaded back by transformers."""
    from transformers import AutoTokenizer

    tokenizer = tiny("qwen2")
    saved = AutoTokenizer.from_pretrained(tiny("qwen2").name_or_path)
    saved.chat_template = chat_template("tutorial-alpaca", tokenizer)
    saved.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for name, messages in CONVERSATIONS.items():
        got = reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(got) == encode_prompt(messages, "tutorial-alpaca", PieceEncoder(tokenizer)), name


# ---- the real ChatGLM tokenizers ------------------------------------------------------------

@pytest.mark.parametrize("family,template", [("chatglm3-6b", "chatglm3"), ("chatglm2-6b", "chatglm2"),
                                             ("chatglm3-6b", "tutorial-alpaca"), ("chatglm2-6b", "chatglm3"),
                                             ("chatglm3-6b", "chatglm"),
                                             *[(family, name) for family in ("chatglm2-6b", "chatglm3-6b")
                                               for name in JOINED_NEW if name != "moss"]])
def test_exact_on_chatglm2_and_chatglm3(family, template, glm):
    tokenizer = glm(family)
    for name, messages in CONVERSATIONS.items():
        got, want = ids_both_ways(template, tokenizer, messages)
        assert got == want, name
    assert check_chat_template(template, tokenizer, list(CONVERSATIONS.values()), probes=False) == []
    assert tokenizer.split_special_tokens  # the check leaves the tokenizer as it was
    assert tokenizer("people", add_special_tokens=False)["input_ids"] == [705]


@pytest.mark.parametrize("family", ["chatglm2-6b", "chatglm3-6b"])
def test_moss_on_chatglm_is_exact_with_a_system_message_only(family, glm):
    """MOSS's default meta_instruction says "people": the exported tokenizer reads its "eop"."""
    tokenizer = glm(family)
    with_system = [m for m in CONVERSATIONS.values() if m[0]["role"] == "system"]
    assert len(with_system) == 2
    for messages in with_system:
        got, want = ids_both_ways("moss", tokenizer, messages)
        assert got == want
    problems = check_chat_template("moss", tokenizer, [CONVERSATIONS["one turn"]], probes=False)
    assert len(problems) == 1 and "'eop'" in problems[0]


def test_chatglm3_renders_thudms_format_with_the_dummy_prefix_spaces(glm):
    """Each piece had its own sentencepiece dummy prefix (build_single_message): a space
    before every text that does not follow a special token, as THUDM's own chat template."""
    tokenizer = glm("chatglm3-6b")
    assert rendered("chatglm3", tokenizer, CONVERSATIONS["history"][:4]) == (
        "[gMASK]sop<|system|>\n You are a helpful assistant.<|user|>\n What are the three primary colors?"
        "<|assistant|>\n Red, blue and yellow.<|user|>\n 你好<|assistant|>")


def test_chatglm2_renders_build_prompt_text(glm):
    tokenizer = glm("chatglm2-6b")
    for messages in CONVERSATIONS.values():
        assert rendered("chatglm2", tokenizer, messages) == chattune_text("chatglm2", tokenizer, messages)


@pytest.mark.parametrize("template", NOT_EXACT)
def test_a_space_before_a_message_is_reported_on_chatglm3(template, glm):
    problems = check_chat_template(template, glm("chatglm3-6b"), [CONVERSATIONS["system"]], probes=False)
    assert len(problems) == 1 and "'▁▁'" in problems[0]


@pytest.mark.parametrize("template", ["chatglm3", "chatglm2", "tutorial-alpaca"])
def test_special_token_text_in_messages_is_reported_on_chatglm(template, glm):
    """The export reads special tokens from text (split_special_tokens=False): ``eop`` in
    ``people`` becomes a token, which chattune's tokenizer never does."""
    tokenizer = glm("chatglm3-6b")
    messages = [{"role": "user", "content": "What do people say about philosophy?"}]
    problems = check_chat_template(template, tokenizer, [messages], probes=False)
    assert len(problems) == 1
    assert "eop, sop" in problems[0] and "split_special_tokens=False" in problems[0]
    # the built-in probe spells out every special token, so the export always learns of it
    assert any("special-token text" in p for p in check_chat_template(template, tokenizer, []))


def test_chatglm2_and_chatglm3_tokenizers_have_no_own_chat_template(glm):
    tokenizer = glm("chatglm3-6b")
    assert chat_template("tokenizer", tokenizer) is None
    assert check_chat_template("tokenizer", tokenizer, [CONVERSATIONS["one turn"]]) == [
        "template 'tokenizer': the tokenizer (unnamed) has no chat template"]


def test_saved_chatglm3_tokenizer_renders_chattunes_ids(glm, tmp_path):
    """The export's tokenizer: split_special_tokens=False, the chat template saved with it."""
    from transformers import AutoTokenizer

    tokenizer = glm("chatglm3-6b")
    jinja = chat_template("chatglm3", tokenizer)
    saved = AutoTokenizer.from_pretrained(_save_as_exported(tokenizer, jinja, tmp_path))
    assert not saved.split_special_tokens
    for name, messages in CONVERSATIONS.items():
        got = saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(got) == encode_prompt(messages, "chatglm3", PieceEncoder(tokenizer)), name


def _save_as_exported(tokenizer, jinja: str, out: Path) -> Path:
    import copy

    saved = copy.deepcopy(tokenizer)
    saved.chat_template = jinja
    saved.split_special_tokens = False
    saved.init_kwargs["split_special_tokens"] = False
    saved.save_pretrained(out)
    return out


def test_chatglm_template_is_exact_on_chatglm_6b(glm6b):
    for name, messages in CONVERSATIONS.items():
        got, want = ids_both_ways("chatglm", glm6b, messages)
        assert got == want, name
        assert rendered("chatglm", glm6b, messages) == chattune_text("chatglm", glm6b, messages), name
    assert check_chat_template("chatglm", glm6b, list(CONVERSATIONS.values())) == []


def test_chatglm_tuning_on_chatglm_6b_is_exact_without_history_only(glm6b):
    single = [CONVERSATIONS[name] for name in ("one turn", "system", "alpaca input")]
    assert check_chat_template("chatglm-tuning", glm6b, single, probes=False) == []
    problems = check_chat_template("chatglm-tuning", glm6b, [CONVERSATIONS["history"]], probes=False)
    assert len(problems) == 1 and "<eop>" in problems[0]


@pytest.mark.parametrize("template", ["chatglm2", "chatglm3", "tutorial-alpaca", "default", "vicuna", *JOINED_NEW])
def test_specials_first_cannot_be_exact_on_chatglm_6b(template, glm6b):
    """ChatGLM-6B's tokenizer puts '▁' before a '[gMASK]' that starts a text."""
    problems = check_chat_template(template, glm6b, [CONVERSATIONS["one turn"]], probes=False)
    assert len(problems) == 1 and "from token 0 on" in problems[0] and "[gMASK]" in problems[0]


WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
RATES = {"name": "convert_currency", "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}}}
TOOL_CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Weather in Paris and 20 EUR in USD?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "巴黎"}},
        {"name": "convert_currency", "arguments": {"amount": 20, "from": "EUR", "to": "USD"}}]},
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "tool", "content": '{"amount": 21.6}'},
    {"role": "assistant", "content": "21°C; 21.60 USD."},
    {"role": "user", "content": "And London?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "London"}}]},
    {"role": "tool", "content": '{"temperature": 14}'},
]


def as_openai(messages: list[dict]) -> list[dict]:
    """The conversation as an OpenAI client sends it: calls wrapped, arguments a JSON string,
    no content beside a call."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            out.append({"role": "assistant", "content": m["content"] or None, "tool_calls": [
                {"id": f"call_{k}", "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for k, c in enumerate(m["tool_calls"])]})
        else:
            out.append(m)
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_default_chat_template_renders_tools_calls_and_results_as_chattune_does(tiny, arch):
    tokenizer = tiny(arch)
    jinja = chat_template("default", tokenizer)
    tools = [WEATHER, RATES]
    wrapped = [{"type": "function", "function": t} for t in tools]
    want = render_text(render("default", TOOL_CONVERSATION, tools=tools), eos=tokenizer.eos_token,
                       specials="".join(tokenizer.convert_ids_to_tokens(special_token_ids(tokenizer))))
    for messages, offered in ((TOOL_CONVERSATION, tools), (as_openai(TOOL_CONVERSATION), wrapped)):
        got = tokenizer.apply_chat_template(messages, tools=offered, chat_template=jinja,
                                            add_generation_prompt=True, tokenize=False)
        assert got == want
    assert want.endswith('\nTool: {"temperature": 14}\nAssistant: ')
    assert ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "巴黎"}}</tool_call>\n'
            '<tool_call>{"name": "convert_currency", "arguments": {"amount": 20, "from": "EUR", "to": "USD"}}'
            '</tool_call>' + tokenizer.eos_token + '\nTool: {"temperature": 21}\nTool: {"amount": 21.6}\nAssistant: '
            '21°C; 21.60 USD.' + tokenizer.eos_token + "\nHuman: And London?") in want
    assert "Tools: [" + json.dumps(tools, ensure_ascii=False)[1:] + "\nHuman: " in want
    # without tools the template is the one it always was
    plain = CONVERSATIONS["history"]
    assert rendered("default", tokenizer, plain) == chattune_text("default", tokenizer, plain)
    no_system = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(no_system, tools=wrapped, chat_template=jinja, add_generation_prompt=True,
                                         tokenize=False).endswith("Tools: " + json.dumps(tools, ensure_ascii=False)
                                                                  + "\nHuman: Hi\nAssistant: ")
