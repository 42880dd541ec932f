"""load_run: a run folder (or a bare base model) ready to answer, and what stops a wrong load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from chattune.cli import main
from chattune.config import GenerateArgs
from chattune.errors import ConfigError, ManifestError, ModelLoadError
from chattune.inference.decoding import BASE_ADAPTER
from chattune.inference.runs import LoadOptions, load_run
from tests.inference.test_generate import run_dir  # noqa: F401  (the module's trained run)

ASK = [{"role": "user", "content": "Who are you?"}]


def test_a_run_answers_under_its_name_and_the_base_beside_it(run_dir):  # noqa: F811
    run = load_run(str(run_dir))
    assert list(run.profiles) == [run_dir.name, "base"] and run.default == run_dir.name
    tuned, base = run.profile(), run.profile("base")
    assert tuned.adapter == "a0" and base.adapter == BASE_ADAPTER and run.uses_adapters
    assert tuned.template == tuned.manifest.template.name and tuned.run_dir == run_dir
    assert run.tokenizer.eos_token_id in tuned.stop_token_ids
    assert run.context_length == run.model.config.max_position_embeddings
    ids = torch.tensor([run.prompt_ids(ASK)])
    with torch.no_grad():
        with_adapter = run.model(input_ids=ids, adapter_names=["a0"]).logits
        without = run.model(input_ids=ids, adapter_names=[BASE_ADAPTER]).logits
    assert not torch.allclose(with_adapter, without)  # the trained adapter is on


def test_a_bare_base_model(tiny_models):
    run = load_run(str(tiny_models("glm4")))
    assert list(run.profiles) == ["base"] and not run.uses_adapters
    assert run.profile().template == "tokenizer" and run.profile().run_dir is None
    assert run.profile().generation == GenerateArgs()


def test_a_bare_model_answers_under_the_name_given(tiny_models):
    """``chattune serve EXPORT --name X``: an exported model (a bare folder) is served as X."""
    run = load_run(str(tiny_models("glm4")), LoadOptions(name="my-model"))
    assert list(run.profiles) == ["my-model"] and run.default == "my-model" and run.profile().adapter == BASE_ADAPTER
    with pytest.raises(ConfigError, match="without spaces"):
        load_run(str(tiny_models("glm4")), LoadOptions(name="my model"))


def test_the_template_can_be_overridden(run_dir):  # noqa: F811
    run = load_run(str(run_dir), LoadOptions(template="tutorial-alpaca"))
    assert run.profile().template == "tutorial-alpaca"
    text = run.tokenizer.decode(run.prompt_ids(ASK))
    assert text.endswith("### Instruction:\nWho are you?\n\n### Response:\n")


def test_a_different_base_model_stops_the_load_unless_forced(run_dir, tmp_path):  # noqa: F811
    from chattune.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "glm4", hidden_size=64, num_layers=3)
    with pytest.raises(ManifestError, match="(?s)differs from the one the adapter was trained on.*--force"):
        load_run(str(run_dir), LoadOptions(base_model=str(other)))
    assert main(["predict", str(run_dir), "--base-model", str(other), "--data", "x", "--out", "y"]) == 2


def test_a_changed_base_model_config_is_detected(run_dir, tiny_models, tmp_path):  # noqa: F811
    copy = tmp_path / "base-copy"
    shutil.copytree(tiny_models("glm4"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ManifestError, match="config .* differs"):
        load_run(str(run_dir), LoadOptions(base_model=str(copy)))
    warnings = []
    run = load_run(str(run_dir), LoadOptions(base_model=str(copy), force=True), warn=warnings.append)
    assert warnings and "differs" in warnings[0] and run.profile().adapter == "a0"


def test_template_drift_is_detected(run_dir, tmp_path):  # noqa: F811
    drifted = tmp_path / "drifted"
    shutil.copytree(run_dir, drifted)
    manifest = json.loads((drifted / "chattune.json").read_text())
    manifest["template"]["probe_rendering"] = "something else"
    (drifted / "chattune.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="template drift"):
        load_run(str(drifted))
    assert load_run(str(drifted), LoadOptions(template=manifest["template"]["name"])).profile().template


def test_not_a_run_folder(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "missing")]) == 2
    assert "no such run folder or model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load"):
        load_run(str(tmp_path / "empty"))


def test_a_broken_manifest_names_the_key(run_dir, tmp_path, capsys):  # noqa: F811
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    manifest = json.loads((broken / "chattune.json").read_text())
    del manifest["base_model"]["config_sha256"]
    (broken / "chattune.json").write_text(json.dumps(manifest))
    assert main(["chat", str(broken)]) == 2
    assert "base_model.config_sha256: missing" in capsys.readouterr().err
    manifest["base_model"]["config_sha256"] = "0" * 64
    manifest["method"]["name"] = "magic"
    (broken / "chattune.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="method 'magic' is not supported"):
        load_run(str(broken))
    (broken / "chattune.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_run(str(broken))


@pytest.mark.parametrize(("folder", "name"), [("base", "run"), ("my run", "my-run")])
def test_a_run_folder_s_name_becomes_a_usable_model_name(run_dir, tmp_path, folder, name):  # noqa: F811
    copy = tmp_path / folder
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    assert list(load_run(str(copy)).profiles) == [name, "base"]


def _copy(source, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    return copy


def test_broken_trained_weights_are_a_manifest_error(run_dir, tmp_path, capsys):  # noqa: F811
    copy = _copy(run_dir, tmp_path)
    (copy / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ManifestError, match=r"copy: could not load its trained weights \(lora\)"):
        load_run(str(copy))
    (copy / "adapter_config.json").unlink()
    assert main(["predict", str(copy), "--data", "x.json", "--out", str(tmp_path / "p.jsonl")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("chattune: error:") and "could not load its trained weights" in last


@pytest.mark.parametrize("flag", [["--batch-size", "0"], ["--max-new-tokens", "0"], ["--top-p", "1.5"],
                                  ["--repetition-penalty", "0"], ["--top-k", "-1"], ["--temperature", "-1"]])
def test_impossible_flags_are_refused_before_loading(run_dir, tmp_path, capsys, flag):  # noqa: F811
    data = tmp_path / "in.json"
    data.write_text('[{"instruction": "hi", "output": "x"}]')
    assert main(["predict", str(run_dir), "--data", str(data), "--out", str(tmp_path / "p.jsonl"), *flag]) == 2
    assert flag[0] in capsys.readouterr().err



@pytest.fixture(scope="module")
def bare_run(tiny_models):
    """The tiny GLM-4 model loaded bare (its tokenizer's chat template)."""
    return load_run(str(tiny_models("glm4")))


def test_prompt_ids_are_encode_prompt_s_and_stop_counting_past_most(bare_run, monkeypatch):
    from chattune.data.encode import PieceEncoder, encode_prompt
    from chattune.inference.runs import PIECES_PER_LOCK, PromptTooLong

    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(401)]
    ids = bare_run.prompt_ids(messages)
    assert ids == encode_prompt(messages, "tokenizer", PieceEncoder(bare_run.tokenizer)) and len(ids) > 1000
    tokenized = []
    ids_of = bare_run.encoder.ids_of
    monkeypatch.setattr(bare_run.encoder, "ids_of", lambda pieces: tokenized.append(len(pieces)) or ids_of(pieces))
    with pytest.raises(PromptTooLong) as info:
        bare_run.prompt_ids(messages, most=100)
    assert 100 < info.value.tokens < len(ids) and tokenized == [PIECES_PER_LOCK]


@pytest.mark.parametrize("text", ["x" * 5000, "a b\tc\n" * 700, "漢字かな" * 300, "e\u0301" * 900, "\ufb01" * 900,
                                  "<|user|><|assistant|>" * 100, "🙂" * 500, " " * 5000 + "hi"])
def test_fewest_prompt_tokens_is_a_lower_bound(bare_run, text):
    from chattune.inference.runs import make_served_model

    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": text, "input": text}]
    fewest = bare_run.fewest_prompt_tokens(messages)
    assert fewest > 0
    for template in ("tokenizer", "default", "alpaca", "chatglm2"):
        profile = make_served_model("base", bare_run.tokenizer, template, bare_run.profile().generation)
        assert fewest <= len(bare_run.prompt_ids(messages, profile)), template
