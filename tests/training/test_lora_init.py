"""``lora_init``: PiSSA and OLoRA start as the base, train on a residual base, and every adapter
chattune writes of them (run folder, checkpoints) is a plain LoRA of the original base, so that
load_run, export and resume give exactly the model that trained; gaussian changes nothing about
loading; values a run cannot honour are refused naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.config import MethodArgs, PreferenceArgs
from chattune.config_io import build_config, load_config
from chattune.errors import ConfigError
from chattune.export.model import export_run
from chattune.inference.runs import load_run
from chattune.lora_init import initial_adapter, load_converted
from chattune.methods import get_method
from chattune.training.preference import resolve_reference
from chattune.training.recipe import train
from chattune.training.start import start_from_run

PROBE = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
MUTATING = ["pissa", "olora"]


def overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    values = {"model_name_or_path": model, "train_files": data, "max_seq_length": 64, "output_dir": out,
              "per_device_train_batch_size": 4, "max_steps": 4, "save_steps": 2, "logging_steps": 2,
              "learning_rate": 2e-2, "seed": 7, "report_to": "none", "eval_fraction": 0, "lora_dropout": 0,
              "cache_dir": out.parent / "cache"}
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def base_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def runs(tiny_models, data_file, tmp_path_factory):
    """A 4-step run of each base-changing start, with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("lora-init")
    return {init: train(load_config(None, overrides(tiny_models("llama"), data_file, root / init, lora_init=init)),
                        log=lambda *_: None)
            for init in MUTATING}


@pytest.mark.parametrize("init", [*MUTATING, "pissa_niter_2"])
def test_the_start_changes_the_base_weights_and_the_model_is_still_the_base(init, tiny_models):
    base = base_model(tiny_models("llama"))
    expected = logits(base)
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_method("lora").apply(base, MethodArgs(lora_init=init), False).eval()
    residual = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").get_base_layer().weight
    assert (residual - original).abs().max() > 1e-3  # the principal part moved into the adapter
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert initial_adapter(model) is not None


@pytest.mark.parametrize("init", MUTATING)
def test_the_run_folder_and_its_checkpoints_load_as_the_model_that_trained(init, runs, tiny_models):
    result = runs[init]
    trained = logits(result.model.eval())
    assert (trained - logits(base_model(tiny_models("llama")))).abs().max() > 1e-2  # training moved it
    for folder in (result.output_dir, result.output_dir / "checkpoint-4"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == 16 and config["lora_alpha"] == 32 and config["init_lora_weights"] is True
        torch.testing.assert_close(logits(load_run(str(folder)).model), trained, rtol=1e-5, atol=1e-5)
    manifest = json.loads((result.output_dir / "chattune.json").read_text())
    assert manifest["method"]["lora_init"] == init and manifest["method"]["lora_rank"] == 8
    checkpoint = json.loads((result.output_dir / "checkpoint-2" / "chattune.json").read_text())
    assert checkpoint["method"]["lora_init"] == init


@pytest.mark.parametrize("init", MUTATING)
def test_the_export_passes_its_check_and_answers_as_the_run(init, runs, tmp_path):
    from transformers import AutoModelForCausalLM

    result = runs[init]
    out = tmp_path / "merged"
    exported = export_run(str(result.output_dir), str(out), log=lambda *_: None)
    assert exported.check["passed"] and exported.check["max_logit_difference"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged), logits(result.model.eval()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", MUTATING)
def test_a_resumed_run_ends_as_the_uninterrupted_one(init, runs, tiny_models, data_file, tmp_path):
    reference = runs[init].output_dir
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(reference / "checkpoint-2", out / "checkpoint-2")
    lines: list[str] = []
    config = load_config(None, overrides(tiny_models("llama"), data_file, out, lora_init=init,
                                         resume_from_checkpoint="true"))
    result = train(config, log=lambda *parts: lines.append(" ".join(map(str, parts))))
    assert result.global_step == 4 and any("resuming from checkpoint-2" in line for line in lines), lines
    assert not any("rebuilt" in line for line in lines), lines  # the same start on the same machine
    expected = load_file(str(reference / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(result.model.eval()), logits(runs[init].model.eval()), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_resumes_onto_a_start_made_differently(runs, tiny_models):
    """Another machine's SVD may start the adapter differently: the base weights are rebuilt as
    the checkpoint's residual, so the resumed model is the one that was saved."""
    checkpoint = runs["pissa"].output_dir / "checkpoint-4"
    other = get_method("lora").apply(base_model(tiny_models("llama")), MethodArgs(lora_init="pissa_niter_1"), False)
    lines: list[str] = []
    load_converted(other, checkpoint, log=lines.append)
    assert len(lines) == 1 and "base weights rebuilt as the residual of checkpoint-4" in lines[0]
    torch.testing.assert_close(logits(other.eval()), logits(runs["pissa"].model.eval()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args", [
    MethodArgs(lora_init="olora", use_dora=True, use_rslora=True, modules_to_save=["lm_head"]),
    MethodArgs(lora_init="pissa", lora_alpha=4, lora_target=["q_proj", "v_proj", "embed_tokens"]),
], ids=["dora-rslora-modules_to_save", "embedding-target"])
def test_what_else_an_adapter_holds_converts_exactly(args, tiny_models, tmp_path):
    """What peft's own conversion drops (DoRA's magnitudes, modules_to_save) is kept, rsLoRA's
    scaling (alpha / sqrt(r)) and an explicit alpha's stay the same at twice the rank, and an
    embedding's LoRA (which no start changes) is padded to that rank."""
    from peft import PeftModel

    model = get_method("lora").apply(base_model(tiny_models("llama")), args, False)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(base_model(tiny_models("llama")), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded), logits(model.eval()), rtol=1e-5, atol=1e-5)


def test_gaussian_changes_nothing_about_loading(tiny_models, data_file, tmp_path):
    out = tmp_path / "gaussian"
    result = train(load_config(None, overrides(tiny_models("llama"), data_file, out, lora_init="gaussian",
                                               max_steps=2)), log=lambda *_: None)
    assert initial_adapter(result.model) is None
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] == "gaussian"
    assert json.loads((out / "chattune.json").read_text())["method"]["lora_init"] == "gaussian"
    torch.testing.assert_close(logits(load_run(str(out)).model), logits(result.model.eval()), rtol=1e-5, atol=1e-5)


def test_a_run_continued_from_a_pissa_run_trains_the_plain_lora_it_saved(runs):
    config, continued = start_from_run(build_config({"model_name_or_path": str(runs["pissa"].output_dir)}),
                                       log=lambda *_: None)
    assert continued == runs["pissa"].output_dir
    assert (config.method.lora_rank, config.method.lora_alpha, config.method.lora_init) == (16, None, "default")


@pytest.mark.parametrize(("values", "message"), [
    ({"lora_init": "svd"}, "lora_init: unknown value 'svd'; expected one of default, gaussian, pissa, "
                           "pissa_niter_N, olora"),
    ({"lora_init": "pissa_niter_0"}, "lora_init: pissa_niter_0: N, the randomized SVD's iterations, must be >= 1"),
    ({"lora_init": "loftq"}, "lora_init: loftq is not supported"),
    ({"lora_init": "pissa", "method": "qlora"}, "lora_init: pissa moves part of each base weight into the adapter, "
                                                "and qlora keeps the base in 4/8-bit"),
    ({"lora_init": "olora", "method": "full"}, "lora_init: olora is how LoRA adapters start; method=full has none"),
    ({"lora_init": "pissa", "deepspeed": "zero2.json"}, "lora_init: pissa changes the base weights while training"),
])
def test_values_a_run_cannot_honour_are_refused_naming_the_key(values, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        build_config(values)


def test_gaussian_works_with_qlora_settings_and_the_reference_is_never_the_residual():
    build_config({"lora_init": "gaussian", "method": "qlora"})
    build_config({"lora_init": "pissa_niter_4"})
    dpo = PreferenceArgs(stage="dpo")
    assert resolve_reference(dpo, True, False, "pissa") == "precompute"
    assert resolve_reference(dpo, True, False, "gaussian") == "adapter_off"
    with pytest.raises(ConfigError, match="^pref_reference: adapter_off is not possible with lora_init=olora"):
        resolve_reference(PreferenceArgs(stage="dpo", pref_reference="adapter_off"), True, False, "olora")


def test_the_memory_plan_counts_a_pissa_run_as_any_lora_run(tiny_models):
    from chattune.training.memory_plan import estimate

    model = str(tiny_models("llama"))
    plans = {init: estimate(build_config({"model_name_or_path": model, "lora_init": init}))
             for init in ("default", "pissa")}
    assert plans["pissa"].trainable == plans["default"].trainable > 0
