"""The training form: made from the documented config keys, checked by chattune train's own code."""

from __future__ import annotations

import json

import pytest
import yaml

from chattune.config_io import documented_keys, load_config
from chattune.workbench.form import CLOSED_KEYS, FormError, read_form, schema
from tests.workbench.conftest import make_folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_models):
    return make_folders(tmp_path_factory.mktemp("form"), tiny_models("llama"))


BASE = {"model_name_or_path": "tiny", "train_files": "alpaca.json", "output_dir": "run-a"}


def keys_of(form: dict) -> dict:
    return {key["key"]: {**key, "group": group["name"]} for group in form["groups"] for key in group["keys"]}


def test_the_schema_lists_every_documented_key_but_the_closed_ones_with_help_and_defaults():
    keys = keys_of(schema())
    documented = {item.key for item in documented_keys()}
    assert set(keys) == documented - set(CLOSED_KEYS)
    assert [g["name"] for g in schema()["groups"]] == ["model", "data", "method", "train", "generate", "preference",
                                                       "rl"]
    rank = keys["lora_rank"]
    assert (rank["type"], rank["default"], rank["default_text"], rank["methods"]) == ("int", 8, "8", ["lora", "qlora"])
    assert rank["help"] and rank["group"] == "method"
    assert keys["method"]["type"] == "choice" and "ptuning" in keys["method"]["choices"]
    assert keys["pre_seq_len"]["methods"] == ["ptuning"]
    assert keys["freeze_trainable_layers"]["methods"] == ["freeze"]
    assert keys["train_files"]["type"] == "data" and keys["train_files"]["folder"] == "data"
    assert keys["model_name_or_path"]["folder"] == "models" and keys["model_name_or_path"]["required"]
    assert keys["bf16"]["type"] == "bool" and keys["bf16"]["default_text"] == "false"
    json.dumps(schema())  # all of it is JSON


def test_a_valid_form_is_the_config_chattune_train_reads_from_its_yaml(folders):
    form = read_form({**BASE, "lora_rank": "4", "max_steps": "3", "lora_target": "q_proj,v_proj", "bf16": ""},
                     folders)
    assert form.config.method.lora_rank == 4
    assert form.config.model.model_name_or_path == str(folders.models / "tiny")
    assert form.config.train.output_dir == str(folders.runs / "run-a")
    path = folders.runs.parent / "form.yaml"
    path.write_text(form.yaml())
    again = load_config(path)
    assert again == form.config
    assert yaml.safe_load(form.yaml())["lora_target"] == ["q_proj", "v_proj"]
    assert "bf16" not in yaml.safe_load(form.yaml())  # an empty field is the default
    assert form.overrides_command().startswith("chattune train model_name_or_path=")
    assert "lora_target=q_proj,v_proj" in form.overrides_command()


@pytest.mark.parametrize(("values", "key", "message"), [
    ({"lora_rank": "0"}, "lora_rank", "lora_rank: must be >= 1"),
    ({"learning_rate": "fast"}, "learning_rate", "learning_rate: expected a number, got 'fast'"),
    ({"method": "magic"}, "method", "method: expected one of"),
    ({"lora_rnak": "4"}, "lora_rnak", "unknown config key 'lora_rnak'; did you mean lora_rank"),
    ({"fp16": "true"}, "fp16", "fp16: float16 mixed precision needs a CUDA GPU"),
    ({"model_name_or_path": "../../etc"}, "model_name_or_path", "outside the models folder"),
    ({"train_files": "alpaca.json,/etc/passwd"}, "train_files", "train_files[1]: '/etc/passwd' is outside"),
    ({"output_dir": "../escape"}, "output_dir", "outside the runs folder"),
    ({"output_dir": ""}, "output_dir", "output_dir: required"),
    ({"cache_dir": "/tmp"}, "cache_dir", "cache_dir: not set from the page"),
    ({"resume_from_checkpoint": "true"}, "resume_from_checkpoint", "Resume button"),
])
def test_an_impossible_value_is_named_at_its_key_before_anything_loads(folders, values, key, message):
    with pytest.raises(FormError) as caught:
        read_form({**BASE, **values}, folders)
    errors = caught.value.errors
    assert errors[0]["key"] == key
    assert message in errors[0]["message"]


def test_every_path_problem_is_listed_at_once(folders):
    with pytest.raises(FormError) as caught:
        read_form({"model_name_or_path": "nope", "train_files": "", "output_dir": "x"}, folders)
    assert [e["key"] for e in caught.value.errors] == ["model_name_or_path", "train_files"]


def test_an_existing_run_folder_is_not_trained_over(folders):
    (folders.runs / "taken").mkdir()
    (folders.runs / "taken" / "metrics.jsonl").write_text("")
    with pytest.raises(FormError, match="already in the runs folder"):
        read_form({**BASE, "output_dir": "taken"}, folders)
    with pytest.raises(FormError, match="expected an object"):
        read_form(["not", "a", "mapping"], folders)
