"""Training a vision-language model end to end on tiny random LLaVA and Idefics3 models: the run
folder, what each method changes, the image collator, and the refusals (packing, stages)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.config_io import load_config
from chattune.data.prepare import prepare_data
from chattune.errors import ConfigError, DataError
from chattune.training.collate import ImageCollator
from chattune.training.recipe import image_batching, train
from chattune.vision.images import load_image
from chattune.vision.processor import load_vision, vision_parts


def vlm_config(model: Path, data: list[Path], out: Path, **overrides):
    values = {
        "model_name_or_path": str(model), "train_files": [str(p) for p in data], "max_seq_length": 96,
        "output_dir": str(out), "cache_dir": str(out.parent / "cache"), "per_device_train_batch_size": 4,
        "max_steps": 2, "save_steps": 100, "logging_steps": 1, "learning_rate": 1e-2, "seed": 7,
        "report_to": ["none"],
    }
    values.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()])


def base_model(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path)


@pytest.fixture(scope="module")
def text_rows(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text-rows") / "text.json"
    path.write_text(json.dumps([{"instruction": f"Count to {i}", "output": " ".join(map(str, range(1, i + 2)))}
                                for i in range(4)]))
    return path


@pytest.fixture(scope="module")
def runs(tiny_vlms, image_data, text_rows, tmp_path_factory):
    """(arch, method) -> (TrainResult, the lines it logged), trained once per module: llava
    lora and freeze on the image rows, idefics3 lora on image rows mixed with text rows, and
    idefics3 full."""
    done = {}

    def get(arch: str, method: str):
        if (arch, method) not in done:
            out = tmp_path_factory.mktemp(f"{arch}-{method}") / "run"
            data = [image_data, text_rows] if (arch, method) == ("idefics3", "lora") else [image_data]
            lines: list[str] = []
            config = vlm_config(tiny_vlms(arch), data, out, method=method,
                                per_device_train_batch_size=8 if len(data) > 1 else 4)
            done[arch, method] = (train(config, log=lambda *parts: lines.append(" ".join(map(str, parts)))), lines)
        return done[arch, method]

    return get


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_a_lora_run_folder_is_written(arch, runs):
    result, lines = runs(arch, "lora")
    out = result.output_dir
    assert result.global_step == 2 and result.train_loss > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "chattune.json", "chattune.yaml",
                 "data_audit.json", "metrics.jsonl", "processor_config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "chattune.json").read_text())
    assert manifest["vision"] == {"model_type": arch, "image_token": "<image>", "projector": "trained",
                                  "vision_tower": "frozen"}
    audit = json.loads((out / "data_audit.json").read_text())
    assert audit["train"]["rows_with_images"] == 12 and audit["train"]["images"] == 12
    assert audit["batching"]["images"] is True and audit["batching"]["mode"] == "group_by_length"
    assert any(line.startswith("packing: not packing (rows carry images") for line in lines)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(loss == loss for loss in losses)


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_lora_trains_the_projector_and_never_the_tower(arch, runs, tiny_vlms):
    result, _ = runs(arch, "lora")
    saved = load_file(str(result.output_dir / "adapter_model.safetensors"))
    base = base_model(tiny_vlms(arch))
    parts = vision_parts(base)
    leaf = parts.projector.rsplit(".", 1)[-1]
    projector = {name: tensor for name, tensor in saved.items() if f".{leaf}." in name}
    lora = [name for name in saved if "lora_" in name]
    assert projector and lora and sorted([*projector, *lora]) == sorted(saved)
    assert not any("vision" in name for name in saved)
    weights = dict(base.named_parameters())
    changed = 0
    for name, tensor in projector.items():
        base_name = parts.projector + "." + name.split(f".{leaf}.", 1)[1]
        assert tensor.shape == weights[base_name].shape
        changed += not torch.equal(tensor, weights[base_name].detach())
    assert changed == len(projector)  # the gradient reached every projector tensor


def test_a_freeze_run_changes_only_the_projector(runs, tiny_vlms):
    result, lines = runs("llava", "freeze")
    base = dict(base_model(tiny_vlms("llava")).named_parameters())
    trained = dict(result.model.named_parameters())
    assert set(trained) == set(base)
    changed = sorted(name for name in base if not torch.equal(trained[name].detach(), base[name].detach()))
    projector = sorted(name for name in base if name.startswith("model.multi_modal_projector."))
    assert changed == projector
    assert sorted(load_file(str(result.output_dir / "model.safetensors"))) == projector
    assert json.loads((result.output_dir / "freeze_config.json").read_text()) == {"trained_tensors": projector}
    assert any(line.startswith("method freeze: 6,272 trainable") for line in lines)


def test_a_full_run_keeps_the_vision_tower(runs, tiny_vlms):
    result, _ = runs("idefics3", "full")
    out = result.output_dir
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert load_vision(str(out)) is not None  # the processor is saved with the model
    base = dict(base_model(tiny_vlms("idefics3")).named_parameters())
    trained = dict(base_model(out).named_parameters())
    changed = {name for name in base if not torch.equal(trained[name], base[name])}
    assert not any(name.startswith("model.vision_model.") for name in changed)
    assert "model.connector.modality_projection.proj.weight" in changed
    assert any(name.startswith("model.text_model.layers.") for name in changed)


def test_image_and_text_rows_train_together(runs):
    result, _ = runs("idefics3", "lora")
    audit = json.loads((result.output_dir / "data_audit.json").read_text())["train"]
    assert audit["rows_out"] == 16 and audit["rows_with_images"] == 12
    assert result.global_step == 2


@pytest.mark.parametrize("packing", ["pack", "padding_free"])
def test_packing_rows_with_images_is_a_config_error(packing, tiny_vlms, image_data, tmp_path):
    config = vlm_config(tiny_vlms("llava"), [image_data], tmp_path / "run", packing=packing)
    with pytest.raises(ConfigError, match=rf"packing: {packing} is not possible with rows that carry images; "
                                          "use packing=auto, group_by_length or pad"):
        train(config, log=lambda *_: None)


def test_image_batching_modes():
    said = []
    config = load_config(None, [])
    assert config.data.packing == "auto"
    assert image_batching(config, said.append) == "group_by_length"
    assert said == ["packing: not packing (rows carry images, each row's image tokens meet its own pixels); "
                    "batching rows grouped by length instead"]
    for wanted in ("pad", "group_by_length"):
        assert image_batching(load_config(None, [f"packing={wanted}"]), said.append) == wanted
    assert len(said) == 1


def test_a_stage_other_than_sft_is_refused(tiny_vlms, image_data, tmp_path):
    config = vlm_config(tiny_vlms("llava"), [image_data], tmp_path / "run", stage="dpo")
    with pytest.raises(ConfigError, match=r"is a vision-language model; stage dpo is not supported with one yet"):
        train(config, log=lambda *_: None)


def test_training_with_an_eval_split_evaluates(tiny_vlms, image_data, tmp_path):
    # rows grouped by length (packing auto): the eval sampler must find the rows' lengths (with
    # the processor as the Trainer's processing_class, transformers looked for 'pixel_values')
    config = vlm_config(tiny_vlms("llava"), [image_data], tmp_path / "run", eval_fraction=0.25)
    result = train(config, log=lambda *_: None)
    assert result.eval_loss is not None and result.eval_loss == result.eval_loss


def test_training_with_an_eval_split_and_padding(tiny_vlms, image_data, tmp_path):
    config = vlm_config(tiny_vlms("llava"), [image_data], tmp_path / "run", eval_fraction=0.25, packing="pad")
    result = train(config, log=lambda *_: None)
    assert result.eval_loss is not None and result.eval_loss == result.eval_loss
    assert result.prepared.eval is not None and "images" in result.prepared.eval.column_names


# ---- the collator ----

@pytest.fixture(scope="module")
def prepared(tiny_vlms, image_data, tmp_path_factory):
    """arch -> (VisionProcessor, tokenizer, encoded image_data)."""
    from chattune.config import DataArgs, DataSource
    from chattune.model import load_tokenizer

    made = {}

    def get(arch):
        if arch not in made:
            vision = load_vision(str(tiny_vlms(arch)))
            tokenizer = load_tokenizer(str(tiny_vlms(arch)))
            data = DataArgs(train_files=[DataSource(str(image_data))], cache_dir=str(tmp_path_factory.mktemp("c")))
            made[arch] = (vision, tokenizer, prepare_data(data, tokenizer, "tokenizer", 42, vision=vision))
        return made[arch]

    return get


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_image_collator_batches_each_rows_pixels_in_order(arch, prepared):
    vision, tokenizer, data = prepared(arch)
    rows = [data.train[i] for i in (4, 1, 7)]
    text = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "images": []}
    batch = ImageCollator(tokenizer.pad_token_id, vision)([rows[0], text, rows[1], rows[2]])
    longest = max(len(r["input_ids"]) for r in rows)
    assert tuple(batch["input_ids"].shape) == (4, longest)
    assert batch["attention_mask"][1].sum() == 3
    images = [load_image(row["images"][0], "t") for row in rows]
    expected = vision.pixels(images)
    assert set(batch) == {"input_ids", "labels", "attention_mask", *expected}
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key
    pixels = batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[-3:])
    assert pixels.shape[0] == 3  # one image per image row
    for i, image in enumerate(images):  # row order: each image where its row is
        assert torch.equal(pixels[i], vision.pixels([image])["pixel_values"].reshape(-1, *pixels.shape[-3:])[0])


def test_image_collator_without_images_is_a_plain_batch(prepared):
    vision, tokenizer, _ = prepared("llava")
    batch = ImageCollator(tokenizer.pad_token_id, vision)([{"input_ids": [1, 2], "labels": [1, 2], "images": []}])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


def test_image_collator_says_when_an_image_is_gone(prepared, tmp_path):
    vision, tokenizer, data = prepared("llava")
    row = dict(data.train[0])
    copy = tmp_path / "copy.png"
    shutil.copyfile(row["images"][0], copy)
    row["images"] = [str(copy)]
    collate = ImageCollator(tokenizer.pad_token_id, vision)
    assert "pixel_values" in collate([row])
    copy.unlink()
    with pytest.raises(DataError) as caught:
        collate([row])
    assert str(caught.value) == f"training data: image {copy} not found; it was readable when the data was encoded"


def test_image_collator_refuses_tokens_that_no_longer_match(prepared):
    vision, tokenizer, data = prepared("llava")
    row = dict(data.train[0])
    first = row["input_ids"].index(vision.image_token_id)
    row["input_ids"] = row["input_ids"][:first] + row["input_ids"][first + 1:]
    row["labels"] = row["labels"][:first] + row["labels"][first + 1:]
    with pytest.raises(DataError, match="their image tokens differ from those encoded"):
        ImageCollator(tokenizer.pad_token_id, vision)([row])
