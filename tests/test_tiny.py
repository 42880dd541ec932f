"""Tiny models of real architectures load through from_pretrained, offline."""

from __future__ import annotations

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
