"""Answers with images: a loaded vision-language run reads them, batched with text rows exactly
as alone; the refusals (a text model, a prompt the images cannot fit)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from chattune.config_io import load_config
from chattune.data.encode import IGNORE_INDEX, EncodeOptions, PieceEncoder
from chattune.data.images import encode_image_record
from chattune.data.records import Record
from chattune.inference import decoding
from chattune.inference.generate import answer, conversation_sequence, generate, sampling_params
from chattune.inference.runs import ImagesNotSupported, PromptTooLong, load_run
from chattune.training.recipe import train
from chattune.vision.images import ImageError

ARCHS = ("llava", "idefics3")
ASK = "What colour is it?"
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


def ask(*images, text=ASK) -> list[dict]:
    return [{"role": "user", "content": "<image>" * len(images) + text, "images": list(images)}]


@pytest.fixture(scope="module")
def pictures(image_data) -> dict[str, str]:
    """Two of image_data's images: a red and a blue square."""
    return {"red": str(image_data.parent / "img" / "0.png"), "blue": str(image_data.parent / "img" / "2.png")}


@pytest.fixture(scope="module")
def run_dirs(tiny_vlms, image_data, tmp_path_factory):
    """arch -> a LoRA run folder trained (2 steps) on image_data; ``llava-freeze`` a freeze run."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            arch, _, method = name.partition("-")
            root = tmp_path_factory.mktemp(name)
            values = {"model_name_or_path": str(tiny_vlms(arch)), "train_files": json.dumps([str(image_data)]),
                      "output_dir": str(root / "run"), "cache_dir": str(root / "cache"), "max_seq_length": 96,
                      "method": method or "lora", "max_steps": 2, "save_steps": 100, "learning_rate": 1e-2,
                      "per_device_train_batch_size": 4, "report_to": json.dumps(["none"]), "seed": 3}
            config = load_config(None, [f"{k}={v}" for k, v in values.items()])
            made[name] = train(config, log=lambda *_: None).output_dir
        return made[name]

    return get


@pytest.fixture(scope="module")
def runs(run_dirs):
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_run(str(run_dirs(name)))
        return loaded[name]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_a_loaded_run_has_its_vision(arch, runs):
    run = runs(arch)
    assert run.vision is not None and run.vision.model_type == arch
    assert run.vision.placeholder == "<image>"
    assert run.context_length == run.model.config.get_text_config().max_position_embeddings


@pytest.mark.parametrize("arch", ARCHS)
def test_an_image_row_batched_with_a_text_row_answers_as_alone(arch, runs, pictures):
    run = runs(arch)
    text = [{"role": "user", "content": "What colour is the sky?"}]
    together = answer(run, [ask(pictures["red"]), text], **GREEDY)
    assert len(together) == 2 and all(s.error is None for s in together)
    alone_image = answer(run, [ask(pictures["red"])], **GREEDY)[0]
    alone_text = answer(run, [text], **GREEDY)[0]
    assert together[0].generated == alone_image.generated and len(alone_image.generated) == 6
    assert together[1].generated == alone_text.generated
    # other orders and several image rows of other images, each row as alone
    mixed = answer(run, [text, ask(pictures["blue"]), ask(pictures["red"])], **GREEDY)
    assert [s.generated for s in mixed] == [alone_text.generated, answer(run, [ask(pictures["blue"])], **GREEDY)[0]
                                            .generated, alone_image.generated]
    assert generate(run, [ask(pictures["red"])], **GREEDY) == [alone_image.text.text]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_image_reaches_the_model(arch, runs, pictures, monkeypatch):
    """The first token's logits of one prompt with two different images differ; with the same
    image twice they are equal (the rows of one batch)."""
    run = runs(arch)
    seen = []
    pick = decoding.Decoder._pick

    def watch(self, logits, seqs):
        seen.append(logits.detach().clone())
        return pick(self, logits, seqs)

    monkeypatch.setattr(decoding.Decoder, "_pick", watch)
    answer(run, [ask(pictures["red"]), ask(pictures["blue"]), ask(pictures["red"])], max_new_tokens=1)
    first = seen[0]
    assert first.shape[0] == 3
    assert torch.allclose(first[0], first[2], atol=1e-5)
    assert (first[0] - first[1]).abs().max() > 1e-4


def test_the_prompt_is_the_training_rows_prompt(runs, pictures):
    run = runs("llava")
    ids, images = run.image_prompt(ask(pictures["red"]))
    assert len(images) == 1 and images[0].size == (40, 36)
    record = Record([{"role": "user", "content": "<image>" + ASK}, {"role": "assistant", "content": "red"}], "r#0",
                    images=[pictures["red"]])
    encoded, _ = encode_image_record(record, run.profile().template, PieceEncoder(run.tokenizer),
                                     EncodeOptions(512), run.vision)
    first_label = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert ids == encoded.input_ids[:first_label]
    assert ids.count(run.vision.image_token_id) == 17


def test_an_image_may_be_a_pillow_image_or_a_data_url(runs, pictures):
    run = runs("llava")
    by_path = run.image_prompt(ask(pictures["red"]))
    buffer = io.BytesIO()
    Image.open(pictures["red"]).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    for ref in (Image.open(pictures["red"]), url):
        ids, images = run.image_prompt(ask(ref))
        assert ids == by_path[0]
        assert torch.equal(run.vision.pixels(images)["pixel_values"], run.vision.pixels(by_path[1])["pixel_values"])


def test_placeholders_and_images_must_match(runs, pictures):
    run = runs("llava")
    with pytest.raises(ImageError, match="the messages hold 2 <image> placeholders and 1 images"):
        run.image_prompt([{"role": "user", "content": "<image><image>Same?", "images": [pictures["red"]]}])
    with pytest.raises(ImageError, match=r"^messages\[0\]\.images\[0\]: image .*missing\.png not found"):
        run.image_prompt(ask(str(Path(pictures["red"]).parent / "missing.png")))


def test_an_image_that_cannot_fit_is_prompt_too_long(runs, pictures):
    run = runs("llava")
    with pytest.raises(PromptTooLong) as caught:
        run.image_prompt(ask(pictures["red"]), max_tokens=10)  # the image alone is 17 tokens
    alone, _ = run.image_prompt(ask(pictures["red"]))
    assert caught.value.most == 10 and 10 < caught.value.tokens <= len(alone)  # "at least N tokens"
    # the oldest turn goes first, with its image; the newest image stays
    two = [*ask(pictures["red"]), {"role": "assistant", "content": "red"},
           {"role": "user", "content": "And this one? <image>", "images": [pictures["blue"]]}]
    ids, images = run.image_prompt(two, max_tokens=40)
    assert len(images) == 1 and ids.count(run.vision.image_token_id) == 17 and len(ids) <= 40
    assert images[0].getpixel((0, 0)) == Image.open(pictures["blue"]).convert("RGB").getpixel((0, 0))
    ids, images = run.image_prompt(two)
    assert len(images) == 2 and ids.count(run.vision.image_token_id) == 34


def test_old_turns_images_do_not_eat_the_budget(runs, pictures):
    run = runs("llava")
    last = [{"role": "user", "content": "And this one? <image>", "images": [pictures["blue"]]}]
    alone, _ = run.image_prompt(last)
    history = []
    for _ in range(6):
        history += [*ask(pictures["red"]), {"role": "assistant", "content": "red"}]
    ids, images = run.image_prompt(history + last, max_tokens=100)  # PromptTooLong: "at least 112 tokens"
    assert len(ids) <= 100 and ids[-len(alone):] == alone and len(images) >= 1
    ids, images = run.image_prompt(history[-2:] + last, max_tokens=len(alone))  # the last turn just fits
    assert ids == alone and len(images) == 1


def test_prompt_too_long_counts_more_than_the_most(runs, pictures):
    with pytest.raises(PromptTooLong) as caught:
        runs("llava").image_prompt(ask(pictures["red"]), max_tokens=20)
    assert caught.value.tokens > caught.value.most


def test_a_file_url_in_a_message_and_a_remote_one_refused(runs, pictures):
    run = runs("llava")
    ids, images = run.image_prompt(ask("file://" + pictures["red"]))
    assert ids == run.image_prompt(ask(pictures["red"]))[0] and len(images) == 1
    with pytest.raises(ImageError, match=r"^messages\[0\]\.images\[0\]: https://example\.com/a\.png: remote image "
                                         "URLs are not fetched"):
        run.image_prompt(ask("https://example.com/a.png"))


def test_a_text_row_with_a_literal_placeholder_never_breaks_an_image_row(runs, pictures):
    """A text message holding the literal ``<image>`` (no image) would put an image token without
    pixels in the batch: refused before decoding, as training drops such a row."""
    run = runs("llava")
    stray = [{"role": "user", "content": "What is an <image> tag in HTML?"}]
    with pytest.raises(ImageError, match="the text holds the model's image token <image> but no image is attached"):
        answer(run, [stray], **GREEDY)
    try:
        seqs = answer(run, [ask(pictures["red"]), stray], **GREEDY)
    except ImageError:
        return  # refused up front: fine
    assert seqs[0].generated == answer(run, [ask(pictures["red"])], **GREEDY)[0].generated


def test_a_freeze_run_answers_with_images(runs, run_dirs, pictures):
    run = runs("llava-freeze")
    assert run.vision is not None and run.vision.model_type == "llava"
    from safetensors.torch import load_file

    trained = load_file(str(run_dirs("llava-freeze") / "model.safetensors"))
    weights = dict(run.model.named_parameters())
    assert trained and all(torch.equal(weights[name].detach().cpu(), tensor) for name, tensor in trained.items())
    seqs = answer(run, [ask(pictures["red"]), [{"role": "user", "content": "Hi"}]], **GREEDY)
    assert [len(s.generated) for s in seqs] == [6, 6]


def test_a_text_model_refuses_an_image_message(tiny_vlms, tmp_path, pictures):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    folder = tmp_path / "text-model"  # the tiny llava's language model alone, with its tokenizer
    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(tiny_vlms("llava")).text_config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_vlms("llava")).save_pretrained(folder)
    run = load_run(str(folder))
    assert run.vision is None
    with pytest.raises(ImagesNotSupported, match="this model reads no images"):
        answer(run, [ask(pictures["red"])], max_new_tokens=2)
    with pytest.raises(ImagesNotSupported):
        conversation_sequence(run, run.profile(), ask(pictures["red"]), sampling_params(run.profile()))
    assert len(answer(run, [[{"role": "user", "content": "Hi"}]], max_new_tokens=2)[0].generated) >= 1
