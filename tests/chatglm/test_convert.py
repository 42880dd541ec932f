"""THUDM folders into native ones: recognised, converted once and cached, refused with a
reason when they cannot be, and planned (``--dry-run``) at their published sizes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from chattune.chatglm import convert, native_config, native_model_path, thudm_family
from chattune.chatglm.convert import cache_root
from chattune.cli import main
from chattune.errors import ModelLoadError
from tests.chatglm.thudm_folder import build_thudm_folder

FAMILIES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")
# the published config.json values the fixtures shrank (../shared/fixtures/chatglm/README.md)
PUBLISHED = {
    "chatglm-6b": {"num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "inner_hidden_size": 16384,
                   "max_sequence_length": 2048, "torch_dtype": "float16"},
    "chatglm2-6b": {"num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "ffn_hidden_size": 13696,
                    "kv_channels": 128, "seq_length": 32768, "torch_dtype": "float16"},
    "chatglm3-6b": {"num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "ffn_hidden_size": 13696,
                    "kv_channels": 128, "seq_length": 8192, "torch_dtype": "float16"},
}


@pytest.fixture(autouse=True)
def native_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path / "cache"))


def _copy_fixture(fixture_dir, family: str, out: Path, **config_changes) -> Path:
    shutil.copytree(fixture_dir(family), out)
    os.chmod(out, 0o755)
    for file in out.iterdir():
        os.chmod(file, 0o644)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def thudm_folders(fixture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("thudm")
    return {family: build_thudm_folder(root / family, fixture_dir(family)) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_recognised(thudm_folders, family):
    assert thudm_family(thudm_folders[family]) == family


def test_other_folders_are_left_alone(tiny_models, tmp_path):
    assert thudm_family(tiny_models("glm4")) is None
    assert thudm_family(tmp_path) is None
    assert native_model_path(str(tiny_models("glm4"))) == str(tiny_models("glm4"))
    assert native_model_path("org/some-hub-id") == "org/some-hub-id"


def test_glm4_remote_code_is_refused_with_the_native_release_named(fixture_dir, tmp_path):
    folder = _copy_fixture(fixture_dir, "chatglm3-6b", tmp_path / "glm4", padded_vocab_size=151552)
    with pytest.raises(ModelLoadError, match=r"padded_vocab_size 151552.*glm-4-9b-chat-hf"):
        thudm_family(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_once_then_reused_and_again_when_the_weights_change(thudm_folders, family, capfd):
    source = thudm_folders[family]
    first = native_model_path(str(source))
    assert "converting" in capfd.readouterr().err
    assert Path(first).parent == cache_root() and Path(first).name.startswith(family)
    marker = json.loads((Path(first) / "chattune_native.json").read_text())
    assert marker["source"] == str(source.resolve()) and marker["family"] == family
    assert native_model_path(str(source)) == first
    assert "converting" not in capfd.readouterr().err
    weights = source / "pytorch_model.bin"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert native_model_path(str(source)) != first


def test_glm_conversion_splits_query_key_value_exactly(thudm_folders, tmp_path):
    """The fused THUDM tensors become q/k/v (2 multi-query groups as key/value heads),
    gate_up/down and lm_head, value for value; nothing is left over."""
    from safetensors.torch import load_file

    source = thudm_folders["chatglm3-6b"]
    target = convert(source, tmp_path / "native")
    original = torch.load(source / "pytorch_model.bin", weights_only=True)
    converted = {}
    for file in target.glob("*.safetensors"):
        converted.update(load_file(str(file)))
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "glm" and config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    fused = original["transformer.encoder.layers.1.self_attention.query_key_value.weight"]
    q, k, v = (converted[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert q.shape == (64, 64) and k.shape == v.shape == (32, 64)
    assert torch.equal(torch.cat([q, k, v]), fused)
    assert torch.equal(converted["lm_head.weight"], original["transformer.output_layer.weight"])
    assert torch.equal(converted["model.layers.0.mlp.gate_up_proj.weight"],
                       original["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"])
    assert len(converted) == len(original) + 2 * 2 * 2  # qkv weight and bias: 1 -> 3, in 2 layers


def test_glm6b_weights_are_linked_not_copied(thudm_folders, tmp_path):
    target = convert(thudm_folders["chatglm-6b"], tmp_path / "native")
    weights = target / "pytorch_model.bin"
    assert weights.is_symlink() and weights.resolve() == (thudm_folders["chatglm-6b"] / "pytorch_model.bin").resolve()
    assert json.loads((target / "config.json").read_text())["model_type"] == "chatglm6b"


@pytest.mark.parametrize(("change", "message"), [
    ({"quantization_bit": 4}, r"quantization_bit: 4: THUDM's int4/int8 checkpoints"),
    ({"pre_seq_len": 128}, r"pre_seq_len: 128: this folder carries THUDM's P-Tuning v2"),
    ({"rmsnorm": False}, r"rmsnorm: False; chattune converts the published architecture"),
])
def test_unconvertible_configs_are_refused_naming_the_key(fixture_dir, tmp_path, change, message):
    folder = _copy_fixture(fixture_dir, "chatglm2-6b", tmp_path / "m", **change)
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=message):
        native_model_path(str(folder))


def test_a_missing_shard_is_named_and_nothing_half_made_is_left(thudm_folders, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(thudm_folders["chatglm2-6b"], folder)
    (folder / "pytorch_model.bin").rename(folder / "pytorch_model-00001-of-00002.bin")
    index = {"metadata": {}, "weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                                            "b": "pytorch_model-00002-of-00002.bin"}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"names pytorch_model-00002-of-00002.bin.*1 of 2 shards missing"):
        native_model_path(str(folder))
    assert not cache_root().exists() or not list(cache_root().iterdir())


def test_a_failed_conversion_leaves_no_folder(thudm_folders, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(thudm_folders["chatglm2-6b"], folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["transformer.encoder.layers.0.something_new.weight"] = torch.zeros(2)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"unexpected parameter transformer.encoder.layers.0.something_new"):
        native_model_path(str(folder))
    assert not list(cache_root().iterdir())


def test_convert_command(thudm_folders, tmp_path, capsys):
    assert main(["convert", str(thudm_folders["chatglm2-6b"]), str(tmp_path / "out")]) == 0
    assert f"native model folder at {tmp_path / 'out'}" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert main(["convert", str(thudm_folders["chatglm2-6b"]), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(thudm_folders["chatglm3-6b"])]) == 0
    assert str(cache_root()) in capsys.readouterr().out
    assert main(["convert", str(tmp_path)]) == 2
    assert "not a THUDM ChatGLM folder" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_at_published_sizes_reproduces_the_tutorials_16_gb(fixture_dir, tmp_path, capsys, family):
    """The tutorial: LoRA r=8, batch 6 x 128 tokens, fp16, "显存 >= 16G". The plan reads only
    config.json (no weights exist here) and lands just under 16 GiB before CUDA's own share."""
    folder = _copy_fixture(fixture_dir, family, tmp_path / family, **PUBLISHED[family])
    assert main(["train", f"model_name_or_path={folder}", "method=lora", "lora_rank=8", "fp16=true",
                 "per_device_train_batch_size=6", "max_seq_length=128", "--dry-run"]) == 0
    out = capsys.readouterr().out
    total = float(out.split("total")[1].split("GiB")[0])
    assert 14.5 <= total <= 16.0, out
    params = int(out.split(" of ")[1].split(" parameters")[0].replace(",", ""))
    assert 6.1e9 <= params <= 6.3e9  # "6B"
    if family == "chatglm-6b":  # LoRA on query_key_value, as the tutorial: 28 x (4096 x 8 + 8 x 12288)
        assert "3,670,016 trainable" in out
    assert native_config(str(folder)) is not None and not cache_root().exists()  # nothing converted
