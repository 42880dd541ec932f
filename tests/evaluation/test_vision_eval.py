"""``chattune eval`` on rows with images: answered with their images, the references' loss over
their pixels as training measures it, ``--compare base`` on a vision-language LoRA run, and rows
with images on a text-only model counted as unusable, not a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chattune.config_io import load_config
from chattune.data.images import NOT_VISION  # noqa: E402
from chattune.evaluation import evaluate as ev
from chattune.inference.generate import generate
from chattune.inference.runs import load_run
from chattune.training.recipe import train
from tests.evaluation.test_evaluate import cli, read_json, read_jsonl, write_jsonl


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision-eval")


@pytest.fixture(scope="module")
def lora(tiny_vlms, image_data, root):
    """A LoRA run of the tiny LLaVA on the image rows, evaluated by training on all of them."""
    overrides = [f"model_name_or_path={tiny_vlms('llava')}", f"train_files=[{image_data}]",
                 f"eval_files=[{image_data}]", "method=lora", "max_steps=4", "save_steps=4", "eval_steps=4",
                 "learning_rate=2e-2", "per_device_train_batch_size=4", "per_device_eval_batch_size=3",
                 "max_seq_length=96", "max_new_tokens=4", f"output_dir={root / 'lora'}", "report_to=[none]",
                 f"cache_dir={root / 'cache'}"]
    return train(load_config(None, overrides), log=lambda *_: None)


@pytest.fixture(scope="module")
def compared(lora, image_data, root):
    """``chattune eval RUN --data IMAGES --compare base --out X``: (its folder, stdout)."""
    out = root / "compare"
    code, stdout, err = cli("eval", lora.output_dir, "--data", image_data, "--compare", "base", "--out", out,
                            "--batch-size", "5")
    assert code == 0, err
    return out, stdout


def test_image_rows_are_answered_with_their_images(lora, compared, image_data):
    out, stdout = compared
    rows = read_jsonl(out / "eval_rows.jsonl")
    data = json.loads(image_data.read_text())
    assert len(rows) == len(data) == 12 and "12 rows: 12 scored" in stdout
    assert [r["images"] for r in rows] == [[str(image_data.parent / d["images"][0])] for d in data]
    assert [r["label"] for r in rows] == [d["messages"][1]["content"] for d in data]
    run = load_run(str(lora.output_dir))
    examples = ev.read_eval_data(str(image_data)).examples
    assert examples[0].messages == [{"role": "user", "content": "<image>What colour is it?",
                                     "images": [str(image_data.parent / "img" / "0.png")]}]
    for start in (0, 5, 10):  # batched as eval batches them
        batch = examples[start:start + 5]
        assert [r["predict"] for r in rows[start:start + 5]] == generate(
            run, [e.messages for e in batch], max_new_tokens=4, do_sample=False)


def test_the_loss_over_image_rows_is_training_s(lora, compared):
    out, _ = compared
    figures = read_json(out / "eval.json")["metrics"]
    assert lora.eval_loss is not None
    assert figures["eval_loss"] == pytest.approx(lora.eval_loss, abs=1e-5)
    supervised = sum(sum(label != -100 for label in labels[1:]) for labels in lora.prepared.eval["labels"])
    assert figures["eval_tokens"] == supervised


def test_the_loss_reads_the_pixels(lora, image_data, root):
    """The same rows with other images: another loss (the pixels reach the model)."""
    from PIL import Image

    data = json.loads(image_data.read_text())
    (root / "grey").mkdir()
    Image.new("RGB", (40, 36), (128, 128, 128)).save(root / "grey" / "g.png")
    grey = write_jsonl(root / "grey" / "rows.jsonl", [{**d, "images": ["g.png"]} for d in data])
    run = load_run(str(lora.output_dir))
    profile = run.profile()
    theirs = ev.reference_loss(run, profile, ev.read_eval_data(str(grey)), max_seq_length=96)
    ours = ev.reference_loss(run, profile, ev.read_eval_data(str(image_data)), max_seq_length=96)
    assert ours[1] == theirs[1] and ours[0] == pytest.approx(lora.eval_loss, abs=1e-5)
    assert abs(ours[0] - theirs[0]) > 1e-5


def test_compare_base_on_image_rows(lora, compared):
    out, stdout = compared
    result = read_json(out / "eval.json")
    other = result["compare"]
    assert other["name"] == "base"
    assert other["better"]["rouge-l"] + other["worse"]["rouge-l"] + other["same"]["rouge-l"] == 12
    assert other["metrics"]["eval_loss"] != result["metrics"]["eval_loss"]  # the adapter and projector trained
    assert len(read_jsonl(out / "compare_rows.jsonl")) == 12 and "better / worse / same" in stdout


def test_image_rows_on_a_text_only_model_are_unusable_rows(tiny_models, image_data, tmp_path):
    data = [{**d, "images": [str(image_data.parent / d["images"][0])]} for d in json.loads(image_data.read_text())]
    text = [{"instruction": "Who are you?", "output": "I am Lumi."}, {"instruction": "Hi", "output": "Hello."}]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", data[:3] + text)
    code, stdout, err = cli("eval", tiny_models("glm4"), "--data", mixed, "--out", tmp_path / "mixed",
                            "--max-new-tokens", "2")
    assert code == 0, err
    result = read_json(tmp_path / "mixed" / "eval.json")
    assert result["data"]["rows"] == 5 and result["data"]["scored"] == 2 and result["data"]["unreadable"] == 3
    assert result["data"]["unreadable_reasons"][0] == f"{mixed}:1: {NOT_VISION}"
    assert "5 rows: 2 scored, 0 without a reference, 3 unreadable" in stdout
    assert len(read_jsonl(tmp_path / "mixed" / "eval_rows.jsonl")) == 2

    code, _, err = cli("eval", tiny_models("glm4"), "--data", image_data, "--out", tmp_path / "only")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"chattune: error: {image_data}: nothing to evaluate: every "
                                                   "usable row has images and the model reads none")


def test_the_generation_sample_leaves_image_rows_out():
    """eval_generate prompts with token ids alone: a row with images (its prompt needs its pixels)
    is never in the sample."""
    from datasets import Dataset

    from chattune.evaluation.evaluate import sample_rows

    rows = Dataset.from_dict({"input_ids": [[5, 6, 7], [1, 2, 3]], "labels": [[-100, 6, 7], [-100, 2, 3]],
                              "images": [["/a.png"], []]})
    assert sample_rows(rows, 2, seed=0) == [([1], [2, 3])]
