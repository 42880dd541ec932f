"""Tiny models of real architectures load through from_pretrained, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chattune.cli import main


@pytest.mark.parametrize("arch,model_type", [("glm4", "glm4"), ("glm", "glm"), ("llama", "llama"), ("qwen2", "qwen2")])
def test_tiny_model_command_writes_a_loadable_model(arch, model_type, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / arch
    assert main(["tiny-model", str(out), "--arch", arch, "--hidden-size", "64", "--num-layers", "2"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == model_type
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template and tokenizer.eos_token_id is not None
    text = "Hello, 你好! 123"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tokenizer_from_reuses_another_models_tokenizer(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    source = tiny_models("qwen2")
    out = tmp_path / "reuse"
    assert main(["tiny-model", str(out), "--arch", "llama", "--tokenizer-from", str(source),
                 "--hidden-size", "64", "--num-layers", "2"]) == 0
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()


def test_unknown_arch_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["tiny-model", str(tmp_path / "x"), "--arch", "gpt5"])
    assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad arguments


def run_error(argv, capsys) -> str:
    """Run the CLI expecting exit status 2 and exactly one ``chattune: error:`` line."""
    capsys.readouterr()  # drop what fixtures printed (progress bars of building a tiny model)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("chattune: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0].removeprefix("chattune: error: ")


@pytest.mark.parametrize("size", ["0", "-8", "6", "12", "20"])
def test_hidden_size_that_cannot_split_into_heads(size, tmp_path, capsys):
    err = run_error(["tiny-model", str(tmp_path / "x"), "--hidden-size", size], capsys)
    assert err == f"--hidden-size: expected a positive multiple of 8 (4 heads of an even size), got {size}"
    assert not (tmp_path / "x").exists()


def test_no_layers(tmp_path, capsys):
    err = run_error(["tiny-model", str(tmp_path / "x"), "--hidden-size", "64", "--num-layers", "0"], capsys)
    assert err == "--num-layers: expected at least 1, got 0"


def test_unknown_arch_through_the_function_is_a_config_error(tmp_path):
    from chattune.errors import ConfigError
    from chattune.tiny import build_tiny_model, tiny_config

    with pytest.raises(ConfigError, match=r"^--arch: expected one of \['glm4', 'glm', 'llama', 'qwen2'\], got 'gpt5'"):
        build_tiny_model(tmp_path / "x", "gpt5")
    with pytest.raises(ConfigError, match="^--arch: expected one of"):
        tiny_config("gpt5", 100, 0, 1)
    assert not (tmp_path / "x").exists()


def test_output_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "model"
    out.write_text("x")
    assert run_error(["tiny-model", str(out)], capsys) == f"{out}: is a file; expected a folder to write the tiny model to"
    err = run_error(["tiny-model", str(out / "sub")], capsys)
    assert err == f"{out / 'sub'}: cannot create the output folder: Not a directory"


def test_tokenizer_from_a_missing_folder(tmp_path, capsys):
    source = tmp_path / "nope"
    err = run_error(["tiny-model", str(tmp_path / "x"), "--tokenizer-from", str(source)], capsys)
    assert err.startswith(f"could not load the tokenizer '{source}': no such folder")


def test_tokenizer_from_an_empty_folder_or_a_file(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = run_error(["tiny-model", str(tmp_path / "x"), "--tokenizer-from", str(empty)], capsys)
    assert err.startswith(f"could not load the tokenizer '{empty}': empty folder")
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    err = run_error(["tiny-model", str(tmp_path / "y"), "--tokenizer-from", str(data)], capsys)
    assert err.startswith(f"could not load the tokenizer '{data}': it is a file")


def test_tokenizer_from_a_tokenizer_without_eos(tiny_models, tmp_path, capsys):
    import json
    import shutil

    source = Path(shutil.copytree(tiny_models("glm4"), tmp_path / "no-eos"))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    config.pop("pad_token")
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    err = run_error(["tiny-model", str(tmp_path / "x"), "--tokenizer-from", str(source),
                     "--hidden-size", "64", "--num-layers", "1"], capsys)
    assert err == f"--tokenizer-from {source}: the tokenizer has no EOS token; expected one (set eos_token in its tokenizer_config.json)"
    assert not (tmp_path / "x" / "config.json").exists()


def test_a_tiny_model_without_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from chattune.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "plain", "llama", hidden_size=32, num_layers=1, chat_template=False)
    assert AutoTokenizer.from_pretrained(path).chat_template is None
    assert not (path / "chat_template.jinja").exists()
    with_template = build_tiny_model(tmp_path / "chatml", "llama", hidden_size=32, num_layers=1)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(with_template).chat_template
