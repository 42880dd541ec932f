"""A GGUF file as a model path, on files made here (nothing downloaded): which paths are
GGUF files, the quantization type's name, an architecture transformers cannot read refused
in one line, and a tiny LLaMA exported to GGUF (f16 and q8_0) converted back once, cached,
its sha256 and type recorded where a run's manifest finds them.
(tests/test_real_smollm2.py does the same on a real model.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chattune import gguf_import
from chattune.chatglm.convert import cache_root
from chattune.cli import main
from chattune.errors import ModelLoadError
from chattune.gguf_import import (
    file_type_name,
    gguf_file,
    gguf_loading,
    native_config,
    native_model_path,
)


def write_unknown_gguf(path: Path, architecture: str = "mamba9") -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_name("not a real model")
    writer.add_file_type(3)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_file_type_names():
    assert [file_type_name(v) for v in (0, 1, 3, 7, 15, 32)] == ["F32", "F16", "Q4_1", "Q8_0", "Q4_K_M", "BF16"]
    assert file_type_name(9999) == "file type 9999" and file_type_name(None) == "unknown"


def test_which_paths_are_gguf_files(tmp_path, tiny_models):
    (tmp_path / "one").mkdir()
    file = write_unknown_gguf(tmp_path / "one" / "m.gguf")
    assert gguf_file(str(file)) == file.resolve() and gguf_file(str(file.parent)) == file.resolve()
    assert gguf_file(str(tiny_models("llama"))) is None and gguf_file("org/some-hub-id") is None
    assert native_model_path("org/some-hub-id") == "org/some-hub-id"
    beside_config = tmp_path / "hf"
    beside_config.mkdir()
    (beside_config / "config.json").write_text("{}")
    write_unknown_gguf(beside_config / "m.gguf")
    assert gguf_file(str(beside_config)) is None  # a model folder that also holds a GGUF export
    two = tmp_path / "two"
    two.mkdir()
    write_unknown_gguf(two / "a.gguf")
    write_unknown_gguf(two / "b.gguf")
    with pytest.raises(ModelLoadError, match=r"a folder with 2 GGUF files \(a.gguf, b.gguf\); expected one"):
        gguf_file(str(two))
    with pytest.raises(ModelLoadError, match=r"missing.gguf: no such GGUF file"):
        gguf_file(str(tmp_path / "missing.gguf"))


def test_an_architecture_transformers_cannot_read_is_one_line(tmp_path, capsys):
    file = write_unknown_gguf(tmp_path / "m.gguf")
    with pytest.raises(ModelLoadError, match=r"GGUF architecture 'mamba9' cannot be read by transformers; "
                                             r"expected one of .*llama"):
        native_model_path(str(file))
    assert not cache_root().exists()
    for argv in (["convert", str(file)], ["train", f"model_name_or_path={file}", "--dry-run"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "GGUF architecture 'mamba9'" in err, err
    (tmp_path / "bad.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(ModelLoadError, match=r"bad.gguf: not a GGUF file chattune can read"):
        native_model_path(str(tmp_path / "bad.gguf"))


def test_transformers_is_told_gguf_is_there_only_while_loading():
    import transformers.modeling_gguf_pytorch_utils as utils

    before = utils.is_gguf_available
    with gguf_loading():
        assert utils.is_gguf_available() is True
    assert utils.is_gguf_available is before


@pytest.fixture(scope="module")
def llama_ggufs(ggufs, tmp_path_factory):
    """A tiny LLaMA and its GGUF exports (llama.cpp's converter): f16 and q8_0, each alone in a
    folder. The f16 file is a copy of the session's (tests/conftest.py ``ggufs``, also read by
    tests/export/test_gguf.py): one converter run fewer."""
    import shutil

    from chattune.export.gguf import write_gguf

    model, f16 = ggufs("llama")
    out = tmp_path_factory.mktemp("gguf-import")
    (out / "f16").mkdir()
    files = {"f16": Path(shutil.copyfile(f16, out / "f16" / "tiny.f16.gguf")),
             "q8_0": write_gguf(model, out / "q8_0" / "tiny.q8_0.gguf", "q8_0")}
    return model, files


def test_converted_once_reused_and_equal_to_the_model_it_came_from(llama_ggufs, capfd):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, files = llama_ggufs
    native = native_model_path(str(files["f16"]))
    assert "converting the GGUF file" in capfd.readouterr().err
    assert Path(native).parent == cache_root() and Path(native).name.startswith("gguf-tiny.f16-")
    assert native_model_path(str(files["f16"].parent)) == native  # the folder holding it: the same cache
    assert "converting" not in capfd.readouterr().err
    marker = json.loads((Path(native) / "chattune_native.json").read_text())
    assert marker["gguf_sha256"] == gguf_import.file_sha256(files["f16"]) and marker["gguf_file_type"] == "F16"
    assert marker["source"] == str(files["f16"].resolve()) and marker["gguf_architecture"] == "llama"
    config = json.loads((Path(native) / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    original, converted = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (model_dir, native))
    ids = torch.tensor([[3, 17, 90, 5, 44, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, atol=2e-2, rtol=0)
    tokenizers = [AutoTokenizer.from_pretrained(p) for p in (model_dir, native)]
    text = "The quick brown fox. 你好，我是一个人工智能助手。<|im_start|>user\nhi<|im_end|>"
    assert tokenizers[1](text)["input_ids"] == tokenizers[0](text)["input_ids"]
    assert tokenizers[1].chat_template == tokenizers[0].chat_template  # the GGUF's tokenizer.chat_template
    assert tokenizers[1].eos_token == tokenizers[0].eos_token


def test_the_manifest_records_the_gguf_and_refuses_another(llama_ggufs):
    from chattune.manifest import BaseModelRecord, verify_base_model
    from chattune.model import base_model_fingerprint

    _, files = llama_ggufs
    record = base_model_fingerprint(str(files["f16"]))
    assert record["path"] == str(files["f16"].resolve()) and record["gguf_file_type"] == "F16"
    assert record["gguf_sha256"] == gguf_import.file_sha256(files["f16"])
    assert base_model_fingerprint(record["native_path"])["gguf_sha256"] == record["gguf_sha256"]  # the folder
    other = base_model_fingerprint(str(files["q8_0"]))
    # the same config and tokenizer: only the file's hash tells the weights apart
    assert (other["config_sha256"], other["tokenizer_sha256"]) == (record["config_sha256"], record["tokenizer_sha256"])

    class Manifest:
        base_model = BaseModelRecord(**{k: v for k, v in record.items()})

    assert verify_base_model(Manifest, str(files["f16"])) == []
    [problem] = verify_base_model(Manifest, str(files["q8_0"]))
    assert (f"is the GGUF file with sha256 {other['gguf_sha256'][:12]} (Q8_0); the run was trained on the GGUF "
            f"file {files['f16'].resolve()} with sha256 {record['gguf_sha256'][:12]} (F16)") in problem


def test_convert_command_and_dry_run(llama_ggufs, tmp_path, capsys):
    _, files = llama_ggufs
    out = tmp_path / "bf16"
    assert main(["convert", str(files["q8_0"]), str(out), "--dtype", "bfloat16"]) == 0
    assert f"native model folder at {out}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "chattune_native.json").read_text())["gguf_file_type"] == "Q8_0"
    assert main(["convert", str(files["q8_0"]), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    config = native_config(str(files["q8_0"]))  # read from the GGUF's metadata, nothing converted
    assert config.model_type == "llama" and not cache_root().exists()
    assert main(["train", f"model_name_or_path={files['q8_0']}", "max_seq_length=64", "--dry-run"]) == 0
    assert "parameters" in capsys.readouterr().out and not cache_root().exists()


def test_a_gguf_beside_a_model_folder_s_files_is_read_alone(llama_ggufs, tmp_path):
    """``chattune export --gguf`` leaves the GGUF beside config.json and the tokenizer files;
    named as a model path, the GGUF is read alone (transformers would mix those files into
    the tokenizer it rebuilds from the GGUF, which then lost its special tokens)."""
    import shutil

    from transformers import AutoTokenizer

    model_dir, files = llama_ggufs
    folder = shutil.copytree(model_dir, tmp_path / "export")
    gguf = Path(shutil.copy(files["q8_0"], folder / "export.q8_0.gguf"))
    assert gguf_file(str(folder)) is None  # the folder is the Hugging Face model
    native = native_model_path(str(gguf))
    tokenizer, original = AutoTokenizer.from_pretrained(native), AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.eos_token, tokenizer.bos_token) == (original.eos_token, original.bos_token)
    assert tokenizer.chat_template == original.chat_template
