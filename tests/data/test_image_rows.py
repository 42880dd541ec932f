"""Rows with images: read from every layout that names them, accounted for, and encoded with the
processor's own image tokens (never supervised); rows that cannot be used are dropped with why."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from chattune.config import DataArgs, DataSource
from chattune.data.encode import IGNORE_INDEX, EncodeOptions, PieceEncoder, encode_conversation
from chattune.data.formats import RawRow, to_record
from chattune.data.images import (
    IMAGE_CUT,
    NOT_VISION,
    STRAY_IMAGE_TOKEN,
    encode_image_record,
    splice_images,
    stray_image_token,
    with_image_token,
)
from chattune.data.prepare import _encode_split, data_fingerprint, format_audit, prepare_data
from chattune.data.records import Record, RecordError
from chattune.data.sources import read_source, record_key
from chattune.errors import DataError

TEMPLATE = "tokenizer"  # the tiny VLMs' chat template
ASK = "What colour is it?"


def png(path: Path, colour=(200, 20, 20), size=(40, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def png_bytes(size, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def forged_png(width: int, height: int) -> bytes:
    from tests.vision.test_images import forged_png as forge

    return forge(width, height)


def jpeg_half() -> bytes:
    """The first half of a real JPEG's bytes."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def chat(question=f"<image>{ASK}", answer="red") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture
def pics(tmp_path) -> Path:
    """A folder with img/red.png, img/blue.png and img/green.png."""
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 60, 220)), ("green", (30, 180, 30))):
        png(tmp_path / "img" / f"{name}.png", colour)
    return tmp_path


def record_of(value: dict, base_dir: Path, where="rows.json#0"):
    return to_record(RawRow(value, where), "auto", base_dir=base_dir)


# ---- reading: formats ----

def test_llama_factory_mllm_demo_reads_every_row(shared_data):
    records, summary = read_source(DataSource(str(shared_data / "mllm_demo.json")))
    assert (summary.read, summary.converted, summary.skipped_total, summary.duplicated) == (6, 6, 0, 0)
    assert [len(r.images) for r in records] == [2, 1, 1, 2, 1, 1]
    folder = (shared_data / "mllm_demo_data").resolve()
    assert records[0].images == [str(folder / "1.jpg")] * 2
    assert [r.images[0] for r in records[1:3]] == [str(folder / "2.jpg"), str(folder / "3.jpg")]
    assert all(Path(ref).is_absolute() and Path(ref).is_file() for r in records for ref in r.images)
    assert records[0].messages[0]["content"] == "<image>Who are they?"
    assert records[0].messages[2]["content"] == "What are they doing?<image>"
    assert records[3].source == f"{shared_data / 'mllm_demo.json'}#3"


def test_mllm_demo_roundtrips_through_the_canonical_rows(shared_data, tmp_path):
    records, _ = read_source(DataSource(str(shared_data / "mllm_demo.json")))
    out = tmp_path / "elsewhere" / "canonical.jsonl"
    out.parent.mkdir()
    out.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records))
    again, summary = read_source(DataSource(str(out)))
    assert summary.converted == 6
    assert [r.images for r in again] == [r.images for r in records]  # absolute paths, whatever the folder
    assert [r.messages for r in again] == [r.messages for r in records]


def test_images_resolve_from_the_data_files_folder_not_the_working_directory(pics, tmp_path, monkeypatch):
    data = write_json(pics / "rows.json", [{"messages": chat(), "images": ["img/red.png"]}])
    monkeypatch.chdir(tmp_path.parent)
    records, _ = read_source(DataSource(str(data)))
    assert records[0].images == [str((pics / "img" / "red.png").resolve())]


@pytest.mark.parametrize("question, images, expected", [
    ("<image><image>Which is darker?", ["img/red.png"],
     "2 <image> placeholders in the messages but 1 image; expected one image per placeholder, in order"),
    ("<image>" + ASK, ["img/red.png", "img/blue.png"],
     "1 <image> placeholder in the messages but 2 images; expected one image per placeholder, in order"),
    (ASK, ["img/red.png"],
     "0 <image> placeholders in the messages but 1 image; expected one image per placeholder, in order"),
])
def test_placeholders_and_images_must_match(pics, question, images, expected):
    data = write_json(pics / "rows.json", [{"messages": chat(), "images": ["img/red.png"]},
                                           {"messages": chat(question), "images": images}])
    with pytest.raises(RecordError) as caught:
        read_source(DataSource(str(data)), strict=True)
    assert str(caught.value) == f"{data}#1: {expected}"
    records, summary = read_source(DataSource(str(data)))
    assert len(records) == 1 and summary.skipped == Counter({"placeholders and images differ": 1})
    assert summary.examples == [f"{data}#1: {expected}"]


def test_a_row_that_names_no_image_is_text_whatever_its_text_holds(pics):
    """A text data set may hold the literal "<image>" (HTML, RSS): without an image named it is
    read as before; a vision-language run drops it at encoding (STRAY_IMAGE_TOKEN)."""
    rss = "<channel><image><url>a.png</url></image></channel>"
    data = write_json(pics / "rows.json", [{"instruction": "Write an RSS channel block", "output": rss},
                                           {"messages": chat("<image>" + ASK), "images": []},
                                           {"instruction": "x", "output": "y", "images": {}}])
    records, summary = read_source(DataSource(str(data)), strict=True)
    assert [r.images for r in records] == [None, None, None] and summary.converted == 3
    assert records[0].messages[-1]["content"] == rss


def test_images_both_as_parts_and_in_images_are_refused(pics):
    value = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/red.png"}},
                                                       {"type": "text", "text": ASK}]},
                          {"role": "assistant", "content": "red"}],
             "images": ["img/red.png"]}
    with pytest.raises(RecordError, match=r"^rows\.json#0: images given both as content parts and in 'images'"):
        record_of(value, pics)


def test_openai_content_parts_become_placeholders_and_images_in_order(pics):
    url = "data:image/png;base64," + base64.b64encode(png_bytes((6, 6), (0, 0, 0))).decode()
    value = {"messages": [
        {"role": "system", "content": "You see images."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                     {"type": "image_url", "image_url": {"url": "img/blue.png"}},
                                     {"type": "text", "text": " with "},
                                     {"type": "image_url", "image_url": url},
                                     {"type": "text", "text": "."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first is blue."}]},
        {"role": "user", "content": [{"type": "image", "image": "img/red.png"}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": "Red."}]}
    record = record_of(value, pics)
    assert [m["content"] for m in record.messages] == [
        "You see images.", "Compare <image> with <image>.", "The first is blue.", "<image>And?", "Red."]
    assert record.images == [str((pics / "img" / "blue.png").resolve()), url, str((pics / "img" / "red.png").resolve())]


def test_an_unknown_content_part_is_a_record_error(pics):
    value = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                          {"role": "assistant", "content": "hm"}]}
    with pytest.raises(RecordError, match=r"^rows\.json#0\.messages\[0\]\.content\[0\]: expected a content part"):
        record_of(value, pics)


def test_sharegpt_with_images(pics):
    value = {"conversations": [{"from": "human", "value": "<image>Which colour?"}, {"from": "gpt", "value": "blue"},
                               {"from": "human", "value": "And this one?<image>"}, {"from": "gpt", "value": "green"}],
             "system": "Name colours.", "images": ["img/blue.png", "./img/green.png"]}
    record = record_of(value, pics)
    assert record.messages[0] == {"role": "system", "content": "Name colours."}
    assert record.images == [str((pics / "img" / n).resolve()) for n in ("blue.png", "green.png")]


def test_alpaca_with_an_image_and_a_single_string(pics):
    record = record_of({"instruction": "<image>Name the colour.", "input": "", "output": "green",
                        "images": "img/green.png"}, pics)
    assert record.images == [str((pics / "img" / "green.png").resolve())]
    record = record_of({"instruction": "Name the colour.", "input": "<image>", "output": "red",
                        "images": ["img/red.png"]}, pics)  # a placeholder in the input counts too
    assert len(record.images) == 1


def test_images_that_are_not_a_list_are_refused(pics):
    with pytest.raises(RecordError, match=r"^rows\.json#0\.images: expected a list of image paths, got dict"):
        record_of({"messages": chat(), "images": {"path": "img/red.png"}}, pics)


def test_a_row_without_images_has_none(pics):
    assert record_of({"messages": chat(ASK)}, pics).images is None
    assert record_of({"messages": chat(ASK), "images": []}, pics).images is None


def test_same_text_with_other_images_is_not_a_duplicate(pics):
    data = write_json(pics / "rows.json", [
        {"messages": chat(), "images": ["img/red.png"]},
        {"messages": chat(), "images": ["img/blue.png"]},
        {"messages": chat(), "images": ["./img/../img/red.png"]},  # the same image as row 0
        {"messages": chat(ASK)},  # the same text without an image
    ])
    records, summary = read_source(DataSource(str(data)))
    assert (summary.converted, summary.duplicated) == (3, 1)
    assert [r.source.rsplit("#", 1)[1] for r in records] == ["0", "1", "3"]
    assert len({record_key(r) for r in records}) == 3
    # a record without images hashes as before images existed (its messages alone)
    assert record_key(records[2]) == record_key(Record(messages=records[2].messages))


def test_a_row_whose_image_cannot_be_used_is_skipped_and_counted(pics):
    (pics / "img" / "cut.jpg").write_bytes(jpeg_half())
    (pics / "img" / "notes.png").write_text("not an image")
    data = write_json(pics / "rows.json", [
        {"messages": chat(), "images": ["img/red.png"]},
        {"messages": chat(), "images": ["img/missing.png"]},
        {"messages": chat(), "images": ["img/cut.jpg"]},
        {"messages": chat(), "images": ["https://example.com/x.png"]},
        {"messages": chat(), "images": ["img/notes.png"]},
        {"messages": chat(), "images": ["img/blue.png"]},
    ])
    records, summary = read_source(DataSource(str(data)))
    assert [r.images[0].rsplit("/", 1)[1] for r in records] == ["red.png", "blue.png"]  # neighbours kept
    assert (summary.read, summary.converted) == (6, 2)
    assert summary.skipped == Counter({"image not found": 1, "corrupt or truncated image": 1,
                                       "remote image URLs are not fetched": 1, "not an image Pillow can read": 1})
    missing = str((pics / "img" / "missing.png").resolve())
    assert summary.examples[0] == f"{data}#1.images[0]: image {missing} not found"
    assert summary.examples[1].startswith(f"{data}#2.images[0]: {(pics / 'img' / 'cut.jpg').resolve()}: corrupt")
    assert summary.to_json()["skipped_reasons"]["image not found"] == 1


def test_oversized_images_are_counted_under_one_reason(pics):
    (pics / "img" / "huge.png").write_bytes(forged_png(20000, 20000))
    (pics / "img" / "big.png").write_bytes(forged_png(9000, 9000))
    (pics / "img" / "wide.png").write_bytes(forged_png(30000, 9000))
    data = write_json(pics / "rows.json", [{"messages": chat(), "images": [f"img/{name}.png"]}
                                           for name in ("huge", "big", "wide", "red")])
    records, summary = read_source(DataSource(str(data)))
    assert len(records) == 1
    assert summary.skipped == Counter({"image over the pixel limit": 3})


# ---- encoding ----

@pytest.fixture(scope="module")
def vlm(tiny_vlms):
    """arch -> (VisionProcessor, tokenizer, PieceEncoder)."""
    from chattune.model import load_tokenizer
    from chattune.vision.processor import load_vision

    made = {}

    def get(arch="llava"):
        if arch not in made:
            tokenizer = load_tokenizer(str(tiny_vlms(arch)))
            made[arch] = (load_vision(str(tiny_vlms(arch))), tokenizer, PieceEncoder(tokenizer))
        return made[arch]

    return get


def spans(ids: list[int], expansion: list[int]) -> list[int]:
    """Where ``expansion`` starts in ``ids``."""
    return [i for i in range(len(ids) - len(expansion) + 1) if ids[i:i + len(expansion)] == expansion]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_an_image_becomes_its_expansion_never_supervised(vlm, pics, train_on_prompt):
    vision, _, encoder = vlm("llava")
    record = Record(chat(), "rows.json#0", images=[str(pics / "img" / "red.png")])
    encoded, image_tokens = encode_image_record(record, TEMPLATE, encoder, EncodeOptions(512, train_on_prompt), vision)
    assert encoded.dropped is None and not encoded.truncated
    expansion = vision.expansion(Image.open(pics / "img" / "red.png"))
    assert len(expansion) == 17 and image_tokens == 17
    assert encoded.input_ids.count(vision.image_token_id) == 17
    [start] = spans(encoded.input_ids, expansion)
    assert encoded.labels[start:start + 17] == [IGNORE_INDEX] * 17
    assert vision.image_token_id not in [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True)
                                         if label != -100]
    # without its image tokens the row is the text-only row, ids and labels alike
    text = encode_conversation(chat(ASK), TEMPLATE, encoder, EncodeOptions(512, train_on_prompt))
    assert encoded.input_ids[:start] + encoded.input_ids[start + 17:] == text.input_ids
    assert encoded.labels[:start] + encoded.labels[start + 17:] == text.labels
    supervised = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert supervised == [label for label in text.labels if label != IGNORE_INDEX]
    if not train_on_prompt:  # the answer, then the template's end of turn (EOS, newline)
        red = encoder.tokenizer("red", add_special_tokens=False)["input_ids"]
        assert supervised[:len(red)] == red and supervised[len(red)] == encoder.tokenizer.eos_token_id
        assert len(supervised) == len(red) + 2


def test_idefics3_rows_carry_its_marked_expansion(vlm, pics):
    vision, _, encoder = vlm("idefics3")
    record = Record(chat(), "rows.json#0", images=[str(pics / "img" / "red.png")])
    encoded, image_tokens = encode_image_record(record, TEMPLATE, encoder, EncodeOptions(512, True), vision)
    expansion = vision.expansion(Image.open(pics / "img" / "red.png"))
    assert image_tokens == len(expansion) == 7
    [start] = spans(encoded.input_ids, expansion)
    assert encoded.labels[start:start + 7] == [IGNORE_INDEX] * 7
    assert encoded.input_ids.count(vision.image_token_id) == 4


def test_several_images_in_their_order(vlm, pics):
    vision, _, encoder = vlm("llava")
    messages = [{"role": "user", "content": "<image>First?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "Then <image> and <image>?"}, {"role": "assistant", "content": "blue, green"}]
    refs = [str(pics / "img" / f"{n}.png") for n in ("red", "blue", "green")]
    encoded, image_tokens = encode_image_record(Record(messages, "r#0", images=refs), TEMPLATE, encoder,
                                                EncodeOptions(512), vision)
    assert image_tokens == 51 and encoded.input_ids.count(vision.image_token_id) == 51
    runs = [i for i, token in enumerate(encoded.input_ids)
            if token == vision.image_token_id and (i == 0 or encoded.input_ids[i - 1] != vision.image_token_id)]
    assert len(runs) == 3  # three separate blocks of 17, at their placeholders


def test_a_cut_that_would_lose_an_image_drops_the_row(vlm, pics):
    vision, _, encoder = vlm("llava")
    red = str(pics / "img" / "red.png")
    two_turns = [{"role": "user", "content": f"<image>{ASK}"}, {"role": "assistant", "content": "red"},
                 {"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "yes"}]
    whole, _ = encode_image_record(Record(two_turns, "r#0", images=[red]), TEMPLATE, encoder, EncodeOptions(512), vision)
    cut, image_tokens = encode_image_record(Record(two_turns, "r#0", images=[red]), TEMPLATE, encoder,
                                            EncodeOptions(len(whole.input_ids) - 1), vision)
    assert cut.dropped == IMAGE_CUT and cut.turns_dropped == 1 and image_tokens == 0
    # an image at the end of a long question: shortening the question would cut it
    long = chat("Tell me " + "very " * 30 + "carefully what colour this is: <image>")
    whole, _ = encode_image_record(Record(long, "r#0", images=[red]), TEMPLATE, encoder, EncodeOptions(512), vision)
    cut, _ = encode_image_record(Record(long, "r#0", images=[red]), TEMPLATE, encoder,
                                 EncodeOptions(len(whole.input_ids) - 5), vision)
    assert cut.dropped == IMAGE_CUT
    # no room for the image at all
    tiny, _ = encode_image_record(Record(chat(), "r#0", images=[red]), TEMPLATE, encoder, EncodeOptions(17), vision)
    assert tiny.dropped == IMAGE_CUT


def test_a_long_answer_is_cut_and_its_image_kept(vlm, pics):
    vision, _, encoder = vlm("llava")
    record = Record(chat(answer="It is " + "really " * 30 + "red"), "r#0", images=[str(pics / "img" / "red.png")])
    whole, _ = encode_image_record(record, TEMPLATE, encoder, EncodeOptions(512), vision)
    cut, image_tokens = encode_image_record(record, TEMPLATE, encoder, EncodeOptions(len(whole.input_ids) - 10), vision)
    assert cut.dropped is None and cut.truncated
    assert len(cut.input_ids) == len(whole.input_ids) - 10 and image_tokens == 17
    assert cut.input_ids.count(vision.image_token_id) == 17


def test_an_image_gone_since_reading_drops_the_row_with_why(vlm, tmp_path):
    vision, _, encoder = vlm("llava")
    record = Record(chat(), "rows.json#5", images=[str(tmp_path / "gone.png")])
    encoded, _ = encode_image_record(record, TEMPLATE, encoder, EncodeOptions(512), vision)
    assert encoded.dropped == f"rows.json#5: image {tmp_path / 'gone.png'} not found"


def test_image_rows_on_a_text_model_are_dropped(vlm, pics):
    _, _, encoder = vlm("llava")
    record = Record(chat(), "r#0", images=[str(pics / "img" / "red.png")])
    encoded, image_tokens = encode_image_record(record, TEMPLATE, encoder, EncodeOptions(512), None)
    assert (encoded.dropped, image_tokens) == (NOT_VISION, 0)


def test_a_text_row_holding_the_image_token_is_dropped_on_a_vlm(vlm):
    vision, _, encoder = vlm("llava")
    stray = Record(chat(), "r#0")  # "<image>" in the text, no image (only possible past read_images)
    plain = Record(chat(ASK), "r#1")
    rows, audit = _encode_split([stray, plain], TEMPLATE, encoder, EncodeOptions(512), vision=vision)
    assert audit["dropped_reasons"] == {STRAY_IMAGE_TOKEN: 1} and audit["rows_out"] == 1
    assert "images" not in rows  # no row has images
    assert stray_image_token(encode_conversation(chat(), TEMPLATE, encoder, EncodeOptions(512)), None).dropped is None


def test_splice_images_and_with_image_token():
    assert splice_images([1, 9, 2], [-100, -100, 2], 9, [[7, 7, 7]]) == ([1, 7, 7, 7, 2], [-100] * 4 + [2])
    assert splice_images([1, 9, 2, 9], [1, 9, 2, 9], 9, [[7], [8, 8]]) == ([1, 7, 2, 8, 8], [1, -100, 2, -100, -100])
    assert splice_images([1, 9, 2], [1, 9, 2], 9, [[7], [8]]) is None  # an image's token was cut
    assert splice_images([9, 9], [9, 9], 9, [[7]]) is None  # a stray image token
    messages = [{"role": "user", "content": "<image>x", "input": "y<image>"}, {"role": "assistant", "content": "z"}]
    assert with_image_token(messages, "<image>") is messages
    assert with_image_token(messages, "<|image_pad|>") == [
        {"role": "user", "content": "<|image_pad|>x", "input": "y<|image_pad|>"}, {"role": "assistant", "content": "z"}]
    assert messages[0]["content"] == "<image>x"  # not changed in place


# ---- prepare_data ----

def test_prepare_data_keeps_images_and_audits_them(vlm, image_data):
    vision, tokenizer, _ = vlm("llava")
    text_rows = write_json(image_data.parent / "text.json", [{"instruction": "Say hi", "output": "hi"}])
    data = DataArgs(train_files=[DataSource(str(image_data)), DataSource(str(text_rows))], max_seq_length=96)
    prepared = prepare_data(data, tokenizer, TEMPLATE, 42, vision=vision)
    audit = prepared.audit["train"]
    assert audit["rows_in"] == audit["rows_out"] == 13
    assert (audit["rows_with_images"], audit["images"], audit["image_tokens"]) == (12, 12, 12 * 17)
    assert audit["text_tokens"] == audit["tokens"] - 12 * 17
    assert audit["tokens"] == sum(len(ids) for ids in prepared.train["input_ids"])
    assert audit["supervised_tokens"] == sum(sum(1 for x in row if x != -100) for row in prepared.train["labels"])
    assert prepared.train.column_names == ["input_ids", "labels", "images"]
    images = prepared.train["images"]
    assert sorted(map(len, images)) == [0] + [1] * 12
    assert {Path(refs[0]).name for refs in images if refs} == {f"{i}.png" for i in range(12)}
    assert all(Path(refs[0]).is_absolute() for refs in images if refs)
    for ids, refs in zip(prepared.train["input_ids"], images, strict=True):
        assert ids.count(vision.image_token_id) == 17 * len(refs)
    report = format_audit(prepared.audit)
    assert "[train] rows with images 12, images 12, image tokens 204 (never supervised)" in report
    # prepared again: the same data set, from the cache
    assert prepare_data(data, tokenizer, TEMPLATE, 42, vision=vision).reused


def test_prepare_data_without_a_vision_model_says_why_no_rows_are_left(vlm, image_data):
    _, tokenizer, _ = vlm("llava")
    with pytest.raises(DataError, match="12 x the row has images and chattune reads none with this model"):
        prepare_data(DataArgs(train_files=[DataSource(str(image_data))]), tokenizer, TEMPLATE, 42, vision=None)


def test_the_fingerprint_covers_the_image_processor(vlm, image_data):
    llava, tokenizer, _ = vlm("llava")
    idefics3, _, _ = vlm("idefics3")
    data = DataArgs(train_files=[DataSource(str(image_data))])
    prints = {data_fingerprint(data, TEMPLATE, tokenizer, 42, vision) for vision in (None, llava, idefics3)}
    assert len(prints) == 3
