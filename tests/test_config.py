"""The config dataclasses: defaults that are valid, and each group checking its own keys."""

from __future__ import annotations

import pytest

from chattune.config import GROUPS, DataArgs, GenerateArgs, MethodArgs, RunConfig, TrainArgs
from chattune.errors import ChattuneError, ConfigError


def test_the_defaults_are_valid():
    RunConfig().validate()
    for cls in GROUPS.values():
        if hasattr(cls, "validate"):
            cls().validate()


@pytest.mark.parametrize(("group", "values", "key"), [
    (TrainArgs, {"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    (TrainArgs, {"max_steps": 0}, "max_steps"),
    (TrainArgs, {"num_train_epochs": float("inf")}, "num_train_epochs"),
    (TrainArgs, {"learning_rate": 1e38}, "learning_rate"),
    (TrainArgs, {"learning_rate": float("inf")}, "learning_rate"),
    (TrainArgs, {"weight_decay": float("nan")}, "weight_decay"),
    (TrainArgs, {"fp16": True, "bf16": True}, "fp16 and bf16"),
    (TrainArgs, {"optim": "adamw_magic"}, "optim"),
    (TrainArgs, {"loss_chunk_size": 0}, "loss_chunk_size"),
    (TrainArgs, {"lr_scheduler_type": "bogus"}, "lr_scheduler_type"),
    (DataArgs, {"max_seq_length": 4}, "max_seq_length"),
    (DataArgs, {"max_seq_length": 512, "pack_length": 256}, "pack_length"),
    (DataArgs, {"eval_fraction": 1.0}, "eval_fraction"),
    (MethodArgs, {"lora_rank": 0}, "lora_rank"),
    (MethodArgs, {"quantization_bit": 3}, "quantization_bit"),
    (MethodArgs, {"freeze_trainable_layers": 0}, "freeze_trainable_layers"),
    (GenerateArgs, {"top_p": 0.0}, "top_p"),
    (GenerateArgs, {"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_a_group_names_its_impossible_key(group, values, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        group(**values).validate()
    name = next(name for name, cls in GROUPS.items() if cls is group)
    with pytest.raises(ConfigError, match=f"^{key}: "):  # a group is checked as it is built, in a RunConfig too
        RunConfig(**{name: values})



@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_a_seed_numpy_cannot_take_is_refused_naming_the_range(seed):
    from chattune.config_io import load_config

    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"seed={seed}"])
    assert str(caught.value) == f"seed: must be an integer from 0 to 2**32 - 1 (4294967295), got {seed}"


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_the_ends_of_the_seed_range_are_valid(seed):
    TrainArgs(seed=seed).validate()


def test_config_errors_are_chattune_errors():
    assert issubclass(ConfigError, ChattuneError) and issubclass(ConfigError, ValueError)


def test_a_group_is_a_pydantic_model_that_refuses_unknown_keys():
    with pytest.raises(ConfigError, match=r"^unknown config key 'sed'; did you mean seed\?$"):
        TrainArgs(sed=1)
    assert TrainArgs.__pydantic_fields__["fp16"].description == "Mixed precision float16 (CUDA)."


@pytest.mark.parametrize(("value", "expected"), [("Yes", True), (" off ", False), ("t", True), (0, False), (True, True)])
def test_boolean_words_are_read_strictly(value, expected):
    assert TrainArgs(fp16=value).fp16 is expected


@pytest.mark.parametrize("value", ["maybe", 2, 1.0, None, "tru"])
def test_other_booleans_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as caught:
        TrainArgs(fp16=value)
    assert str(caught.value) == f"fp16: expected a boolean (true/false), got {value!r}"


def test_an_integer_key_takes_no_fraction_and_a_built_group_is_checked_again_when_replaced():
    import dataclasses

    assert TrainArgs(seed=7.0).seed == 7
    with pytest.raises(ConfigError, match=r"^seed: expected an integer, got 1\.5$"):
        TrainArgs(seed=1.5)
    with pytest.raises(ConfigError, match="^fp16 and bf16: choose one$"):
        dataclasses.replace(TrainArgs(fp16=True), bf16="yes")
