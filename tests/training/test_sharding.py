"""Sharding settings (FSDP, DeepSpeed ZeRO) as TrainingArguments kwargs, checked on CPU.

FSDP itself is not run here: on CPU accelerate trains several processes as plain DDP even
with the FSDP plugin set (see docs/design/sharding.md), so real FSDP / ZeRO runs are in
test_sharding_gpu.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chattune.config import MethodArgs, RunConfig
from chattune.config_io import load_config
from chattune.errors import ConfigError
from chattune.methods import get_method
from chattune.training.sharding import (
    block_class_names,
    check_sharding_supported,
    fsdp_options,
    load_deepspeed_config,
    sharding_arguments,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BLOCKS = {"llama": "LlamaDecoderLayer", "glm4": "Glm4DecoderLayer", "qwen2": "Qwen2DecoderLayer"}


def load(tiny_models, arch: str, lora: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.float32)
    return get_method("lora").apply(model, MethodArgs(), False) if lora else model


def config_with(**train_values) -> RunConfig:
    config = RunConfig()
    for key, value in train_values.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load(tiny_models, "llama")


def write(path: Path, settings) -> str:
    path.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    return str(path)


# -- FSDP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "peft-lora"])
@pytest.mark.parametrize("arch", list(BLOCKS))
def test_block_class_is_the_architectures_own(arch, lora, tiny_models):
    model = load(tiny_models, arch, lora)
    assert block_class_names(model) == [BLOCKS[arch]]
    config = config_with(fsdp="full_shard auto_wrap")
    assert sharding_arguments(config, model) == {"fsdp": True, "fsdp_config": {
        "version": 2, "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": [BLOCKS[arch]]}}


def test_plain_ddp_adds_nothing(llama):
    assert sharding_arguments(RunConfig(), llama) == {}
    assert sharding_arguments(RunConfig()) == {}
    assert sharding_arguments(config_with(fsdp="  ")) == {}


def test_option_words_become_fsdp2_settings(llama):
    settings = sharding_arguments(config_with(fsdp="shard_grad_op offload"), llama)["fsdp_config"]
    assert settings == {"version": 2, "reshard_after_forward": False, "cpu_offload": True,
                        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
                        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}


@pytest.mark.parametrize("fsdp, message", [
    ("full_shard autowrap", "fsdp: unknown option 'autowrap'; expected words from full_shard, shard_grad_op, "
                            "no_shard, hybrid_shard, hybrid_shard_zero2, offload, auto_wrap"),
    ("FULL_SHARD", "fsdp: unknown option 'FULL_SHARD'"),
    ("full_shard shard_grad_op", "fsdp: choose one sharding strategy, got full_shard and shard_grad_op"),
    ("hybrid_shard auto_wrap", "fsdp: hybrid_shard exists only in FSDP1 .*with FSDP2 use full_shard or shard_grad_op"),
])
def test_bad_fsdp_words_are_refused_naming_the_key(fsdp, message, llama):
    with pytest.raises(ConfigError, match=message):
        sharding_arguments(config_with(fsdp=fsdp), llama)


def test_the_valid_words_are_transformers_own():
    from transformers.trainer_utils import FSDPOption

    assert fsdp_options() == [o.value for o in FSDPOption]
    assert {"full_shard", "shard_grad_op", "hybrid_shard", "no_shard", "offload", "auto_wrap"} <= set(fsdp_options())


def test_user_fsdp_config_is_kept_and_wins(llama):
    user = {"fsdp_transformer_layer_cls_to_wrap": "LlamaMLP", "reshard_after_forward": False,
            "cpu_ram_efficient_loading": True, "activation_checkpointing": True}
    config = config_with(fsdp="full_shard auto_wrap", fsdp_config=copy.deepcopy(user))
    settings = sharding_arguments(config, llama)["fsdp_config"]
    assert settings == {"transformer_layer_cls_to_wrap": ["LlamaMLP"], "reshard_after_forward": False,
                        "cpu_ram_efficient_loading": True, "activation_checkpointing": True, "version": 2,
                        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT"}
    assert config.train.fsdp_config == user  # the config itself is not changed


def test_user_wrap_class_must_exist_in_the_model(llama):
    config = config_with(fsdp="full_shard", fsdp_config={"transformer_layer_cls_to_wrap": ["GPT2Block"]})
    with pytest.raises(ConfigError, match="fsdp_config: transformer_layer_cls_to_wrap names GPT2Block, which "
                                          "LlamaForCausalLM does not contain"):
        sharding_arguments(config, llama)


def test_other_wrap_policies_get_no_block_class(llama):
    config = config_with(fsdp="full_shard", fsdp_config={"auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": 1000})
    settings = sharding_arguments(config, llama)["fsdp_config"]
    assert "transformer_layer_cls_to_wrap" not in settings and settings["min_num_params"] == 1000


def test_fsdp1_takes_its_own_strategies_and_keeps_original_params(llama):
    config = config_with(fsdp="hybrid_shard auto_wrap", fsdp_config={"version": 1})
    settings = sharding_arguments(config, llama)["fsdp_config"]
    assert settings == {"version": 1, "reshard_after_forward": "hybrid_shard", "use_orig_params": True,
                        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
                        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    with pytest.raises(ConfigError, match="fsdp_config: version must be 1 or 2 .*got 3"):
        sharding_arguments(config_with(fsdp="full_shard", fsdp_config={"version": 3}), llama)


def test_fsdp_needs_the_model_and_a_block_list():
    with pytest.raises(ConfigError, match="fsdp: the FSDP settings need the model"):
        sharding_arguments(config_with(fsdp="full_shard"))
    blockless = torch.nn.Linear(2, 2)
    blockless.config = SimpleNamespace(num_hidden_layers=2)
    with pytest.raises(ConfigError, match="fsdp: FSDP wraps each transformer block, and no list of blocks was "
                                          "found in Linear .*transformer_layer_cls_to_wrap"):
        sharding_arguments(config_with(fsdp="full_shard"), blockless)


def test_training_arguments_accept_the_fsdp_kwargs(llama, tmp_path, monkeypatch):
    from transformers import TrainingArguments

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments sets it; restored after
    extra = sharding_arguments(config_with(fsdp="full_shard auto_wrap offload"), llama)
    args = TrainingArguments(**extra, use_cpu=True, output_dir=str(tmp_path), report_to="none")
    assert args.fsdp is True
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "cpu_offload": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_cls_names_to_wrap": "LlamaDecoderLayer", "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True}
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)  # what the Trainer builds from them
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


def test_transformers_4_gets_the_option_words(llama, monkeypatch):
    from transformers import TrainingArguments

    monkeypatch.delattr(TrainingArguments, "_process_fsdp_args")
    assert sharding_arguments(config_with(fsdp="full_shard"), llama)["fsdp"] == "full_shard auto_wrap"
    assert sharding_arguments(config_with(fsdp="auto_wrap shard_grad_op"), llama)["fsdp"] == "auto_wrap shard_grad_op"


def test_sharding_is_refused_without_cuda():
    with pytest.raises(ConfigError, match="fsdp: 'full_shard' needs CUDA GPUs.*plain DDP"):
        check_sharding_supported(config_with(fsdp="full_shard"), cuda_available=False)
    with pytest.raises(ConfigError, match="deepspeed: z.json needs CUDA GPUs"):
        check_sharding_supported(config_with(deepspeed="z.json"), cuda_available=False)
    check_sharding_supported(RunConfig(), cuda_available=False)
    check_sharding_supported(config_with(fsdp="full_shard"), cuda_available=True)


def test_fsdp_and_deepspeed_together_are_refused(llama):
    with pytest.raises(ConfigError, match="fsdp and deepspeed: choose one"):
        sharding_arguments(config_with(fsdp="full_shard", deepspeed="z.json"), llama)


def test_multi_gpu_example_takes_the_fsdp_lines():
    config = load_config(EXAMPLES / "multi_gpu_lora.yaml",
                         ["fsdp=full_shard auto_wrap", "fsdp_config={activation_checkpointing: true}"])
    assert config.train.fsdp == "full_shard auto_wrap"
    assert config.train.fsdp_config == {"activation_checkpointing": True}
    assert config.train.ddp_timeout == 1800 and config.method.method == "lora"


# -- DeepSpeed ----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_example_deepspeed_configs(stage):
    settings = load_deepspeed_config(str(EXAMPLES / "deepspeed" / f"zero{stage}.json"))
    zero = settings["zero_optimization"]
    assert zero["stage"] == stage and zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert settings["bf16"] == {"enabled": "auto"}
    assert settings["train_micro_batch_size_per_gpu"] == "auto" and settings["gradient_accumulation_steps"] == "auto"
    assert "optimizer" not in settings and "scheduler" not in settings  # chattune's optim and scheduler apply
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=f"deepspeed: {missing}: no such file; expected a DeepSpeed JSON config"):
        sharding_arguments(config_with(deepspeed=str(missing)))


def test_deepspeed_bad_json_names_line_and_column(tmp_path):
    path = write(tmp_path / "bad.json", '{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n')
    with pytest.raises(ConfigError) as caught:
        sharding_arguments(config_with(deepspeed=path))
    assert str(caught.value) == (f"deepspeed: {path}: invalid JSON at line 4, column 3: "
                                 "Expecting property name enclosed in double quotes")
    with pytest.raises(ConfigError, match="deepspeed: .*list.json: expected a JSON object"):
        sharding_arguments(config_with(deepspeed=write(tmp_path / "list.json", [1, 2])))


@pytest.mark.parametrize("settings, found", [
    ({"zero_optimization": {"stage": 1}}, "has zero_optimization.stage 1"),
    ({"zero_optimization": {"stage": 0}}, "has zero_optimization.stage 0"),
    ({"zero_optimization": {"stage": "auto"}}, "has zero_optimization.stage 'auto'"),
    ({"zero_optimization": {"stage": True}}, "has zero_optimization.stage True"),
    ({"train_batch_size": "auto"}, "has no zero_optimization.stage"),
])
def test_deepspeed_unsupported_stage(settings, found, tmp_path):
    path = write(tmp_path / "ds.json", settings)
    with pytest.raises(ConfigError) as caught:
        sharding_arguments(config_with(deepspeed=path))
    assert str(caught.value) == (f"deepspeed: {path} {found}; chattune supports ZeRO stages 2 and 3 "
                                 "(examples/deepspeed/zero2.json, examples/deepspeed/zero3.json)")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_without_the_package_says_how_to_install():
    path = str(EXAMPLES / "deepspeed" / "zero2.json")
    with pytest.raises(ConfigError) as caught:
        sharding_arguments(config_with(deepspeed=path))
    assert str(caught.value) == f"deepspeed: {path} needs the deepspeed package: pip install 'chattune[deepspeed]'"
