"""Preference rows into tokens: the prompt is the template's generation prompt (the ids
``encode_prompt`` gives at inference) shared by both answers, only answer tokens are labelled,
a pair too long loses its prompt's oldest turns before its answers are cut (counted in the
audit), KTO rows get another row's answer for the KL term, and the tokens decode to the
template's rendering (also on the real files in ../shared/data, see its SOURCES.md).

Most tests run on conftest.py's one-character-per-token tokenizer: token counts are character counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.config import DataArgs, DataSource
from chattune.data.encode import IGNORE_INDEX, PieceEncoder, encode_prompt
from chattune.data.pair_encode import (
    UNBOUNDED,
    encode_preference,
    encode_split,
    format_preference_audit,
    prepare_preference_data,
)
from chattune.data.pairs import LABELLED, PAIRED, PreferenceRecord, read_preference_source
from chattune.errors import ConfigError, DataError
from chattune.templates.pieces import render_text
from chattune.templates.registry import NAMED_TEMPLATES, render
from tests.templates.tool_cases import glm3_tokenizer, qwen_tokenizer

FILLS = "prompt fills max_seq_length: no answer token would remain"


def user(text: str, extra: str = "") -> dict:
    return {"role": "user", "content": text, **({"input": extra} if extra else {})}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "S"}
MULTI_TURN = [SYSTEM, user("first"), assistant("one"), user("second"), assistant("two"), user("third?")]
"""Three user turns; with the default template the prompt is 94 tokens, 65 without the
oldest turn, 35 without both older turns."""

PROMPTS = {"multi-turn with a system": MULTI_TURN, "alpaca input": [user("Translate", "cat")]}


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def labelled(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def glm4_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models("glm4"))


def tokenizers(char_tokenizer, glm4_tokenizer) -> dict:
    """template -> the tokenizers to try it with (``tokenizer``: each one's own chat template)."""
    named = {name: [char_tokenizer, glm4_tokenizer] for name in NAMED_TEMPLATES}
    named["chatglm3"].append(glm3_tokenizer(char_tokenizer))
    named["tokenizer"] = [qwen_tokenizer(char_tokenizer), glm4_tokenizer]
    return named


# --------------------------------------------------------------------------- the prompt and the labels


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_the_prompt_is_the_generation_prompt_and_only_answers_are_labelled(prompt, char_tokenizer, glm4_tokenizer):
    messages = PROMPTS[prompt]
    record = PreferenceRecord(messages, "Red, blue and yellow.", "Green.")
    checked = 0
    for template, candidates in tokenizers(char_tokenizer, glm4_tokenizer).items():
        for tokenizer in candidates:
            encoder = PieceEncoder(tokenizer)
            encoded = encode_preference(record, template, encoder, UNBOUNDED)
            assert encoded.dropped is None, (template, encoded.dropped)
            assert encoded.prompt == encode_prompt(messages, template, encoder), template
            (chosen, chosen_labels), (rejected, rejected_labels) = encoded.answers
            assert chosen_labels == chosen and rejected_labels == rejected, template
            assert decode(tokenizer, chosen).strip().startswith("Red, blue and yellow."), template
            assert decode(tokenizer, rejected).strip().startswith("Green."), template
            assert (encoded.turns_dropped, encoded.answers_cut) == (0, 0)
            checked += 1
    assert checked == 2 * len(NAMED_TEMPLATES) + 3


@pytest.mark.parametrize(("template", "chosen", "rejected"), [
    ("default", "Red.</s>", "Blue!!</s>"),
    ("tutorial-alpaca", "Red.\nEND\n</s>", "Blue!!\nEND\n</s>"),
    ("vicuna", " Red.</s>", " Blue!!</s>"),
    ("moss", " Red.<eom>", " Blue!!<eom>"),
])
def test_the_labels_are_exactly_the_answer_tokens(template, chosen, rejected, char_tokenizer):
    encoded = encode_preference(PreferenceRecord([user("Colour?")], "Red.", "Blue!!"), template,
                                PieceEncoder(char_tokenizer), 2048)  # moss's system text is long
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = encoded.answers
    assert decode(char_tokenizer, labelled(chosen_ids, chosen_labels)) == chosen
    assert decode(char_tokenizer, labelled(rejected_ids, rejected_labels)) == rejected
    # "</s>" is one token (EOS); every other character one token
    assert len(labelled(chosen_ids, chosen_labels)) == len(chosen) - 3 * chosen.count("</s>")
    assert len(labelled(rejected_ids, rejected_labels)) == len(rejected) - 3 * rejected.count("</s>")


def test_chatglm3_labels_the_newline_after_the_role_token(char_tokenizer):
    tokenizer = glm3_tokenizer(char_tokenizer)
    encoded = encode_preference(PreferenceRecord([user("Colour?")], "Red.", "Blue!!"), "chatglm3",
                                PieceEncoder(tokenizer), 512)
    assert decode(tokenizer, encoded.prompt) == "<|user|>\nColour?<|assistant|>"
    assert [len(ids) for ids, _ in encoded.answers] == [len("\nRed.") + 1, len("\nBlue!!") + 1]


def test_prompt_and_chosen_decode_to_the_template_rendering(char_tokenizer, glm4_tokenizer):
    record = PreferenceRecord(MULTI_TURN, "Red.", "Blue!!")
    encoded = encode_preference(record, "default", PieceEncoder(char_tokenizer), 512)
    (chosen, _), (rejected, _) = encoded.answers
    assert decode(char_tokenizer, encoded.prompt + chosen) == (
        "System: S\nHuman: first\nAssistant: one</s>\nHuman: second\nAssistant: two</s>\n"
        "Human: third?\nAssistant: Red.</s>")
    assert decode(char_tokenizer, encoded.prompt + rejected).endswith("Human: third?\nAssistant: Blue!!</s>")
    for template, candidates in tokenizers(char_tokenizer, glm4_tokenizer).items():
        for tokenizer in candidates:
            for answer, (ids, _) in zip(("Red.", "Blue!!"), encode_preference(
                    record, template, PieceEncoder(tokenizer), UNBOUNDED).answers, strict=True):
                pieces = render(template, MULTI_TURN + [assistant(answer)], tokenizer)
                expected = render_text(pieces, eos=tokenizer.eos_token)
                assert decode(tokenizer, encode_prompt(MULTI_TURN, template, PieceEncoder(tokenizer)) + ids) \
                    == expected, template


@pytest.mark.parametrize(("name", "kind"), [("dpo_en_demo.json", PAIRED), ("dpo_zh_demo.json", PAIRED),
                                            ("kto_en_demo.json", LABELLED)])
def test_real_rows_decode_to_the_models_own_chat_template(name, kind, shared_data, glm4_tokenizer):
    """Rows of one user turn against transformers' rendering of the tokenizer's chat template
    (chattune ends an answer with EOS where the template does not)."""
    records, _ = read_preference_source(DataSource(str(shared_data / name)), kind)
    encoder = PieceEncoder(glm4_tokenizer)
    single = [r for r in records if sum(m["role"] == "user" for m in r.prompt) == 1]
    assert len(single) > 150
    for record in single:
        encoded = encode_preference(record, "tokenizer", encoder, UNBOUNDED)
        assert decode(glm4_tokenizer, encoded.prompt) == glm4_tokenizer.apply_chat_template(
            record.prompt, add_generation_prompt=True, tokenize=False), record.source
        answers = [record.chosen] + ([record.rejected] if kind == PAIRED else [])
        for answer, (ids, labels) in zip(answers, encoded.answers, strict=True):
            conversation = record.prompt + [assistant(answer)]
            assert decode(glm4_tokenizer, encoded.prompt + ids) == glm4_tokenizer.apply_chat_template(
                conversation, tokenize=False) + "<|endoftext|>", record.source
            assert labels == ids


# --------------------------------------------------------------------------- fitting max_seq_length


def test_oldest_turns_go_before_any_answer_is_cut(char_tokenizer):
    encoder = PieceEncoder(char_tokenizer)
    record = PreferenceRecord(MULTI_TURN, "C" * 12, "R" * 4)  # answers of 13 and 5 tokens with EOS
    without_first = [SYSTEM, *MULTI_TURN[3:]]
    last_turn = [SYSTEM, MULTI_TURN[-1]]
    assert [len(encode_prompt(m, "default", encoder)) for m in (MULTI_TURN, without_first, last_turn)] == [94, 65, 35]

    def fit(limit: int):
        encoded = encode_preference(record, "default", encoder, limit)
        return (encoded.turns_dropped, encoded.answers_cut, len(encoded.prompt),
                [decode(char_tokenizer, ids) for ids, _ in encoded.answers], encoded.dropped)

    whole = ["C" * 12 + "</s>", "RRRR</s>"]
    assert fit(94 + 13) == (0, 0, 94, whole, None)
    assert fit(94 + 12) == (1, 0, 65, whole, None)  # a turn goes though cutting one token would do
    assert fit(65 + 13) == (1, 0, 65, whole, None)
    assert fit(65 + 12) == (2, 0, 35, whole, None)
    assert fit(35 + 13) == (2, 0, 35, whole, None)
    assert fit(35 + 12) == (2, 1, 35, ["C" * 12, "RRRR</s>"], None)  # only then an answer is cut
    assert fit(35 + 4) == (2, 2, 35, ["C" * 4, "RRRR"], None)
    assert fit(35 + 1) == (2, 2, 35, ["C", "R"], None)
    assert fit(35) == (2, 0, 0, [], FILLS)
    encoded = encode_preference(record, "default", encoder, 35 + 4)
    assert encoded.prompt == encode_prompt(last_turn, "default", encoder)
    assert all(labels == ids for ids, labels in encoded.answers)


def test_a_prompt_that_leaves_no_room_drops_the_row(char_tokenizer):
    encoder = PieceEncoder(char_tokenizer)
    record = PreferenceRecord([SYSTEM, user("x" * 100)], "yes", "no")
    encoded = encode_preference(record, "default", encoder, 64)
    assert encoded.dropped == FILLS and encoded.answers == [] and encoded.prompt == []
    kto = encode_preference(PreferenceRecord([user("x" * 100)], "yes", desirable=True), "default", encoder, 64)
    assert kto.dropped == FILLS


def test_the_audit_counts_every_pair_and_how_it_was_fitted(tmp_path, char_tokenizer):
    rows = [
        {"prompt": "q", "chosen": "yes", "rejected": "no"},  # fits
        {"messages": MULTI_TURN, "chosen": "C" * 12, "rejected": "R" * 4},  # loses its two oldest turns
        {"prompt": "q", "chosen": "C" * 40, "rejected": "no"},  # 20 + 41 tokens: the chosen answer is cut
        {"prompt": "x" * 60, "chosen": "yes", "rejected": "no"},  # the prompt alone is too long
    ]
    path = write_json(tmp_path / "pairs.json", rows)
    prepared = prepare_preference_data(DataArgs(train_files=[DataSource(str(path))], max_seq_length=60),
                                       char_tokenizer, "default", "dpo", 42)
    train = prepared.audit["train"]
    assert {k: train[k] for k in ("kind", "rows_in", "rows_out", "rows_truncated", "turns_dropped",
                                  "answers_cut", "rows_dropped", "dropped_reasons")} == {
        "kind": PAIRED, "rows_in": 4, "rows_out": 3, "rows_truncated": 2, "turns_dropped": 2, "answers_cut": 1,
        "rows_dropped": 1, "dropped_reasons": {FILLS: 1}}
    assert train["dropped_examples"] == [f"{path}#3: {FILLS}"]
    assert train["answer_tokens"] == (4 + 3) + (13 + 5) + (40 + 3)
    assert len(prepared.train) == 3 and prepared.eval is None
    assert set(prepared.train.column_names) == {"prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids",
                                                "rejected_labels"}
    for row in prepared.train:
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 60
    assert decode(char_tokenizer, prepared.train[2]["chosen_ids"]) == "C" * 40
    text = format_preference_audit(prepared.audit)
    assert (f"[train] pairs in 4, out 3, truncated 2 (2 oldest turns dropped, 1 answers cut), "
            f"dropped 1 {{'{FILLS}': 1}}") in text


def test_dpo_en_demo_audit(shared_data, char_tokenizer):
    data = DataArgs(train_files=[DataSource(str(shared_data / "dpo_en_demo.json"))], max_seq_length=512,
                    eval_fraction=0.1)
    prepared = prepare_preference_data(data, char_tokenizer, "default", "dpo", 42)
    audit = prepared.audit
    assert [(f["read"], f["converted"], f["duplicated"], f["skipped"]) for f in audit["files"]] == [(300, 295, 5, 0)]
    train, held_out = audit["train"], audit["eval"]
    assert train["rows_in"] + held_out["rows_in"] == 295
    for split, dataset in ((train, prepared.train), (held_out, prepared.eval)):
        assert split["rows_out"] + split["rows_dropped"] == split["rows_in"] == split["rows_out"] + sum(
            split["dropped_reasons"].values())
        assert set(split["dropped_reasons"]) <= {FILLS}
        assert len(dataset) == split["rows_out"]
        for row in dataset:
            assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 512
    assert sum(a[k] for a in (train, held_out) for k in ("rows_out", "rows_truncated", "turns_dropped",
                                                         "answers_cut", "rows_dropped")) == \
        sum((225, 212, 256, 403, 70))  # as with the whole file in one split


# --------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("count", [2, 3, 7])
def test_kto_kl_answers_are_another_rows_and_fit(count, char_tokenizer):
    letters = "abcdefg"
    records = [PreferenceRecord([user("q" * (1 + 4 * i))], letters[i] * (2 + 7 * (count - i)), desirable=i % 2 == 0)
               for i in range(count)]
    for limit, seed in ((512, 0), (60, 1), (60, 42)):
        columns, audit = encode_split(records, "default", PieceEncoder(char_tokenizer), limit, seed)
        assert audit["rows_out"] == count and audit["kind"] == LABELLED
        assert columns["desirable"] == [i % 2 == 0 for i in range(count)]
        owner = [decode(char_tokenizer, ids)[0] for ids in columns["chosen_ids"]]
        kl_owner = [decode(char_tokenizer, ids)[0] for ids in columns["kl_ids"]]
        assert owner == list(letters[:count])
        assert all(kl != own for kl, own in zip(kl_owner, owner, strict=True))
        assert sorted(kl_owner) == owner  # every answer is one other row's KL answer
        for i in range(count):
            assert len(columns["prompt_ids"][i]) + len(columns["kl_ids"][i]) <= limit
            assert columns["kl_labels"][i] == columns["kl_ids"][i]
            partner = owner.index(kl_owner[i])
            assert columns["chosen_ids"][partner][:len(columns["kl_ids"][i])] == columns["kl_ids"][i]


def test_kto_en_demo_prepares_with_labels_and_kl_answers(shared_data, char_tokenizer):
    data = DataArgs(train_files=[DataSource(str(shared_data / "kto_en_demo.json"))], max_seq_length=512)
    prepared = prepare_preference_data(data, char_tokenizer, "default", "kto", 42)
    train = prepared.audit["train"]
    assert (train["rows_in"], train["rows_out"], train["rows_dropped"]) == (300, 228, 72)
    assert (train["desirable"], train["undesirable"]) == (113, 115)
    assert "desirable 113, undesirable 115" in format_preference_audit(prepared.audit)
    rows = prepared.train
    assert sum(rows["desirable"]) == 113
    for prompt, answer, kl in zip(rows["prompt_ids"], rows["chosen_ids"], rows["kl_ids"], strict=True):
        assert kl != answer and len(prompt) + max(len(answer), len(kl)) <= 512


def test_kto_needs_two_rows_and_any_stage_needs_data(tmp_path, char_tokenizer):
    path = write_json(tmp_path / "one.json", [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(DataError, match="kto needs at least 2 labelled rows"):
        prepare_preference_data(DataArgs(train_files=[DataSource(str(path))]), char_tokenizer, "default", "kto", 0)
    with pytest.raises(ConfigError, match="^train_files: no preference data given"):
        prepare_preference_data(DataArgs(), char_tokenizer, "default", "dpo", 0)


def test_no_pair_left_names_what_happened_to_the_rows(tmp_path, char_tokenizer):
    path = write_json(tmp_path / "pairs.json", [{"prompt": "x" * 80, "chosen": "a", "rejected": "b"},
                                                {"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError) as exc:
        prepare_preference_data(DataArgs(train_files=[DataSource(str(path))], max_seq_length=64),
                                char_tokenizer, "default", "dpo", 0)
    message = str(exc.value)
    assert message.startswith("train_files: no paired preference rows left after reading and encoding")
    assert "chosen and rejected are identical" in message
    assert f"encoded 0 of 1; dropped {{'{FILLS}': 1}}" in message


def test_a_pair_identical_once_cut_is_dropped_and_counted(char_tokenizer):
    from chattune.data.encode import PieceEncoder
    from chattune.data.pair_encode import encode_preference
    from chattune.data.pairs import PreferenceRecord

    record = PreferenceRecord([{"role": "user", "content": "Say it."}], "Same start, then one way.",
                              "Same start, then the other way.", source="f.json#0")
    encoder = PieceEncoder(char_tokenizer)
    full = encode_preference(record, "default", encoder, 200)
    assert full.dropped is None
    room = len(full.prompt) + len("Same start")
    cut = encode_preference(record, "default", encoder, room)
    assert cut.dropped == "chosen and rejected are identical once cut to max_seq_length"
