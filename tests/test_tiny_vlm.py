"""Tiny random vision-language models: real transformers architectures with working processors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from chattune.errors import ConfigError
from chattune.tiny_vlm import IMAGE_SIZE, VLM_ARCHS, build_tiny_vlm

CLASSES = {"llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
           "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor")}


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_a_tiny_vlm_loads_with_the_auto_classes_and_reads_an_image(arch, tiny_vlms):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_vlms(arch)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert (type(model).__name__, type(processor).__name__) == CLASSES[arch]
    assert model.config.model_type == arch and model.config.get_text_config().hidden_size == 64
    assert model.config.vision_config.hidden_size == 32 and model.config.vision_config.image_size == IMAGE_SIZE
    tokenizer = processor.tokenizer
    assert tokenizer.chat_template and tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    red, blue = Image.new("RGB", (40, 36), (255, 0, 0)), Image.new("RGB", (40, 36), (0, 0, 255))
    with torch.no_grad():
        logits = [model(**processor(text=["<image>What colour?"], images=[[image]], return_tensors="pt")).logits
                  for image in (red, blue)]
    assert logits[0].shape[-1] == model.get_output_embeddings().weight.shape[0]
    assert not torch.allclose(logits[0][0, -1], logits[1][0, -1])  # the image reaches the output


def test_a_build_is_repeatable(tmp_path):
    from safetensors.torch import load_file

    first = build_tiny_vlm(tmp_path / "a", "llava", hidden_size=32, num_layers=1, vision_hidden_size=16)
    second = build_tiny_vlm(tmp_path / "b", "llava", hidden_size=32, num_layers=1, vision_hidden_size=16)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unknown_arch_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--arch: expected one of \['llava', 'idefics3'\] for a vision-language "
                                          r"model, got 'qwen2_vl'"):
        build_tiny_vlm(tmp_path / "x", "qwen2_vl")
    assert not (tmp_path / "x").exists()


def test_impossible_sizes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        build_tiny_vlm(tmp_path / "x", "llava", hidden_size=0)
    with pytest.raises(ConfigError):
        build_tiny_vlm(tmp_path / "y", "llava", vision_hidden_size=0)
