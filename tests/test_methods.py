"""Every method on tiny glm4 and llama models: exactly the intended parameters train,
the loss falls, the run folder reloads to the same logits, and the base is untouched."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from chattune.config import DataArgs, MethodArgs, RunConfig
from chattune.config_io import build_config
from chattune.errors import ConfigError
from chattune.inference.generate import answer, generate, stream
from chattune.inference.runs import load_run
from chattune.methods import block_list, check_run_config
from chattune.training.recipe import train
from tests.training.test_recipe import make_config

ARCHS = ["glm4", "llama"]
PROBE = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


def fresh_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def run(method, arch, tiny_models, data_file, tmp_path, **extra):
    config = make_config(tiny_models(arch), data_file, tmp_path / f"{method}-{arch}", method=method,
                         max_steps=6, save_steps=6, logging_steps=1, eval_fraction=0.0,
                         report_to=["none"], lora_dropout=0.0, **extra)
    return train(config, log=lambda *_: None)


def losses(result):
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def trained(model):
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE.to(next(model.parameters()).device)).logits.float().cpu()


def assert_reload_matches(result):
    reloaded = load_run(str(result.output_dir)).model
    torch.testing.assert_close(logits(reloaded), logits(result.model), rtol=1e-5, atol=1e-5)


def assert_base_untouched(result, base_path, trained_names=()):
    base = fresh_base(base_path).state_dict()
    model = result.model.get_base_model() if hasattr(result.model, "get_base_model") else result.model
    current = {}
    for name, tensor in model.state_dict().items():
        current[name.replace(".base_layer.", ".")] = tensor
    checked = 0
    for name, tensor in base.items():
        if name in trained_names:
            continue
        assert torch.equal(current[name], tensor), name
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_exactly_the_adapters_of_every_linear_projection(arch, tiny_models, data_file, tmp_path):
    base = fresh_base(tiny_models(arch))
    blocks = block_list(base)
    linears = {f"{n}": m for n, m in blocks.named_modules() if isinstance(m, torch.nn.Linear)}
    rank = 8
    expected = sum(rank * (m.in_features + m.out_features) for m in linears.values())
    result = run("lora", arch, tiny_models, data_file, tmp_path)
    names = trained(result.model)
    assert sum(names.values()) == expected
    assert len(names) == 2 * len(linears)
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert losses(result)[-1] < losses(result)[0]
    assert_reload_matches(result)
    assert_base_untouched(result, tiny_models(arch))


def test_lora_variants_dora_rslora_targets_and_modules_to_save(tiny_models, data_file, tmp_path):
    result = run("lora", "llama", tiny_models, data_file, tmp_path, use_dora="true", use_rslora="true",
                 lora_target=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    names = trained(result.model)
    assert any("lora_magnitude_vector" in n for n in names)
    adapted = {n.split(".lora_")[0] for n in names if ".lora_A." in n}
    assert adapted and all(a.endswith(("q_proj", "v_proj")) for a in adapted)
    assert any("lm_head.modules_to_save" in n for n in names)
    manifest = json.loads((result.output_dir / "chattune.json").read_text())
    assert manifest["method"] == {"name": "lora", "lora_rank": 8, "lora_alpha": None, "lora_dropout": 0.0,
                                  "lora_target": ["q_proj", "v_proj"], "use_dora": True, "use_rslora": True,
                                  "lora_init": "default", "modules_to_save": ["lm_head"],
                                  "trainable_token_indices": None}
    assert_reload_matches(result)


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_trains_the_mlps_of_the_last_blocks_and_saves_only_them(arch, tiny_models, data_file, tmp_path):
    from safetensors.torch import load_file

    base = fresh_base(tiny_models(arch))
    layers = base.config.num_hidden_layers
    expected = {n: p.numel() for n, p in base.named_parameters() if f"layers.{layers - 1}.mlp." in n}
    result = run("freeze", arch, tiny_models, data_file, tmp_path, freeze_trainable_layers=1)
    assert trained(result.model) == expected
    saved = load_file(str(result.output_dir / "model.safetensors"))
    assert set(saved) == set(expected)
    assert not (result.output_dir / "config.json").exists()
    assert losses(result)[-1] < losses(result)[0]
    assert_reload_matches(result)
    assert_base_untouched(result, tiny_models(arch), trained_names=set(expected))


def test_freeze_negative_layers_count_from_the_first_block_and_extra_modules(tiny_models, data_file, tmp_path):
    result = run("freeze", "llama", tiny_models, data_file, tmp_path, freeze_trainable_layers=-1,
                 freeze_trainable_modules=["self_attn"], freeze_extra_modules=["lm_head"])
    names = set(trained(result.model))
    assert names and all(n.startswith("model.layers.0.self_attn.") or n.startswith("lm_head.") for n in names)
    assert "lm_head.weight" in names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_trains_only_the_prefix_encoder(arch, projection, tiny_models, data_file, tmp_path):
    base = fresh_base(tiny_models(arch))
    c = base.config
    kv_dim = c.num_key_value_heads * c.head_dim  # peft sizes the prefix by the key/value width
    token_dim = c.num_hidden_layers * 2 * kv_dim
    result = run("ptuning", arch, tiny_models, data_file, tmp_path, pre_seq_len=4,
                 prefix_projection=str(projection).lower(), prefix_hidden_size=32, learning_rate=1e-2)
    names = trained(result.model)
    if projection:
        assert names == {
            "prompt_encoder.default.embedding.weight": 4 * kv_dim,
            "prompt_encoder.default.transform.0.weight": kv_dim * 32,
            "prompt_encoder.default.transform.0.bias": 32,
            "prompt_encoder.default.transform.2.weight": 32 * token_dim,
            "prompt_encoder.default.transform.2.bias": token_dim,
        }
    else:
        assert names == {"prompt_encoder.default.embedding.weight": 4 * token_dim}
    assert losses(result)[-1] < losses(result)[0]
    assert_reload_matches(result)
    assert_base_untouched(result, tiny_models(arch))


def test_ptuning_generation_with_the_kv_cache_equals_recomputing(tiny_models, data_file, tmp_path):
    result = run("ptuning", "llama", tiny_models, data_file, tmp_path, pre_seq_len=4, learning_rate=1e-2)
    loaded = load_run(str(result.output_dir))
    messages = [{"role": "user", "content": "Who are you?"}]
    fast = answer(loaded, [messages], max_new_tokens=8)[0]
    ids = torch.tensor([loaded.prompt_ids(messages)])
    slow = []
    for _ in range(8):  # no cache: the peft forward recomputes prefix + everything each step
        with torch.no_grad():
            step = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, -1]
        token = int(step.argmax())
        slow.append(token)
        if token in loaded.profile().stop_token_ids:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    assert fast.generated == slow[:len(fast.generated)]  # equal until a stop string (if any) ends it
    assert "".join(stream(loaded, messages, max_new_tokens=8)) == fast.text.text
    batch = generate(loaded, [messages, [{"role": "user", "content": "What is the capital of Veloria?"}]],
                     max_new_tokens=8)
    assert batch[0] == fast.text.text


@pytest.mark.parametrize("arch", ARCHS)
def test_full_trains_everything_and_saves_a_complete_model(arch, tiny_models, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    base = fresh_base(tiny_models(arch))
    result = run("full", arch, tiny_models, data_file, tmp_path, learning_rate=1e-3)
    assert sum(trained(result.model).values()) == sum(p.numel() for p in base.parameters())
    assert losses(result)[-1] < losses(result)[0]
    standalone = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    torch.testing.assert_close(logits(standalone), logits(result.model), rtol=1e-5, atol=1e-5)
    assert_reload_matches(result)
    assert not torch.allclose(logits(standalone), logits(base))


def test_qlora_refuses_without_cuda_before_loading_anything(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = make_config(tmp_path / "no-such-model", tmp_path / "no-data.json", tmp_path / "out", method="qlora")
    with pytest.raises(ConfigError, match="qlora .*needs a CUDA GPU.*method=lora"):
        train(config, log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    assert "bitsandbytes" not in sys.modules


def test_8bit_optimizer_refuses_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = make_config(tmp_path / "m", tmp_path / "d.json", tmp_path / "out", method="full", optim="paged_adamw_8bit")
    with pytest.raises(ConfigError, match="optim: paged_adamw_8bit .*CUDA"):
        train(config, log=lambda *_: None)


def test_freeze_resume_restores_the_trained_tensors(tiny_models, data_file, tmp_path):
    import shutil

    from safetensors.torch import load_file

    first = make_config(tiny_models("llama"), data_file, tmp_path / "a", method="freeze", max_steps=6,
                        save_steps=3, eval_fraction=0.0, report_to=["none"], lora_dropout=0.0)
    train(first, log=lambda *_: None)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    second = make_config(tiny_models("llama"), data_file, tmp_path / "b", method="freeze", max_steps=6,
                         save_steps=3, eval_fraction=0.0, report_to=["none"], lora_dropout=0.0,
                         resume_from_checkpoint="true")
    train(second, log=lambda *_: None)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and bitsandbytes")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_cuda(bits, tiny_models, data_file, tmp_path):
    result = run("qlora", "llama", tiny_models, data_file, tmp_path, quantization_bit=bits, bf16="true")
    assert losses(result)[-1] < losses(result)[0]
    assert all(".lora_" in n for n in trained(result.model))
    loaded = load_run(str(result.output_dir))
    assert isinstance(generate(loaded, [[{"role": "user", "content": "hi"}]], max_new_tokens=4)[0], str)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and bitsandbytes")
def test_full_with_paged_8bit_optimizer_on_cuda(tiny_models, data_file, tmp_path):
    result = run("full", "llama", tiny_models, data_file, tmp_path, optim="paged_adamw_8bit", learning_rate=1e-3)
    assert losses(result)[-1] < losses(result)[0]


# -- the table, and bad input reaching a method ---------------------------------------------

def test_the_table_declares_each_method_once():
    from chattune.methods import METHODS, get_method

    assert list(METHODS) == ["lora", "qlora", "freeze", "ptuning", "full"]
    assert [m.name for m in METHODS.values() if m.needs_cuda] == ["qlora"]
    assert [m.name for m in METHODS.values() if m.packing_refusal] == ["ptuning"]
    assert [m.name for m in METHODS.values() if m.run_is_model] == ["full"]
    assert {m.name for m in METHODS.values() if not m.served_alone({})} == {"lora", "qlora"}
    assert get_method("lora").served_alone({"use_dora": True})
    if not torch.cuda.is_available():  # the base of a qlora run loads unquantized without CUDA
        assert get_method("qlora").base_load_kwargs({"quantization_bit": 4}) == {}
    with pytest.raises(ConfigError, match="unknown method 'magic'; expected one of lora, qlora"):
        get_method("magic")


def test_a_model_without_a_block_list_is_a_config_error():
    from chattune.config import MethodArgs
    from chattune.methods import get_method

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"num_hidden_layers": 3})()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="freeze needs the model's list of transformer blocks.*Flat"):
        get_method("freeze").apply(Flat(), MethodArgs(method="freeze"), False)


@pytest.mark.parametrize(("settings", "message"), [
    ({"freeze_trainable_layers": 5}, "freeze_trainable_layers: 5 but the model has 2 blocks"),
    ({"freeze_trainable_modules": ["nothing_here"]}, "freeze_trainable_modules: none of \\['nothing_here'\\]"),
])
def test_freeze_settings_the_model_cannot_honour(tiny_models, settings, message):
    from chattune.config import MethodArgs
    from chattune.methods import get_method

    with pytest.raises(ConfigError, match=message):
        get_method("freeze").apply(fresh_base(tiny_models("glm4")), MethodArgs(method="freeze", **settings), False)


def test_a_lora_target_the_model_lacks_is_a_config_error(tiny_models, data_file, tmp_path, capsys):
    from chattune.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"model_name_or_path: {tiny_models('glm4')}\ntrain_files: [{data_file}]\n"
                      f"output_dir: {tmp_path / 'out'}\nlora_target: [no_such_proj]\nreport_to: [none]\n")
    assert main(["train", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("chattune: error: lora_target:") and "no_such_proj" in last


def test_a_freeze_run_folder_that_does_not_fit_its_base(tiny_models, data_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from chattune.errors import ManifestError

    result = run("freeze", "glm4", tiny_models, data_file, tmp_path, freeze_trainable_layers=1)
    weights = result.output_dir / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name][:1]}, str(weights))
    with pytest.raises(ManifestError, match=f"tensor {name} has shape"):
        load_run(str(result.output_dir))
    save_file({"model.no_such.weight": tensors[name]}, str(weights))
    with pytest.raises(ManifestError, match="trained tensors not found in the base model"):
        load_run(str(result.output_dir))
    weights.unlink()
    with pytest.raises(ManifestError, match="no model.safetensors"):
        load_run(str(result.output_dir))


def test_what_depends_on_two_groups_is_checked_against_the_method_table():
    config = RunConfig(method=MethodArgs(method="ptuning"), data=DataArgs(packing="pack"))
    with pytest.raises(ConfigError, match="packing: pack is not possible with method=ptuning"):
        check_run_config(config)
    with pytest.raises(ConfigError, match="packing: pack is not possible with method=ptuning"):
        build_config({"method": "ptuning", "packing": "pack"})
    check_run_config(dataclasses.replace(config, data=DataArgs(packing="auto")))
