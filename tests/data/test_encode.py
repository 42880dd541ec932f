"""Label masks and truncation, counted exactly with a one-character-per-token tokenizer."""

from __future__ import annotations

import random

import pytest

from chattune.data.encode import (
    IGNORE_INDEX,
    EncodeOptions,
    PieceEncoder,
    encode_all,
    encode_conversation,
    encode_prompt,
)
from chattune.templates.pieces import Piece
from chattune.templates.tokens import special_token_ids
from tests.templates.tool_cases import (
    PARALLEL,
    TOOLS,
    TOOLS_JSON,
    WEATHER,
    glm3_tokenizer,
    qwen_tokenizer,
)


def alpaca(instruction, output, extra=""):
    user = {"role": "user", "content": instruction}
    if extra:
        user["input"] = extra
    return [user, {"role": "assistant", "content": output}]


def turns(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in pairs:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


def supervised(encoded):
    return [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]


def decode(tokenizer, ids):
    return tokenizer.decode(ids)


@pytest.fixture
def encoder(char_tokenizer):
    return PieceEncoder(char_tokenizer)


def test_alpaca_labels_exactly_the_answer_end_marker_and_eos(encoder, char_tokenizer):
    encoded = encode_conversation(alpaca("Hi", "Yo"), "tutorial-alpaca", encoder, EncodeOptions(512))
    prompt = "### Instruction:\nHi\n\n### Response:\n"
    assert decode(char_tokenizer, encoded.input_ids) == prompt + "Yo\nEND\n</s>"
    assert encoded.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    # the last prompt token is not supervised; the first answer token is
    assert encoded.labels[len(prompt) - 1] == IGNORE_INDEX
    assert encoded.labels[len(prompt)] == encoded.input_ids[len(prompt)]
    assert len(supervised(encoded)) == len("Yo\nEND\n") + 1
    assert supervised(encoded)[-1] == char_tokenizer.eos_token_id


def test_every_assistant_turn_is_trained_by_default(encoder, char_tokenizer):
    encoded = encode_conversation(turns(("q1", "a1"), ("q2", "a22")), "default", encoder, EncodeOptions(512))
    assert decode(char_tokenizer, supervised(encoded)) == "a1</s>a22</s>"


def test_train_last_turn_only(encoder, char_tokenizer):
    options = EncodeOptions(512, train_last_turn_only=True)
    encoded = encode_conversation(turns(("q1", "a1"), ("q2", "a22")), "default", encoder, options)
    assert decode(char_tokenizer, supervised(encoded)) == "a22</s>"


def test_train_on_prompt_supervises_everything(encoder):
    encoded = encode_conversation(alpaca("Hi", "Yo"), "tutorial-alpaca", encoder, EncodeOptions(512, train_on_prompt=True))
    assert encoded.labels == encoded.input_ids


def test_system_and_user_text_are_never_supervised(encoder, char_tokenizer):
    messages = turns(("QUESTION", "ok"), system="SYSTEMTEXT")
    encoded = encode_conversation(messages, "default", encoder, EncodeOptions(512))
    trained = decode(char_tokenizer, supervised(encoded))
    assert trained == "ok</s>"


def test_oldest_turns_are_dropped_first(encoder, char_tokenizer):
    messages = turns(("first question", "first answer"), ("second", "2nd"), ("third", "3rd"), system="SYS")
    full = encode_conversation(messages, "default", encoder, EncodeOptions(512))
    limit = len(full.input_ids) - 5
    encoded = encode_conversation(messages, "default", encoder, EncodeOptions(limit))
    text = decode(char_tokenizer, encoded.input_ids)
    assert len(encoded.input_ids) <= limit
    assert encoded.turns_dropped == 1 and encoded.truncated
    assert "first" not in text and text.startswith("System: SYS\nHuman: second")
    assert decode(char_tokenizer, supervised(encoded)) == "2nd</s>3rd</s>"


def test_user_text_is_shortened_before_the_answer_and_markers_stay(encoder, char_tokenizer):
    messages = alpaca("Summarise this", "Short.", "x" * 200)
    encoded = encode_conversation(messages, "tutorial-alpaca", encoder, EncodeOptions(80))
    text = decode(char_tokenizer, encoded.input_ids)
    assert len(encoded.input_ids) == 80
    assert "### Instruction:\n" in text and "\n\n### Input:\n" in text and "\n\n### Response:\n" in text
    assert text.endswith("Short.\nEND\n</s>")
    assert decode(char_tokenizer, supervised(encoded)) == "Short.\nEND\n</s>"


def test_answer_is_cut_from_the_right_when_the_prompt_cannot_shrink(encoder, char_tokenizer):
    messages = alpaca("Q", "A" * 100)
    encoded = encode_conversation(messages, "tutorial-alpaca", encoder, EncodeOptions(60))
    assert len(encoded.input_ids) == 60
    text = decode(char_tokenizer, encoded.input_ids)
    assert text.startswith("### Instruction:\nQ\n\n### Response:\nAAAA")
    assert not text.endswith("</s>")


def test_a_truncated_row_counts_the_characters_cut(encoder, char_tokenizer):
    """``chars_cut``: the rendered row's characters that are not in it, whichever cut took them."""
    user_cut = encode_conversation(alpaca("Summarise this", "Short.", "x" * 200), "tutorial-alpaca", encoder,
                                   EncodeOptions(80))
    assert user_cut.chars_cut == 200 - decode(char_tokenizer, user_cut.input_ids).count("x")
    answer_cut = encode_conversation(alpaca("Q", "A" * 100), "tutorial-alpaca", encoder, EncodeOptions(60))
    kept = decode(char_tokenizer, answer_cut.input_ids).count("A")
    assert answer_cut.chars_cut == 100 - kept + len("\nEND\n")  # and the end marker after the answer
    old_turn = encode_conversation(turns(("q1" * 30, "a1"), ("q2", "a2")), "default", encoder, EncodeOptions(40))
    assert old_turn.turns_dropped == 1 and decode(char_tokenizer, old_turn.input_ids) == "Human: q2\nAssistant: a2</s>"
    rendered = "Human: " + "q1" * 30 + "\nAssistant: a1\nHuman: q2\nAssistant: a2"
    assert old_turn.chars_cut == len(rendered) - len("Human: q2\nAssistant: a2")
    whole = encode_conversation(alpaca("Q", "A"), "tutorial-alpaca", encoder, EncodeOptions(60))
    assert not whole.truncated and whole.chars_cut == 0


LONG_TEXT_WORDS = ["river", "city", "the", "capital", "你好", "北京", "assistant", "123", "\n", "aaaa"]


@pytest.mark.parametrize("template", ["default", "tokenizer", "tutorial-alpaca", "chatglm2", "chatglm3"])
def test_a_text_far_longer_than_a_row_is_tokenized_by_its_start_only(tiny_models, template):
    """An encoder with ``head_tokens`` (data preparation's) hands the tokenizer a few KB of a
    300 KB text, and every row comes out as the whole text gives it: a user text cut, an answer
    cut, a system text filling the row, an old turn dropped, a text without spaces."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("glm4"))
    rng = random.Random(0)
    big = " ".join(rng.choice(LONG_TEXT_WORDS) for _ in range(60000))
    conversations = [alpaca(big, "ok fine"), alpaca("hi", big), turns(("hi", "ok"), system=big),
                     turns((big, big), ("q", "a")), alpaca("北京" * 40000, "ok")]
    for limit in (64, 300):
        whole, head = PieceEncoder(tokenizer), PieceEncoder(tokenizer, head_tokens=limit)
        expected = [encode_conversation(messages, template, whole, EncodeOptions(limit)) for messages in conversations]
        assert encode_all(conversations, template, head, EncodeOptions(limit)) == expected
        assert all(row.truncated for row in expected)
        assert sum(row.chars_cut > len(big) - 10 * limit for row in expected) >= 2  # not all dropped: rows cut
        assert len(head.head(big)) < len(big) // 10 and len(head.cache[big]) < len(whole.cache[big]) // 10
        assert len(head.cache[big]) > 2 * limit  # its first `limit` tokens and more


def test_a_text_within_reach_of_a_row_is_tokenized_whole(char_tokenizer):
    """No head cut below HEAD_FACTOR characters per kept token, nor without head_tokens."""
    from chattune.data.encode import HEAD_FACTOR

    head = PieceEncoder(char_tokenizer, head_tokens=10)
    text = "x" * (HEAD_FACTOR * 10)
    assert head.head(text) is text and PieceEncoder(char_tokenizer).head(text * 100) == text * 100
    longer = text + "x"
    assert head.head(longer) == "x" * (2 * 10 * head.widest_token)
    assert head.head(" " * len(longer)) == " " * len(longer)  # nothing visible: nothing to measure it by


def test_row_whose_answer_would_vanish_is_dropped(encoder):
    messages = alpaca("Q", "answer")
    encoded = encode_conversation(messages, "tutorial-alpaca", encoder, EncodeOptions(30))
    assert encoded.dropped and "no answer token" in encoded.dropped
    assert encoded.input_ids == []


def test_rows_never_exceed_max_length(encoder):
    rng = random.Random(0)
    conversations = []
    for _ in range(200):
        pairs = [("q" * rng.randint(1, 120), "a" * rng.randint(1, 120)) for _ in range(rng.randint(1, 4))]
        conversations.append(turns(*pairs, system="s" * rng.randint(0, 30) or None))
    for limit in (64, 128, 300):
        for encoded in encode_all(conversations, "default", encoder, EncodeOptions(limit)):
            if not encoded.dropped:
                assert len(encoded.input_ids) <= limit
                assert len(encoded.labels) == len(encoded.input_ids)
                assert any(label != IGNORE_INDEX for label in encoded.labels)


def test_prompt_at_inference_equals_training_tokens_before_the_answer(encoder):
    messages = turns(("q1", "a1"), ("q2", "a2"), system="S")
    for template in ("default", "tutorial-alpaca", "chatglm", "chatglm2", "chatglm3", "vicuna", "chatglm-tuning"):
        encoded = encode_conversation(messages, template, encoder, EncodeOptions(512))
        prompt = encode_prompt(messages[:-1], template, encoder)
        assert encoded.input_ids[: len(prompt)] == prompt, template
        assert encoded.labels[len(prompt) - 1] == IGNORE_INDEX
        assert encoded.labels[len(prompt)] != IGNORE_INDEX


def test_tokenizer_specials_are_placed_where_the_model_expects_them(char_tokenizer):
    from tokenizers import processors

    tokenizer = char_tokenizer.__class__(tokenizer_object=char_tokenizer.backend_tokenizer.__class__.from_str(
        char_tokenizer.backend_tokenizer.to_str()), eos_token="</s>", bos_token="<s>", pad_token="</s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    assert special_token_ids(tokenizer) == [1]
    encoder = PieceEncoder(tokenizer)
    bos_first = encode_conversation(alpaca("Hi", "Yo"), "tutorial-alpaca", encoder, EncodeOptions(512))
    assert bos_first.input_ids[0] == 1 and bos_first.input_ids.count(1) == 1
    glm_style = encode_conversation(alpaca("Hi", "Yo"), "chatglm-tuning", encoder, EncodeOptions(512))
    prompt = "Instruction: Hi\nAnswer: "
    assert glm_style.input_ids[len(prompt)] == 1
    assert glm_style.labels[len(prompt)] == IGNORE_INDEX


def test_chat_template_labels_on_a_real_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("glm4"))
    encoder = PieceEncoder(tokenizer)
    encoded = encode_conversation(turns(("hello", "world")), "tokenizer", encoder, EncodeOptions(512))
    assert tokenizer.decode(encoded.input_ids) == "[gMASK]<sop><|user|>\nhello<|assistant|>\nworld<|endoftext|>"
    assert tokenizer.decode(supervised(encoded)) == "world<|endoftext|>"


def fresh_char_tokenizer(char_tokenizer, **kwargs):
    """A new tokenizer over the same vocabulary, with the given special tokens and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    chat_template = kwargs.pop("chat_template", None)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(char_tokenizer.backend_tokenizer.to_str()), **kwargs
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def test_a_tokenizer_without_eos_is_a_model_load_error(char_tokenizer):
    from chattune.errors import ModelLoadError

    tokenizer = fresh_char_tokenizer(char_tokenizer, bos_token="<s>")
    tokenizer.name_or_path = "/models/no-eos"
    assert tokenizer.eos_token_id is None
    with pytest.raises(ModelLoadError, match="tokenizer /models/no-eos: has no EOS token.*eos_token"):
        PieceEncoder(tokenizer)


def test_a_chat_template_failing_on_one_row_names_that_row(char_tokenizer):
    from chattune.templates.pieces import TemplateError

    tokenizer = fresh_char_tokenizer(
        char_tokenizer, eos_token="</s>",
        chat_template="{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
                      "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}",
    )
    encoder = PieceEncoder(tokenizer)
    conversations = [alpaca("fine", "ok"), alpaca("boom", "ok")]
    with pytest.raises(TemplateError, match=r"^data\.jsonl:2: the tokenizer's chat template failed: "
                                            r"TemplateError: no boom"):
        encode_all(conversations, "tokenizer", encoder, EncodeOptions(64), sources=["data.jsonl:1", "data.jsonl:2"])
    with pytest.raises(TemplateError, match=r"^conversation 1: "):
        encode_all(conversations, "tokenizer", encoder, EncodeOptions(64))
    (encoded,) = encode_all(conversations[:1], "tokenizer", encoder, EncodeOptions(64))
    assert decode(tokenizer, supervised(encoded)) == "ok\n</s>"


def test_a_bounded_encoder_keeps_the_most_recently_used_texts_within_its_bounds(char_tokenizer):
    bounded = PieceEncoder(char_tokenizer, max_entries=3, max_chars=10)
    unbounded = PieceEncoder(char_tokenizer)
    for text in ["abc", "defg", "hij", "abc", "klmno", "x" * 50, "pq"]:
        piece = Piece(text, "user")
        assert bounded.ids(piece) == unbounded.ids(piece)
        assert len(bounded.cache) <= 3 and bounded.chars == sum(map(len, bounded.cache)) <= 10
    assert list(bounded.cache) == ["abc", "klmno", "pq"]  # abc was used again, so defg and hij left first
    assert "x" * 50 not in bounded.cache and "x" * 50 in unbounded.cache
    bounded.warm([f"t{i}" for i in range(20)])
    assert len(bounded.cache) <= 3 and bounded.chars <= 10


# Tool calls (conversations and the Qwen2.5-style chat template in tests/templates/tool_cases.py):
# supervised = the calls + the final answer + the end markers the template trains; nothing
# of the tools block or the tool results.

CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def test_default_tool_labels_are_the_calls_and_the_answer_with_their_eos(encoder, char_tokenizer):
    encoded = encode_conversation(WEATHER, "default", encoder, EncodeOptions(1024), tools=TOOLS)
    call = f"<tool_call>{CALL_JSON}</tool_call>"
    assert decode(char_tokenizer, supervised(encoded)) == call + "</s>" + "It is 21 C." + "</s>"
    assert len(supervised(encoded)) == len(call) + 1 + len("It is 21 C.") + 1 == 91
    assert encoded.supervised_call_tokens == len(call) == 78
    assert encoded.tool_calls == 1
    text = decode(char_tokenizer, encoded.input_ids)
    tools_at = text.index(TOOLS_JSON)
    result_at = text.index('{"temp": 21}')
    assert all(label == IGNORE_INDEX for label in encoded.labels[tools_at:tools_at + len(TOOLS_JSON)])
    assert all(label == IGNORE_INDEX for label in encoded.labels[result_at:result_at + len('{"temp": 21}')])


def test_default_parallel_calls_are_trained_together(encoder, char_tokenizer):
    encoded = encode_conversation(PARALLEL, "default", encoder, EncodeOptions(1024), tools=TOOLS)
    calls = (f"\n<tool_call>{CALL_JSON}</tool_call>\n"
             '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    assert decode(char_tokenizer, supervised(encoded)) == "Checking both." + calls + "</s>Rome.</s>"
    assert encoded.supervised_call_tokens == len(calls) == 157
    assert len(supervised(encoded)) == len("Checking both.") + 157 + 1 + len("Rome.") + 1 == 178
    assert encoded.tool_calls == 2


def test_chatglm3_tool_labels(char_tokenizer):
    tokenizer = glm3_tokenizer(char_tokenizer)
    encoded = encode_conversation(WEATHER, "chatglm3", PieceEncoder(tokenizer), EncodeOptions(1024), tools=TOOLS)
    code = "```python\ntool_call(city='Paris')\n```"
    observation = tokenizer.convert_tokens_to_ids("<|observation|>")
    labels = supervised(encoded)
    # get_weather\n + the code + <|observation|> (one id: the token the model stops the call on),
    # then \n + the answer + EOS; the result after <|observation|> is not trained
    assert len(labels) == len("get_weather\n") + len(code) + 1 + len("\nIt is 21 C.") + 1 == 63
    assert labels[len("get_weather\n") + len(code)] == observation
    assert decode(tokenizer, labels) == "get_weather\n" + code + "<|observation|>\nIt is 21 C.</s>"
    assert encoded.supervised_call_tokens == len("get_weather\n") + len(code) + 1 == 50
    assert encoded.input_ids.count(observation) == 1


def test_tokenizer_template_tool_labels(char_tokenizer):
    tokenizer = qwen_tokenizer(char_tokenizer)
    encoded = encode_conversation(WEATHER, "tokenizer", PieceEncoder(tokenizer), EncodeOptions(2048), tools=TOOLS)
    call = f"<tool_call>\n{CALL_JSON}\n</tool_call>"
    assert decode(tokenizer, supervised(encoded)) == call + "<|im_end|>\nIt is 21 C.<|im_end|>\n"
    # <|im_end|> is one token (the EOS: no second EOS is added)
    assert len(supervised(encoded)) == len(call) + 2 + len("It is 21 C.") + 2 == 95
    assert encoded.supervised_call_tokens == len(call) == 80
    text = decode(tokenizer, encoded.input_ids)
    assert "# Tools" in text and '<tool_response>\n{"temp": 21}' in text


def test_tool_results_are_never_trained_not_even_with_train_on_prompt(encoder, char_tokenizer):
    encoded = encode_conversation(WEATHER, "default", encoder, EncodeOptions(1024, train_on_prompt=True), tools=TOOLS)
    untrained = [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label == IGNORE_INDEX]
    assert decode(char_tokenizer, untrained) == '{"temp": 21}'  # the prompt and the tools block are trained


def test_train_last_turn_only_trains_the_last_turns_calls_and_answer(encoder, char_tokenizer):
    second = [{"role": "user", "content": "And Rome?"},
              {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]},
              {"role": "tool", "content": '{"temp": 25}'},
              {"role": "assistant", "content": "25 C."}]
    messages = WEATHER + second
    encoded = encode_conversation(messages, "default", encoder, EncodeOptions(1024, train_last_turn_only=True),
                                  tools=TOOLS)
    rome = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    assert decode(char_tokenizer, supervised(encoded)) == rome + "</s>25 C.</s>"
    everything = encode_conversation(messages, "default", encoder, EncodeOptions(1024), tools=TOOLS)
    assert decode(char_tokenizer, supervised(everything)) == (
        f"<tool_call>{CALL_JSON}</tool_call></s>It is 21 C.</s>" + rome + "</s>25 C.</s>")
    assert everything.tool_calls == 2


def test_a_row_is_never_cut_inside_a_tool_call(encoder, char_tokenizer):
    """At every max_seq_length a row is either dropped or keeps each call whole: the right
    cut only shortens the final answer."""
    from chattune.data.encode import TOOLS_CUT

    cases = [(WEATHER, f"<tool_call>{CALL_JSON}</tool_call>"),
             (PARALLEL, f"<tool_call>{CALL_JSON}</tool_call>\n<tool_call>"
                        '{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')]
    for messages, calls in cases:
        full = len(encode_conversation(messages, "default", encoder, EncodeOptions(1024), tools=TOOLS).input_ids)
        reasons = set()
        for limit in range(1, full + 1):
            encoded = encode_conversation(messages, "default", encoder, EncodeOptions(limit), tools=TOOLS)
            if encoded.dropped:
                reasons.add(encoded.dropped)
                continue
            assert len(encoded.input_ids) <= limit
            assert calls in decode(char_tokenizer, supervised(encoded))
        assert TOOLS_CUT in reasons
        # the user's text is shortened first (to one character), then the final answer is cut
        shortened = len(messages[-4 if messages is WEATHER else 0]["content"]) - 1
        answer = messages[-1]["content"]
        kept = encode_conversation(messages, "default", encoder, EncodeOptions(full - shortened - 3), tools=TOOLS)
        assert kept.truncated and decode(char_tokenizer, supervised(kept)).endswith(
            calls + "</s>" + answer[:len(answer) - 2])
        cut = encode_conversation(messages, "default", encoder, EncodeOptions(full - shortened - 30), tools=TOOLS)
        assert cut.dropped == TOOLS_CUT


def test_a_conversation_ending_with_a_call_is_dropped_rather_than_cut(encoder, char_tokenizer):
    from chattune.data.encode import TOOLS_CUT

    messages = WEATHER[:3]
    full = encode_conversation(messages, "default", encoder, EncodeOptions(1024), tools=TOOLS)
    assert decode(char_tokenizer, supervised(full)) == f"<tool_call>{CALL_JSON}</tool_call></s>"
    limit = len(full.input_ids) - (len("Weather in Paris?") - 1) - 1  # past shortening the user's text
    assert not encode_conversation(messages, "default", encoder, EncodeOptions(limit + 1), tools=TOOLS).dropped
    cut = encode_conversation(messages, "default", encoder, EncodeOptions(limit), tools=TOOLS)
    assert cut.dropped == TOOLS_CUT


def test_an_old_tool_turn_is_dropped_whole(encoder, char_tokenizer):
    messages = WEATHER + [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]
    full = encode_conversation(messages, "default", encoder, EncodeOptions(1024), tools=TOOLS)
    encoded = encode_conversation(messages, "default", encoder, EncodeOptions(len(full.input_ids) - 1), tools=TOOLS)
    assert encoded.turns_dropped == 1 and encoded.tool_calls == 0 and encoded.supervised_call_tokens == 0
    text = decode(char_tokenizer, encoded.input_ids)
    assert text == "System: Be brief.\nTools: " + TOOLS_JSON + "\nHuman: Thanks\nAssistant: Welcome.</s>"


def test_templates_without_tools_drop_such_rows_with_the_reason(encoder, char_tokenizer):
    conversations = [WEATHER, turns(("q", "a"))]
    vicuna = encode_all(conversations, "vicuna", encoder, EncodeOptions(512), tools=[TOOLS, None])
    assert vicuna[0].dropped == ("template 'vicuna' does not render tools or tool calls; "
                                 "templates that do: chatglm3, default, tokenizer")
    assert not vicuna[1].dropped and decode(char_tokenizer, supervised(vicuna[1])) == " a</s>"
    direct = encode_conversation(WEATHER, "alpaca", encoder, EncodeOptions(512), tools=TOOLS)
    assert direct.dropped.startswith("template 'alpaca' does not render tools")


def test_a_chat_template_without_tools_drops_tool_rows(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("glm4"))
    rows = encode_all([WEATHER, turns(("hello", "world"))], "tokenizer", PieceEncoder(tokenizer),
                      EncodeOptions(512), tools=[TOOLS, None])
    assert "chat template ignores tools" in rows[0].dropped and not rows[1].dropped


@pytest.mark.parametrize("template", ["default", "chatglm3", "tokenizer"])
def test_the_prompt_after_a_tool_result_equals_the_training_tokens(template, char_tokenizer):
    tokenizer = {"default": char_tokenizer, "chatglm3": glm3_tokenizer(char_tokenizer),
                 "tokenizer": qwen_tokenizer(char_tokenizer)}[template]
    encoder = PieceEncoder(tokenizer)
    encoded = encode_conversation(WEATHER, template, encoder, EncodeOptions(2048), tools=TOOLS)
    prompt = encode_prompt(WEATHER[:-1], template, encoder, tools=TOOLS)
    assert encoded.input_ids[: len(prompt)] == prompt
    assert encoded.labels[len(prompt) - 1] == IGNORE_INDEX and encoded.labels[len(prompt)] != IGNORE_INDEX
    assert decode(tokenizer, prompt).endswith(
        {"default": "\nAssistant: ", "chatglm3": "<|assistant|>", "tokenizer": "<|im_start|>assistant\n"}[template])


def test_the_audit_counts_tool_rows_calls_and_call_tokens(encoder):
    from types import SimpleNamespace

    from chattune.data.prepare import _encode_split, format_audit

    records = [SimpleNamespace(messages=WEATHER, source="d.jsonl:1", tools=TOOLS),
               SimpleNamespace(messages=PARALLEL, source="d.jsonl:2", tools=TOOLS),
               SimpleNamespace(messages=turns(("q", "a")), source="d.jsonl:3")]  # a record without tools
    rows, audit = _encode_split(records, "default", encoder, EncodeOptions(1024))
    assert audit["rows_out"] == 3 and audit["rows_with_tools"] == 2 and audit["tool_calls"] == 3
    assert audit["supervised_call_tokens"] == 78 + 157
    assert audit["supervised_tokens"] == 91 + 178 + 2  # WEATHER, PARALLEL, "a" + EOS
    report = format_audit({"fingerprint": "f", "template": "default", "max_seq_length": 1024, "files": [],
                           "train": audit})
    assert "[train] rows with tools 2, tool calls 3, supervised call tokens 235" in report
    _, refused = _encode_split(records, "vicuna", encoder, EncodeOptions(1024))
    reason = "template 'vicuna' does not render tools or tool calls; templates that do: chatglm3, default, tokenizer"
    assert refused["dropped_reasons"] == {reason: 2} and refused["rows_out"] == 1
    assert refused["rows_with_tools"] == refused["tool_calls"] == refused["supervised_call_tokens"] == 0
    assert refused["dropped_examples"] == [f"d.jsonl:1: {reason}", f"d.jsonl:2: {reason}"]
