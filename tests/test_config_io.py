"""Tests for chattune.config_io: flat YAML + key=value overrides -> typed, checked RunConfig."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from chattune.config import GROUPS, DataSource, RunConfig
from chattune.config_io import (
    build_config,
    data_source,
    describe_keys,
    load_config,
    parse_bool,
    resume_setting,
)
from chattune.errors import ConfigError

TUTORIAL_YAML = """\
model_name_or_path: /models/chatglm-6b
lora_rank: 8
per_device_train_batch_size: 6
gradient_accumulation_steps: 1
max_steps: 52000
save_steps: 1000
save_total_limit: 2
learning_rate: 1e-4
fp16: true
logging_steps: 50
output_dir: output
"""


@pytest.fixture
def tutorial_file(tmp_path: Path) -> Path:
    path = tmp_path / "tutorial.yaml"
    path.write_text(TUTORIAL_YAML, encoding="utf-8")
    return path


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- loading the tutorial's arguments ------------------------------------------------------


def test_yaml_parses_1e_minus_4_as_string():
    # The premise for the float coercion below: PyYAML (YAML 1.1) leaves "1e-4" a string.
    assert yaml.safe_load("learning_rate: 1e-4") == {"learning_rate": "1e-4"}


def test_tutorial_yaml_loads_into_typed_fields(tutorial_file):
    config = load_config(tutorial_file)
    assert isinstance(config, RunConfig)
    assert config.model.model_name_or_path == "/models/chatglm-6b"
    m, t = config.method, config.train
    assert m.lora_rank == 8 and type(m.lora_rank) is int
    assert t.per_device_train_batch_size == 6 and type(t.per_device_train_batch_size) is int
    assert t.gradient_accumulation_steps == 1
    assert t.max_steps == 52000 and type(t.max_steps) is int
    assert t.save_steps == 1000
    assert t.save_total_limit == 2
    assert type(t.learning_rate) is float
    assert t.learning_rate == pytest.approx(1e-4)
    assert t.fp16 is True
    assert t.bf16 is False
    assert t.logging_steps == 50
    assert t.output_dir == "output"


def test_unset_keys_keep_defaults(tutorial_file):
    config = load_config(tutorial_file)
    assert config.train.seed == 42
    assert config.train.report_to == ["tensorboard"]
    assert config.method.lora_target is None
    assert config.data.train_files == []
    assert config.generate.max_new_tokens == 256


def test_no_file_and_no_overrides_gives_defaults():
    assert load_config(None) == RunConfig()
    assert build_config({}) == RunConfig()


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == RunConfig()


def test_path_may_be_str(tutorial_file):
    assert load_config(str(tutorial_file)) == load_config(tutorial_file)


# --- overrides -----------------------------------------------------------------------------


def test_overrides_win_over_file(tutorial_file):
    config = load_config(tutorial_file, ["max_steps=10", "learning_rate=5e-5", "output_dir=run2"])
    assert config.train.max_steps == 10
    assert config.train.learning_rate == pytest.approx(5e-5)
    assert config.train.output_dir == "run2"
    assert config.method.lora_rank == 8  # untouched file value kept


def test_last_override_wins():
    assert load_config(None, ["lora_rank=4", "lora_rank=16"]).method.lora_rank == 16


def test_override_value_may_contain_equals_sign():
    config = load_config(None, ["model_name_or_path=/m/a=b"])
    assert config.model.model_name_or_path == "/m/a=b"


@pytest.mark.parametrize("text", ["false", "False", "FALSE", "0", "no", "off", "n", " false "])
def test_fp16_false_spellings_are_false(tutorial_file, text):
    # The classic argparse type=bool trap: bool("False") is True. Here it must be False.
    config = load_config(tutorial_file, [f"fp16={text}"])
    assert config.train.fp16 is False


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", "on", "y"])
def test_bool_true_spellings_are_true(text):
    assert load_config(None, [f"gradient_checkpointing={text}"]).train.gradient_checkpointing is True


def test_fp16_maybe_is_error_naming_fp16(tutorial_file):
    with pytest.raises(ConfigError, match="fp16") as info:
        load_config(tutorial_file, ["fp16=maybe"])
    assert "maybe" in str(info.value)


def test_override_without_equals_is_error():
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, ["max_steps"])


# --- parse_bool ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("Yes", True), ("off", False),
     ("T", True), ("f", False)],
)
def test_parse_bool_accepts(value, expected):
    assert parse_bool(value, "k") is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, -1, 0.0, None, [True]])
def test_parse_bool_rejects_naming_key(value):
    with pytest.raises(ConfigError, match="my_flag"):
        parse_bool(value, "my_flag")


# --- unknown keys, wrong types, impossible values ------------------------------------------


def test_unknown_key_names_key_and_suggests_close_match():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lora_rnak=4"])
    message = str(info.value)
    assert "lora_rnak" in message
    assert "did you mean" in message and "lora_rank" in message


def test_unknown_key_in_file_suggests_close_match(tmp_path):
    path = write_yaml(tmp_path, "learnig_rate: 0.001\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "learnig_rate" in message and "learning_rate" in message
    assert str(path) in message


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as info:
        build_config({"zzzzqqq": 1})
    assert "zzzzqqq" in str(info.value)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("max_steps=abc", "max_steps"),
        ("max_steps=1.5", "max_steps"),
        ("learning_rate=fast", "learning_rate"),
        ("lora_rank=eight", "lora_rank"),
        ("save_total_limit=two", "save_total_limit"),
        ("lora_alpha=big", "lora_alpha"),
        ("dtype=float8", "dtype"),
        ("method=prompt_tuning", "method"),
    ],
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"max_steps": True}, "max_steps"),  # a bool is not an int
        ({"learning_rate": False}, "learning_rate"),
        ({"max_steps": 2.5}, "max_steps"),
        ({"output_dir": ["a", "b"]}, "output_dir"),
        ({"fp16": "maybe"}, "fp16"),
    ],
)
def test_wrong_type_in_mapping_names_key(values, key):
    with pytest.raises(ConfigError, match=key):
        build_config(values)


def test_integral_float_is_accepted_as_int():
    assert build_config({"max_steps": 100.0}).train.max_steps == 100


def test_int_is_accepted_as_float():
    config = build_config({"num_train_epochs": 2})
    assert config.train.num_train_epochs == 2.0 and type(config.train.num_train_epochs) is float


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora_rank=0", "lora_rank"),
        ("eval_fraction=1.5", "eval_fraction"),
        ("eval_fraction=1", "eval_fraction"),
        ("eval_fraction=-0.1", "eval_fraction"),
        ("per_device_train_batch_size=0", "per_device_train_batch_size"),
        ("per_device_eval_batch_size=0", "per_device_eval_batch_size"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps"),
        ("max_steps=0", "max_steps"),
        ("max_steps=-2", "max_steps"),
        ("num_train_epochs=0", "num_train_epochs"),
        ("learning_rate=0", "learning_rate"),
        ("learning_rate=nan", "learning_rate"),
        ("warmup_steps=-1", "warmup_steps"),
        ("logging_steps=0", "logging_steps"),
        ("save_steps=0", "save_steps"),
        ("save_total_limit=0", "save_total_limit"),
        ("eval_steps=0", "eval_steps"),
        ("max_grad_norm=-1", "max_grad_norm"),
        ("max_seq_length=4", "max_seq_length"),
        ("lora_dropout=1.0", "lora_dropout"),
        ("max_new_tokens=0", "max_new_tokens"),
        ("temperature=0", "temperature"),
        ("top_p=0", "top_p"),
        ("top_p=1.5", "top_p"),
    ],
)
def test_impossible_value_names_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_fp16_and_bf16_both_true_is_error(tutorial_file):
    with pytest.raises(ConfigError) as info:
        load_config(tutorial_file, ["bf16=true"])
    assert "fp16" in str(info.value) and "bf16" in str(info.value)


def test_boundary_values_are_accepted():
    config = load_config(None, ["max_steps=-1", "eval_fraction=0", "lora_rank=1", "top_p=1",
                                "max_seq_length=8", "max_grad_norm=0", "warmup_steps=0"])
    assert config.train.max_steps == -1
    assert config.data.eval_fraction == 0.0
    assert config.generate.top_p == 1.0


def test_negative_dataloader_num_workers_is_error():
    with pytest.raises(ConfigError, match="dataloader_num_workers: must be >= 0"):
        load_config(None, ["dataloader_num_workers=-1"])


def test_zero_repetition_penalty_is_error():
    with pytest.raises(ConfigError, match="repetition_penalty: must be > 0"):
        load_config(None, ["repetition_penalty=0"])


# --- errors from load_config name the file -------------------------------------------------


@pytest.mark.parametrize("text", ["max_steps: abc\n", "lora_rank: 0\n", "lora_rnak: 4\n",
                                  "fp16: true\nbf16: true\n"])
def test_file_errors_name_the_file(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("override", ["max_steps=abc", "lora_rnak=4", "num_train_epochs=inf", "learning_rate=1e38",
                                      "train_files=[{path: a.json, weight: 0}]", "bf16=true"])
def test_override_errors_name_the_command_line_not_the_file(tutorial_file, override):
    with pytest.raises(ConfigError) as info:
        load_config(tutorial_file, [override])
    assert str(info.value).startswith("command line: ")
    assert str(tutorial_file) not in str(info.value)
    assert override.split("=")[0].replace("lora_rnak", "'lora_rnak'") in str(info.value)


def test_the_config_remembers_where_each_key_came_from(tutorial_file):
    from chattune.config_io import source_prefix

    config = load_config(tutorial_file, ["max_steps=3"])
    assert source_prefix(config, "max_steps") == "command line: "
    assert source_prefix(config, "lora_rank") == f"{tutorial_file}: "
    assert source_prefix(config, "weight_decay") == ""  # a default
    assert source_prefix(load_config(None, ["max_steps=3"]), "max_steps") == ""


def test_errors_without_file_have_no_path_prefix():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["max_steps=abc"])
    assert str(info.value).startswith("max_steps")


def test_missing_file_is_clear_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert "not found" in str(info.value)
    assert str(missing) in str(info.value)


def test_directory_as_config_is_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["- lora_rank: 8\n- fp16: true\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_is_clear_error(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "mapping" in str(info.value)


def test_invalid_yaml_is_config_error(tmp_path):
    path = write_yaml(tmp_path, "lora_rank: [8\nfp16: : true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "YAML" in str(info.value)



def test_a_binary_config_file_is_one_line_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"lora_rank: 8\n" + bytes(range(128, 256)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not UTF-8 text (invalid start byte at byte 13); expected a YAML config file"


def test_a_yaml_error_is_one_line(tmp_path):
    path = write_yaml(tmp_path, "lora_rank: [8\nfp16: : true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)

def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# --- train_files / eval_files --------------------------------------------------------------


def test_train_files_plain_path_string(tmp_path):
    config = load_config(write_yaml(tmp_path, "train_files: data/a.json\n"))
    assert config.data.train_files == [DataSource(path="data/a.json")]


def test_train_files_list_of_paths(tmp_path):
    config = load_config(write_yaml(tmp_path, "train_files: [a.json, b.jsonl]\n"))
    assert [s.path for s in config.data.train_files] == ["a.json", "b.jsonl"]
    assert all(s.format == "auto" and s.weight == 1.0 for s in config.data.train_files)


def test_train_files_list_of_mappings(tmp_path):
    text = """\
train_files:
  - path: a.json
    format: alpaca
    max_samples: 100
    weight: 2
  - path: b.csv
    format: columns
    columns: {prompt: content, response: summary}
    weight: 0.5
  - c.jsonl
"""
    files = load_config(write_yaml(tmp_path, text)).data.train_files
    assert files[0] == DataSource(path="a.json", format="alpaca", max_samples=100, weight=2.0)
    assert type(files[0].weight) is float
    assert files[1] == DataSource(path="b.csv", format="columns",
                                  columns={"prompt": "content", "response": "summary"}, weight=0.5)
    assert files[2] == DataSource(path="c.jsonl")


def test_train_files_from_override_comma_list():
    config = load_config(None, ["train_files=a.json,b.json"])
    assert [s.path for s in config.data.train_files] == ["a.json", "b.json"]


def test_train_files_from_override_yaml_list():
    config = load_config(None, ["train_files=[{path: a.json, weight: 3}]"])
    assert config.data.train_files == [DataSource(path="a.json", weight=3.0)]


def test_eval_files_accept_same_shapes():
    config = build_config({"eval_files": [{"path": "e.json", "format": "sharegpt"}, "f.json"]})
    assert config.data.eval_files == [DataSource(path="e.json", format="sharegpt"),
                                      DataSource(path="f.json")]


def test_train_files_unknown_mapping_key_is_error_naming_it():
    with pytest.raises(ConfigError) as info:
        build_config({"train_files": [{"path": "a.json", "wieght": 2}]})
    assert "train_files" in str(info.value) and "wieght" in str(info.value)


def test_train_files_mapping_without_path_is_error():
    with pytest.raises(ConfigError) as info:
        build_config({"train_files": [{"format": "alpaca"}]})
    assert "train_files" in str(info.value) and "path" in str(info.value)


@pytest.mark.parametrize("weight", [0, -1, "0", -0.5])
def test_train_files_nonpositive_weight_is_error(weight):
    with pytest.raises(ConfigError) as info:
        build_config({"train_files": [{"path": "a.json", "weight": weight}]})
    assert "train_files" in str(info.value) and "weight" in str(info.value)


def test_train_files_bad_max_samples_and_format_are_errors():
    with pytest.raises(ConfigError, match=r"max_samples"):
        build_config({"train_files": [{"path": "a.json", "max_samples": 0}]})
    with pytest.raises(ConfigError, match=r"train_files\[0\]\.format"):
        build_config({"train_files": [{"path": "a.json", "format": "csv"}]})
    with pytest.raises(ConfigError, match=r"weight"):
        build_config({"train_files": [{"path": "a.json", "weight": "heavy"}]})


def test_train_files_error_in_file_names_file(tmp_path):
    path = write_yaml(tmp_path, "train_files:\n  - path: a.json\n    weight: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "weight" in str(info.value)


def test_train_files_non_mapping_item_is_error():
    with pytest.raises(ConfigError, match="train_files"):
        build_config({"train_files": [42]})


def test_data_source_helper():
    assert data_source("x.json") == DataSource(path="x.json")
    existing = DataSource(path="y.json", weight=2.0)
    assert data_source(existing) is existing
    with pytest.raises(ConfigError, match="eval_files"):
        data_source({"path": "z.json", "bogus": 1}, "eval_files")
    with pytest.raises(ConfigError, match="train_files"):
        data_source(3.5)


def test_train_files_nan_weight_is_error():
    with pytest.raises(ConfigError, match=r"weight: must be a finite number > 0"):
        build_config({"train_files": [{"path": "a.json", "weight": math.nan}]})


@pytest.mark.parametrize("weight", [math.inf, -math.inf])
def test_train_files_infinite_weight_is_error(weight):
    with pytest.raises(ConfigError, match=r"weight: must be a finite number > 0"):
        build_config({"train_files": [{"path": "a.json", "weight": weight}]})


# --- list fields from overrides ------------------------------------------------------------


def test_lora_target_comma_list():
    config = load_config(None, ["lora_target=q_proj,v_proj"])
    assert config.method.lora_target == ["q_proj", "v_proj"]


def test_lora_target_yaml_list_override_and_single():
    assert load_config(None, ["lora_target=[q_proj, k_proj]"]).method.lora_target == ["q_proj", "k_proj"]
    assert load_config(None, ["lora_target=query_key_value"]).method.lora_target == ["query_key_value"]
    assert load_config(None, ["lora_target=null"]).method.lora_target is None


def test_lora_target_from_yaml_file(tmp_path):
    config = load_config(write_yaml(tmp_path, "lora_target:\n  - q_proj\n  - v_proj\n"))
    assert config.method.lora_target == ["q_proj", "v_proj"]


def test_report_to_none_and_list():
    assert load_config(None, ["report_to=none"]).train.report_to == ["none"]
    assert load_config(None, ["report_to=tensorboard,wandb"]).train.report_to == ["tensorboard", "wandb"]


def test_lora_target_comma_list_with_spaces():
    config = load_config(None, ["lora_target=q_proj, v_proj"])
    assert config.method.lora_target == ["q_proj", "v_proj"]


def test_null_for_required_string_is_error(tmp_path):
    with pytest.raises(ConfigError, match="output_dir: expected a string, got null"):
        load_config(write_yaml(tmp_path, "output_dir: null\n"))


# --- optional fields -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["null", "None", "none"])
def test_optional_fields_accept_null_spellings(text):
    config = load_config(None, [f"save_total_limit={text}", f"lora_alpha={text}",
                                f"device_map={text}", f"eval_steps={text}"])
    assert config.train.save_total_limit is None
    assert config.method.lora_alpha is None
    assert config.model.device_map is None
    assert config.train.eval_steps is None


# --- resume_setting ------------------------------------------------------------------------


def resume(value):
    return resume_setting(build_config({"resume_from_checkpoint": value}))


@pytest.mark.parametrize("value", ["true", "True", "yes", "1", True])
def test_resume_true_means_latest(value):
    assert resume(value) is True


@pytest.mark.parametrize("value", ["false", "False", "no", "0", False, None, "null"])
def test_resume_false_or_none_means_no_resume(value):
    assert resume(value) is None


def test_resume_default_is_none():
    assert resume_setting(RunConfig()) is None


def test_resume_path_is_returned():
    assert resume("output/checkpoint-1000") == "output/checkpoint-1000"


def test_resume_from_yaml_file(tmp_path):
    assert resume_setting(load_config(write_yaml(tmp_path, "resume_from_checkpoint: true\n"))) is True
    assert resume_setting(load_config(write_yaml(tmp_path, "resume_from_checkpoint: false\n"))) is None
    assert resume_setting(load_config(None, ["resume_from_checkpoint=true"])) is True


# --- describe_keys -------------------------------------------------------------------------


def test_describe_keys_lists_every_field_of_every_group():
    text = describe_keys()
    for group, cls in GROUPS.items():
        assert f"[{group}]" in text
        for f in dataclasses.fields(cls):
            assert f"  {f.name} (default: " in text, f.name


def test_describe_keys_every_field_has_docstring_line():
    lines = describe_keys().splitlines()
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            index = lines.index(next(x for x in lines if x.startswith(f"  {f.name} (default: ")))
            doc = lines[index + 1]
            assert doc.startswith("      ") and doc.strip(), f.name


@pytest.mark.parametrize(
    ("key", "doc"),
    [
        ("lora_rank", "LoRA rank r (lora, qlora)."),
        ("fp16", "Mixed precision float16 (CUDA)."),
        ("learning_rate", "Peak learning rate."),
        ("save_total_limit", "Keep at most this many checkpoints"),
        ("train_files", "Training data files"),
        ("model_name_or_path", "Hugging Face causal LM"),
        ("top_p", "Nucleus sampling mass"),
    ],
)
def test_describe_keys_spot_checks(key, doc):
    lines = describe_keys().splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key} (default:"))
    assert doc in lines[index + 1]


def test_describe_keys_joins_multiline_docstrings_and_shows_defaults():
    text = describe_keys()
    # template's docstring spans four source lines; it is printed on one line.
    assert "``tokenizer``, or a named one (``chattune templates`` lists them: alpaca, chinese-alpaca" in text
    assert "lora_rank (default: 8)" in text
    assert "report_to (default: ['tensorboard'])" in text


# --- to_flat_dict round trip ---------------------------------------------------------------


def test_to_flat_dict_has_every_key_once():
    flat = RunConfig().to_flat_dict()
    expected = {f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    assert set(flat) == expected
    assert sum(len(dataclasses.fields(cls)) for cls in GROUPS.values()) == len(expected)


def test_default_config_round_trips():
    config = RunConfig()
    assert build_config(config.to_flat_dict()) == config


def test_rich_config_round_trips(tutorial_file):
    config = load_config(tutorial_file, [
        "train_files=[{path: a.json, format: columns, columns: {prompt: p, response: r}, "
        "max_samples: 5, weight: 1.5}, b.json]",
        "eval_files=e.json",
        "lora_target=q_proj,v_proj",
        "report_to=none",
        "resume_from_checkpoint=true",
        "lora_alpha=32",
        "save_total_limit=null",
        "device_map=auto",
    ])
    flat = config.to_flat_dict()
    assert build_config(flat) == config
    # and through YAML text, as a run folder would save it
    assert build_config(yaml.safe_load(yaml.safe_dump(flat))) == config


def test_flat_dict_through_yaml_file(tmp_path, tutorial_file):
    config = load_config(tutorial_file)
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(config.to_flat_dict()), encoding="utf-8")
    assert load_config(path) == config
