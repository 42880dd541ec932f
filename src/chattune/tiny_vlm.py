"""Tiny random vision-language models of real transformers architectures (a tiny vision tower,
its projector and a tiny language model) with a working processor, saved in Hugging Face format
so that tests load them through the same ``from_pretrained`` path as a real model.

``llava``: ``LlavaForConditionalGeneration`` (a CLIP vision tower, a two-layer MLP projector, a
Llama language model; each image becomes a fixed number of ``<image>`` tokens).
``idefics3``: ``Idefics3ForConditionalGeneration``, the architecture of SmolVLM (a SigLIP-style
vision tower, a pixel-shuffle connector, a Llama language model; each image is wrapped in
``<fake_token_around_image><global-img>`` markers).
"""

from __future__ import annotations

from pathlib import Path

from chattune.errors import ConfigError
from chattune.tiny import _output_folder, check_sizes, tiny_config, train_tokenizer

VLM_ARCHS = ("llava", "idefics3")
IMAGE_SIZE = 32
"""The side of the square images the tiny processors resize to (pixels)."""
PATCH_SIZE = 8


def _tokenizer(out: Path, extra_tokens: list[str], extra_text: list[str] | None):
    tokenizer = train_tokenizer(out, "llama", extra_text)
    tokenizer.add_tokens(extra_tokens, special_tokens=True)
    return tokenizer


def _vision_sizes(hidden_size: int) -> dict:
    return {"hidden_size": hidden_size, "intermediate_size": hidden_size * 2, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}


def _llava(out: Path, extra_text, hidden_size: int, num_layers: int, vision_hidden_size: int):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(out, ["<image>"], extra_text)
    text = tiny_config("llama", len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                       hidden_size=hidden_size, num_layers=num_layers)
    vision = CLIPVisionConfig(**_vision_sizes(vision_hidden_size), projection_dim=vision_hidden_size)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         tie_word_embeddings=False)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="full", num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    return LlavaForConditionalGeneration(config), processor


def _idefics3(out: Path, extra_text, hidden_size: int, num_layers: int, vision_hidden_size: int):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    markers = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tokenizer = _tokenizer(out, markers, extra_text)
    text = tiny_config("llama", len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                       hidden_size=hidden_size, num_layers=num_layers)
    vision = Idefics3VisionConfig(**_vision_sizes(vision_hidden_size))
    scale = 2
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=scale,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                             max_image_size={"longest_edge": IMAGE_SIZE})
    seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // scale ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                                  chat_template=tokenizer.chat_template)
    return Idefics3ForConditionalGeneration(config), processor


def build_tiny_vlm(out_dir: str | Path, arch: str = "llava", *, extra_text: list[str] | None = None,
                   hidden_size: int = 128, num_layers: int = 2, vision_hidden_size: int = 64,
                   seed: int = 0) -> Path:
    """Write a random vision-language model of ``arch`` (one of :data:`VLM_ARCHS`) with its
    processor (image processor + tokenizer with a chat template) to ``out_dir``; return the path.

    Raises ConfigError for an unknown ``arch``, impossible sizes or an ``out_dir`` that cannot
    be a folder.
    """
    import torch
    from transformers import GenerationConfig

    builders = {"llava": _llava, "idefics3": _idefics3}
    if arch not in builders:
        raise ConfigError(f"--arch: expected one of {list(VLM_ARCHS)} for a vision-language model, got {arch!r}")
    check_sizes(hidden_size, num_layers)
    check_sizes(vision_hidden_size, 2)
    out = _output_folder(out_dir)
    torch.manual_seed(seed)
    model, processor = builders[arch](out, extra_text, hidden_size, num_layers, vision_hidden_size)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
