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
    special_token_ids,
)
from chattune.data.templates import Piece


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
    from chattune.data.templates import TemplateError

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
