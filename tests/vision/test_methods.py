"""Fine-tuning methods on a vision-language model: what each one trains, and what it never does."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from chattune.config import MethodArgs
from chattune.errors import ConfigError
from chattune.methods import get_method
from chattune.vision.methods import (
    apply_vision_method,
    language_linear_names,
    lora_targets,
    vision_method_args,
)
from chattune.vision.processor import vision_parts

ARCHS = ("llava", "idefics3")
LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def fresh(tiny_vlms, arch):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlms(arch))
    return model, vision_parts(model)


def apply(tiny_vlms, arch, method, **settings):
    model, parts = fresh(tiny_vlms, arch)
    base_names = {name for name, _ in model.named_parameters()}
    trained = apply_vision_method(get_method(method), model, MethodArgs(method=method, **settings), parts, False)
    return trained, parts, base_names


def trainable(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def under(name: str, prefix: str) -> bool:
    return f"{prefix}." in name


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapts_the_language_model_and_trains_a_projector_copy(arch, tiny_vlms):
    model, parts, _ = apply(tiny_vlms, arch, "lora")
    names = trainable(model)
    lora = [n for n in names if "lora_" in n]
    copies = [n for n in names if ".modules_to_save." in n]
    assert sorted(lora + copies) == sorted(names)  # nothing else trains
    assert lora and all(under(n, parts.language) for n in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == set(LINEAR)
    assert len(lora) == 2 * len(LINEAR) * 2  # A and B, every linear layer, 2 layers
    projector_leaf = parts.projector.rsplit(".", 1)[-1]
    assert copies and all(f"{projector_leaf}.modules_to_save.default." in n for n in copies)
    assert not any(under(n, parts.tower) or "vision" in n for n in names)
    # the copy has as many parameters as the projector itself
    base, base_parts = fresh(tiny_vlms, arch)
    projector_params = sum(p.numel() for n, p in base.named_parameters() if under(n, base_parts.projector))
    assert sum(p.numel() for n, p in model.named_parameters() if n in copies) == projector_params


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_without_train_projector_leaves_the_projector_frozen(arch, tiny_vlms):
    model, parts, _ = apply(tiny_vlms, arch, "lora", train_projector=False)
    names = trainable(model)
    assert names and all("lora_" in n and under(n, parts.language) for n in names)


def test_lora_with_train_vision_tower_trains_a_tower_copy(tiny_vlms):
    model, parts, _ = apply(tiny_vlms, "llava", "lora", train_vision_tower=True)
    names = trainable(model)
    assert any("vision_tower.modules_to_save.default." in n for n in names)
    assert any("multi_modal_projector.modules_to_save.default." in n for n in names)
    assert not any("lora_" in n and "vision_tower" in n for n in names)


def test_lora_targets_only_the_language_model(tiny_vlms):
    model, parts = fresh(tiny_vlms, "llava")
    assert language_linear_names(model, parts) == LINEAR
    pattern = lora_targets(model, parts, None)
    assert pattern == r"model\.language_model\..*\.(down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)"
    assert lora_targets(model, parts, ["all-linear"]) == pattern
    assert lora_targets(model, parts, ["v_proj", "q_proj"]) == r"model\.language_model\..*\.(q_proj|v_proj)"
    # the vision tower has q_proj/k_proj/... too (CLIP attention): the pattern must not reach them
    import re

    tower_linears = [n for n, _ in model.named_modules() if n.startswith(parts.tower) and n.endswith("q_proj")]
    assert tower_linears and not any(re.fullmatch(pattern, n) for n in tower_linears)
    with pytest.raises(ConfigError, match=r"lora_target: \['fc1'\] not found in the language model "
                                          r"\(model\.language_model\)"):
        lora_targets(model, parts, ["q_proj", "fc1"])  # fc1 is the vision tower's MLP


def test_lora_with_chosen_targets(tiny_vlms):
    model, parts, _ = apply(tiny_vlms, "llava", "lora", lora_target=["q_proj"], train_projector=False)
    names = trainable(model)
    assert len(names) == 4 and all(".self_attn.q_proj.lora_" in n for n in names)


def test_vision_method_args_leaves_other_methods_alone(tiny_vlms):
    model, parts = fresh(tiny_vlms, "llava")
    args = MethodArgs(method="full")
    assert vision_method_args(args, model, parts, get_method("full")) is args
    lora = vision_method_args(MethodArgs(modules_to_save=["lm_head"]), model, parts, get_method("lora"))
    assert lora.modules_to_save == ["lm_head", "multi_modal_projector"]


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_trains_exactly_the_projector(arch, tiny_vlms, tmp_path):
    model, parts, base_names = apply(tiny_vlms, arch, "freeze")
    projector = sorted(n for n in base_names if n.startswith(parts.projector + "."))
    assert projector and sorted(trainable(model)) == projector
    model.save_pretrained(tmp_path)  # only the trained tensors are saved
    assert sorted(load_file(str(tmp_path / "model.safetensors"))) == projector


def test_freeze_without_the_projector_trains_what_else_is_asked(tiny_vlms):
    with pytest.raises(ConfigError, match="train_projector: false with method freeze trains nothing"):
        apply(tiny_vlms, "llava", "freeze", train_projector=False)
    model, parts, _ = apply(tiny_vlms, "llava", "freeze", train_projector=False, train_vision_tower=True)
    names = trainable(model)
    assert names and all(n.startswith(parts.tower + ".") for n in names)
    model, parts, base_names = apply(tiny_vlms, "llava", "freeze", freeze_extra_modules=["lm_head"])
    projector = {n for n in base_names if n.startswith(parts.projector + ".")}
    assert set(trainable(model)) == projector | {"lm_head.weight"}


@pytest.mark.parametrize("arch", ARCHS)
def test_full_keeps_the_vision_tower_frozen(arch, tiny_vlms):
    model, parts, base_names = apply(tiny_vlms, arch, "full")
    names = set(trainable(model))
    tower = {n for n in base_names if n.startswith(parts.tower + ".")}
    assert tower and not names & tower
    assert names == base_names - tower  # the language model, its head and the projector


def test_full_with_the_tower_and_without_the_projector(tiny_vlms):
    model, parts, base_names = apply(tiny_vlms, "llava", "full", train_vision_tower=True)
    assert set(trainable(model)) == base_names
    model, parts, base_names = apply(tiny_vlms, "llava", "full", train_projector=False)
    names = set(trainable(model))
    assert not any(n.startswith(parts.projector + ".") or n.startswith(parts.tower + ".") for n in names)
    assert any(n.startswith(parts.language + ".") for n in names)


def test_ptuning_is_refused(tiny_vlms):
    with pytest.raises(ConfigError, match="method: ptuning is not supported on a vision-language model"):
        apply(tiny_vlms, "llava", "ptuning")


def test_qlora_is_refused_naming_why(tiny_vlms):
    with pytest.raises(ConfigError, match=r"method: qlora is not supported on a vision-language model \(bitsandbytes "
                                          r"would quantize the vision tower and the projector too\)"):
        apply(tiny_vlms, "llava", "qlora")
