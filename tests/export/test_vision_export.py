"""``chattune export`` of a vision-language run: the whole model (vision tower, projector, merged
language model) and its processor, loaded by transformers alone, equal to the run on a prompt
with an image; the image probe in the export check; GGUF refused (llama.cpp needs an mmproj file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chattune.cli import main
from chattune.config_io import load_config
from chattune.export.model import ExportError, export_run
from chattune.export.vision import probe_image
from chattune.inference.runs import load_run
from chattune.training.recipe import train

QUESTION = [{"role": "user", "content": "<image>What colour is it?"}]


def _train(model: Path, data: Path, out: Path, method: str) -> Path:
    overrides = [f"model_name_or_path={model}", f"train_files=[{data}]", "max_steps=3", "save_steps=3",
                 "learning_rate=5e-2", "per_device_train_batch_size=4", "max_seq_length=96", f"method={method}",
                 f"output_dir={out}", "report_to=[none]", f"cache_dir={out.parent / 'cache'}"]
    return train(load_config(None, overrides), log=lambda *_: None).output_dir


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("vision-export")


@pytest.fixture(scope="module")
def runs(tiny_vlms, image_data, root):
    """(arch, method) -> a run folder, trained on first use."""
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, method: str) -> Path:
        if (arch, method) not in made:
            made[arch, method] = _train(tiny_vlms(arch), image_data, root / f"{arch}-{method}", method)
        return made[arch, method]

    return get


def _image() -> object:
    from PIL import Image

    return Image.new("RGB", (44, 36), (30, 180, 30))


@torch.no_grad()
def run_logits(run_dir: Path, image) -> tuple[list[int], torch.Tensor]:
    """The run's prompt ids for QUESTION with ``image`` and its logits there, as chattune computes them."""
    run = load_run(str(run_dir))
    ids, shown = run.image_prompt([{**QUESTION[0], "images": [image]}])
    pixels = run.vision.pixels(shown)
    return ids, run.model(input_ids=torch.tensor([ids]), **pixels).logits[0].float()


@torch.no_grad()
def export_logits(folder: Path, image) -> tuple[list[int], torch.Tensor]:
    """The ids and logits of QUESTION with ``image`` through transformers alone: the exported
    processor on the exported chat template's text, the model by AutoModelForImageTextToText."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    text = processor.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)
    return inputs["input_ids"][0].tolist(), model(**inputs).logits[0].float()


@pytest.mark.parametrize(("arch", "method"), [("llava", "lora"), ("llava", "freeze"), ("llava", "full"),
                                              ("idefics3", "lora")])
def test_export_loads_with_transformers_and_equals_the_run_on_an_image(runs, root, arch, method, capsys):
    run_dir = runs(arch, method)
    out = root / f"{arch}-{method}-export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 image probe" in printed and "give chattune's ids" in printed
    assert (out / "processor_config.json").is_file() and not (out / "adapter_config.json").exists()
    check = json.loads((out / "export_check.json").read_text())
    assert check["passed"] and check["probes"] == 4 and check["image_probes"] == 1
    assert check["image_prompt_matches"] and check["chat_template_matches"]
    assert json.loads((out / "config.json").read_text())["vision_config"]

    image = _image()
    ours, logits = run_logits(run_dir, image)
    theirs, exported = export_logits(out, image)
    assert theirs == ours
    assert (exported - logits).abs().max().item() < 1e-4
    _, other = run_logits(run_dir, probe_image())
    assert (other - logits).abs().max().item() > 1e-3  # the image matters: the check sees the pixels


def test_a_freeze_run_s_projector_is_in_the_export(runs, tiny_vlms, root):
    """freeze trains the projector alone: only a prompt with an image shows it, and the export has it."""
    base_ids, base = run_logits(tiny_vlms("llava"), _image())
    out = root / "llava-freeze-projector"
    export_run(str(runs("llava", "freeze")), str(out), log=lambda *_: None)
    ids, exported = export_logits(out, _image())
    assert ids == base_ids
    assert (exported - base).abs().max().item() > 1e-3


def test_a_changed_image_processor_fails_the_check(runs, root, monkeypatch):
    """The image probe reads the exported processor: an image processor whose settings changed on
    the way gives other pixels, and the export fails, leaving nothing."""
    import chattune.export.model as export

    real = export.write_processor

    def skewed(vision, folder):
        real(vision, folder)
        path = folder / "processor_config.json"
        config = json.loads(path.read_text())
        config["image_processor"]["image_mean"] = [0.1, 0.9, 0.1]
        path.write_text(json.dumps(config))

    monkeypatch.setattr(export, "write_processor", skewed)
    out = root / "skewed"
    with pytest.raises(ExportError, match="export check failed"):
        export_run(str(runs("llava", "lora")), str(out), log=lambda *_: None)
    assert not out.exists() and not list(root.glob("tmp-skewed-*"))


def test_gguf_of_a_vision_language_model_is_refused_in_one_line(runs, root, capsys):
    out = root / "llava-gguf"
    assert main(["export", str(runs("llava", "lora")), "--out", str(out), "--gguf", "f16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("chattune: error: --gguf: ") and "vision-language run" in err[-1]
    assert "mmproj" in err[-1] and "export without --gguf" in err[-1]
    assert not out.exists()  # refused before anything is exported


def test_chattune_answers_with_the_export_as_with_the_run(runs, image_data, root):
    from chattune.inference.generate import generate
    from chattune.predict import predict_file

    run_dir = runs("llava", "lora")
    out = root / "llava-lora-answers"
    export_run(str(run_dir), str(out), log=lambda *_: None)
    loaded = {"run": load_run(str(run_dir)), "export": load_run(str(out))}
    assert loaded["export"].vision is not None
    predicted = {}
    for name, run in loaded.items():
        predict_file(run, str(image_data), str(root / f"{name}.jsonl"), max_new_tokens=6, log=lambda *_: None)
        predicted[name] = [json.loads(line)["prediction"] for line in (root / f"{name}.jsonl").read_text().splitlines()]
    assert predicted["run"] == predicted["export"] and len(predicted["run"]) == 12
    asked = [{**QUESTION[0], "images": [probe_image()]}]
    answers = [generate(run, [asked], max_new_tokens=6, do_sample=False) for run in loaded.values()]
    assert answers[0] == answers[1]
