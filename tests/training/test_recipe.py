"""End to end on tiny models: train, checkpoints as run folders, adapters that load and
matter, exact resume, and the refusals that protect a user's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.config_io import load_config
from chattune.errors import ConfigError
from chattune.training.recipe import train


def make_config(model: Path, data: Path, out: Path, **overrides):
    values = {
        "model_name_or_path": str(model), "train_files": [str(data)], "eval_fraction": 0.1,
        "max_seq_length": 96, "lora_rank": 8, "lora_dropout": 0.1, "output_dir": str(out),
        "per_device_train_batch_size": 4, "max_steps": 8, "save_steps": 4, "logging_steps": 2,
        "learning_rate": 2e-3, "seed": 7, "report_to": ["tensorboard"], "max_new_tokens": 12,
    }
    values.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def trained_run(tiny_models, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = train(make_config(tiny_models("glm4"), data_file, out), log=lambda *_: None)
    return result


def test_loss_falls_and_metrics_are_logged(trained_run):
    rows = [json.loads(line) for line in (trained_run.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    logged = [r for r in rows if "loss" in r][0]
    for key in ("learning_rate", "grad_norm", "tokens_per_second", "step"):
        assert key in logged
    assert any("eval_loss" in r for r in rows)
    assert list((trained_run.output_dir / "runs").rglob("events.out.tfevents*"))


def test_checkpoints_and_final_folder_are_self_describing(trained_run, tiny_models):
    out = trained_run.output_dir
    for folder in (out / "checkpoint-4", out / "checkpoint-8", out):
        for name in ("adapter_config.json", "adapter_model.safetensors", "chattune.json", "chattune.yaml"):
            assert (folder / name).is_file(), folder / name
    manifest = json.loads((out / "chattune.json").read_text())
    assert manifest["base_model"]["path"] == str(Path(tiny_models("glm4")).resolve())
    assert len(manifest["base_model"]["config_sha256"]) == 64
    assert len(manifest["base_model"]["tokenizer_sha256"]) == 64
    assert manifest["template"]["name"] == "tokenizer"
    assert manifest["template"]["chat_template"].startswith("[gMASK]<sop>")
    assert manifest["method"]["name"] == "lora" and manifest["method"]["lora_rank"] == 8
    assert manifest["max_seq_length"] == 96
    assert manifest["data_fingerprint"] == trained_run.prepared.fingerprint
    assert manifest["generation"]["max_new_tokens"] == 12
    assert manifest["chattune_version"]
    checkpoint_manifest = json.loads((out / "checkpoint-4" / "chattune.json").read_text())
    assert checkpoint_manifest["global_step"] == 4


def test_saved_adapter_loads_and_changes_the_logits(trained_run, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = AutoModelForCausalLM.from_pretrained(tiny_models("glm4"))
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(trained_run.output_dir)).eval()
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    saved = load_file(str(trained_run.output_dir / "adapter_model.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in saved.items())


def test_resume_at_step_k_equals_the_uninterrupted_run(trained_run, tiny_models, data_file, tmp_path):
    import shutil

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(trained_run.output_dir / "checkpoint-4", resumed_dir / "checkpoint-4")
    config = make_config(tiny_models("glm4"), data_file, resumed_dir, resume_from_checkpoint="true")
    result = train(config, log=lambda *_: None)
    assert result.global_step == 8
    steps = [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert min(steps) > 4, "resume restarted from step 0"
    expected = load_file(str(trained_run.output_dir / "adapter_model.safetensors"))
    got = load_file(str(resumed_dir / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def test_existing_checkpoints_are_never_overwritten(trained_run, tiny_models, data_file):
    before = sorted(p.name for p in trained_run.output_dir.iterdir())
    config = make_config(tiny_models("glm4"), data_file, trained_run.output_dir)
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume_from_checkpoint=true"):
        train(config, log=lambda *_: None)
    assert sorted(p.name for p in trained_run.output_dir.iterdir()) == before


def test_resume_true_without_a_checkpoint_is_an_error(tiny_models, data_file, tmp_path):
    config = make_config(tiny_models("glm4"), data_file, tmp_path / "empty", resume_from_checkpoint="true")
    with pytest.raises(ConfigError, match="no checkpoint-"):
        train(config, log=lambda *_: None)


def test_save_total_limit_keeps_the_newest_checkpoints(tiny_models, data_file, tmp_path):
    config = make_config(tiny_models("llama"), data_file, tmp_path / "out", max_steps=6, save_steps=2,
                         save_total_limit=2, eval_fraction=0.0, report_to=["none"])
    train(config, log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "glm"])
def test_other_architectures_train_and_reload(arch, tiny_models, data_file, tmp_path):
    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run

    config = make_config(tiny_models(arch), data_file, tmp_path / arch, max_steps=4, save_steps=4,
                         eval_fraction=0.0, report_to=["none"])
    result = train(config, log=lambda *_: None)
    run = load_run(str(result.output_dir))
    answers = generate(run, [[{"role": "user", "content": "Who are you?"}]], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_gradient_checkpointing_trains(tiny_models, data_file, tmp_path):
    config = make_config(tiny_models("llama"), data_file, tmp_path / "gc", max_steps=4, save_steps=4,
                         eval_fraction=0.0, report_to=["none"], gradient_checkpointing="true",
                         logging_steps=1)
    train(config, log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "gc" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # no NaN
    assert (tmp_path / "gc" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("target", ["/proc/x", "afile/sub"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(target, tiny_models, data_file,
                                                                                tmp_path, monkeypatch, capsys):
    import chattune.training.recipe as recipe
    import chattune.training.start as start
    from chattune.cli import main

    if target.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    (tmp_path / "afile").write_text("x")
    output_dir = target if target.startswith("/") else str(tmp_path / target)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model or tokenizer was loaded")

    model = tiny_models("glm4")
    capsys.readouterr()
    monkeypatch.setattr(start, "load_tokenizer", no_loading)
    monkeypatch.setattr(recipe, "load_model", no_loading)
    code = main(["train", f"model_name_or_path={model}", f"train_files={data_file}",
                 f"output_dir={output_dir}", "report_to=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("chattune: error: output_dir: ") and output_dir in err[0], err[0]
    assert not Path(output_dir).exists()
