"""A vision-language model's processor as chattune uses it: placeholder, image token, the
processor's own expansion of an image, pixels, and the model's three parts."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from chattune.errors import ConfigError
from chattune.tiny_vlm import IMAGE_SIZE, PATCH_SIZE
from chattune.vision.processor import VisionParts, is_vision_config, load_vision, vision_parts

PARTS = {
    "llava": VisionParts(tower="model.vision_tower", projector="model.multi_modal_projector",
                         language="model.language_model"),
    "idefics3": VisionParts(tower="model.vision_model", projector="model.connector", language="model.text_model"),
}


@pytest.fixture(scope="module")
def processors(tiny_vlms):
    return {arch: load_vision(str(tiny_vlms(arch))) for arch in PARTS}


def test_llava_image_token_and_expansion(processors, tiny_vlms):
    from transformers import AutoConfig

    vision = processors["llava"]
    assert vision.model_type == "llava"
    assert vision.placeholder == "<image>"
    assert vision.image_token_id == vision.tokenizer.convert_tokens_to_ids("<image>")
    assert vision.image_token_id == AutoConfig.from_pretrained(tiny_vlms("llava")).image_token_id
    ids = vision.expansion(Image.new("RGB", (40, 36)))
    # one token per 8x8 patch of the 32x32 image, plus the CLS feature ("full" strategy)
    assert len(ids) == (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1 == 17
    assert ids == [vision.image_token_id] * 17


def test_idefics3_expansion_is_wrapped_in_its_markers(processors):
    vision = processors["idefics3"]
    assert vision.model_type == "idefics3" and vision.placeholder == "<image>"
    tokens = vision.tokenizer.convert_ids_to_tokens(vision.expansion(Image.new("RGB", (40, 36))))
    # 16 patches pixel-shuffled by scale 2 -> 4 image tokens, between the global-image markers
    assert tokens == ["<fake_token_around_image>", "<global-img>", *["<image>"] * 4, "<fake_token_around_image>"]


def test_expansion_is_cached_by_size_and_returned_as_a_copy(processors):
    vision = processors["llava"]
    first = vision.expansion(Image.new("RGB", (50, 20), (255, 0, 0)))
    first.append(-1)  # a caller's change does not reach the cache
    again = vision.expansion(Image.new("RGB", (50, 20), (0, 0, 255)))
    assert -1 not in again and len(again) == 17
    assert (50, 20) in vision._expansions


def test_pixels_of_a_batch_of_images_in_order(processors):
    red, blue = Image.new("RGB", (40, 36), (255, 0, 0)), Image.new("RGB", (30, 50), (0, 0, 255))
    llava = processors["llava"].pixels([red, blue])
    assert set(llava) == {"pixel_values"}
    assert tuple(llava["pixel_values"].shape) == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    alone = processors["llava"].pixels([blue])["pixel_values"]
    assert torch.equal(llava["pixel_values"][1], alone[0])
    assert llava["pixel_values"][0, 0].mean() > llava["pixel_values"][1, 0].mean()  # red first
    idefics = processors["idefics3"].pixels([red, blue])
    assert set(idefics) == {"pixel_values", "pixel_attention_mask"}
    assert tuple(idefics["pixel_values"].shape) == (1, 2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_fingerprint_names_what_encoded_rows_depend_on(processors):
    print_ = processors["llava"].fingerprint()
    assert print_["placeholder"] == "<image>" and print_["model_type"] == "llava"
    assert print_["image_processor"]["crop_size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert processors["idefics3"].fingerprint() != print_


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_vision_parts_names(arch, tiny_vlms):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlms(arch))
    parts = vision_parts(model)
    assert parts == PARTS[arch]
    for name in (parts.tower, parts.projector, parts.language):
        model.get_submodule(name)  # each names a real module
    assert is_vision_config(model.config)


def test_vision_parts_of_a_text_model_is_a_config_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM: cannot find its tower, projector, language"):
        vision_parts(model)


def test_load_vision_of_a_text_model_is_none(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "text")
    assert load_vision(str(tmp_path / "text")) is None
    assert load_vision(str(tmp_path / "model.gguf")) is None
    (tmp_path / "empty").mkdir()
    assert load_vision(str(tmp_path / "empty")) is None


def test_a_vision_type_chattune_reads_no_images_with_loads_as_text_as_before(tmp_path):
    """Qwen2-VL (3-D positions), Gemma 3, Mllama, PaliGemma...: no processor is loaded, and the
    model class is the causal LM one, so text-only fine-tuning of such a model works as before."""
    from transformers import AutoModelForCausalLM, Qwen2VLConfig

    from chattune.model import model_class

    Qwen2VLConfig().save_pretrained(tmp_path / "qwen2vl")
    assert load_vision(str(tmp_path / "qwen2vl")) is None
    assert model_class(str(tmp_path / "qwen2vl")) is AutoModelForCausalLM


def test_load_vision_without_a_processor_is_a_model_load_error(tiny_vlms, tmp_path):
    from transformers import AutoConfig

    from chattune.errors import ModelLoadError

    AutoConfig.from_pretrained(tiny_vlms("llava")).save_pretrained(tmp_path / "bare")  # config only
    with pytest.raises(ModelLoadError):
        load_vision(str(tmp_path / "bare"))
