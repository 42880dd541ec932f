"""The manifest: typed, written and read back unchanged, and errors that name the key."""

from __future__ import annotations

import json

import pytest

from chattune.config_io import build_config
from chattune.errors import ManifestError
from chattune.manifest import (
    MANIFEST_NAME,
    Manifest,
    build_manifest,
    read_manifest,
    verify_base_model,
    verify_template,
    write_run_files,
)
from chattune.model import base_model_fingerprint, load_tokenizer
from chattune.templates.registry import template_provenance


@pytest.fixture
def made(tiny_models, tmp_path):
    base = tiny_models("glm4")
    tokenizer = load_tokenizer(str(base))
    config = build_config({"model_name_or_path": str(base), "method": "ptuning", "pre_seq_len": 6,
                           "max_seq_length": 77, "max_new_tokens": 9, "output_dir": str(tmp_path / "run")})
    manifest = build_manifest(config, base_model_fingerprint(str(base), tokenizer=tokenizer), "alpaca",
                              tokenizer, "f" * 16)
    return base, tokenizer, config, manifest


def test_what_a_manifest_records(made):
    base, tokenizer, _, manifest = made
    assert manifest.method == "ptuning"
    assert manifest.method_settings == {"pre_seq_len": 6, "prefix_projection": False, "prefix_hidden_size": 512}
    assert manifest.max_seq_length == 77 and manifest.generation.max_new_tokens == 9
    assert manifest.template.name == "alpaca"
    assert manifest.template.probe_rendering == template_provenance("alpaca", tokenizer)["probe_rendering"]
    assert manifest.base_model.path == str(base.resolve()) and manifest.base_model.model_type == "glm4"


def test_written_and_read_back_unchanged(made, tmp_path):
    _, _, config, manifest = made
    write_run_files(tmp_path, manifest, config, {"global_step": 5, "eval_loss": 1.5})
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert data["method"] == {"name": "ptuning", "pre_seq_len": 6, "prefix_projection": False,
                              "prefix_hidden_size": 512}
    assert data["global_step"] == 5 and data["generation"]["max_new_tokens"] == 9
    back = read_manifest(tmp_path)
    assert back.results == {"global_step": 5, "eval_loss": 1.5}
    assert back.to_json() == data
    assert (tmp_path / "chattune.yaml").is_file()


def test_checks_against_the_base_model_and_template(made):
    base, tokenizer, _, manifest = made
    assert verify_base_model(manifest, str(base)) == [] and verify_template(manifest, tokenizer) == []


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("base_model"), "base_model: expected an object"),
    (lambda d: d["base_model"].pop("tokenizer_sha256"), "base_model.tokenizer_sha256: missing"),
    (lambda d: d["template"].pop("probe_rendering"), "template.probe_rendering: missing"),
    (lambda d: d["method"].pop("name"), "method.name: expected the method's name"),
    (lambda d: d.update(max_seq_length="long"), "max_seq_length: expected int"),
    (lambda d: d.update(generation=None), "generation: expected an object"),
    (lambda d: d["base_model"].update(path=5), "base_model.path: expected str, got 5"),
    (lambda d: d["base_model"].update(config_sha256=5), "base_model.config_sha256: expected str"),
    (lambda d: d["template"].update(stop_strings="</s>"), "template.stop_strings: expected tuple"),
    (lambda d: d["generation"].update(max_new_tokens="abc"), "generation.max_new_tokens: expected int"),
    (lambda d: d["generation"].update(temperature="hot"), "generation.temperature: expected float"),
    (lambda d: d["generation"].update(do_sample=1), "generation.do_sample: expected bool"),
    (lambda d: d["generation"].update(max_new_tokens=-3), "generation.max_new_tokens: must be >= 1"),
])
def test_a_broken_manifest_names_the_key(made, tmp_path, change, message):
    _, _, config, manifest = made
    write_run_files(tmp_path, manifest, config)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    change(data)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ManifestError, match="no such run folder"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(ManifestError, match="not a chattune run folder"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError, match="expected a JSON object"):
        Manifest.from_json([1, 2])


def test_a_run_folder_from_before_the_alpaca_rename_still_loads_and_renders_as_trained(
        tiny_models, data_file, tmp_path):
    """Until chattune 0.2 ``alpaca`` named the tutorial's variant (now ``tutorial-alpaca``). A run
    folder written then records ``alpaca`` with that rendering: it loads without a drift error
    and renders its prompts exactly as it was trained."""
    from chattune.config_io import load_config
    from chattune.data.encode import PieceEncoder, encode_prompt
    from chattune.inference.runs import load_run
    from chattune.manifest import recorded_template
    from chattune.training.recipe import train

    base = tiny_models("glm4")
    run = train(load_config(None, [f"model_name_or_path={base}", f"train_files=[{data_file}]", "max_steps=2",
                                   "save_steps=2", "template=tutorial-alpaca", f"output_dir={tmp_path / 'run'}",
                                   "report_to=[none]", f"cache_dir={tmp_path / 'cache'}"]),
                log=lambda *_: None).output_dir
    path = run / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["template"]["name"] = "alpaca"  # as the older chattune wrote it: same rendering, the old name
    data["template"]["source"] = "mymusise/ChatGLM-Tuning cover_alpaca2jsonl.py (the tutorial's text format)"
    path.write_text(json.dumps(data))
    tokenizer = load_tokenizer(str(base))
    old = read_manifest(run)
    assert recorded_template(old, tokenizer) == "tutorial-alpaca"
    assert verify_template(old, tokenizer) == []
    loaded = load_run(str(run))
    assert loaded.profile().template == "tutorial-alpaca"
    question = [{"role": "user", "content": "Give three tips."}]
    expected = encode_prompt(question, "tutorial-alpaca", PieceEncoder(tokenizer))
    assert loaded.prompt_ids(question) == expected
    assert "### Instruction:\n" in tokenizer.decode(expected) and "Below is an instruction" not in tokenizer.decode(expected)


def test_a_recorded_name_keeps_its_meaning_when_its_rendering_matches(made):
    """A run trained with today's ``alpaca`` (Stanford's prompt) stays ``alpaca``."""
    from chattune.manifest import recorded_template

    _, tokenizer, _, manifest = made
    assert recorded_template(manifest, tokenizer) == "alpaca"
