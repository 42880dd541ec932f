"""The vision-language part of an export's check: an image probe rendered as chattune renders
it, and the same probe through the exported folder's own route (its chat template, then
``AutoProcessor``), which must give the same ids."""

from __future__ import annotations

from pathlib import Path

from chattune.data.images import with_image_token
from chattune.vision.images import count_placeholders, images_on_messages
from chattune.vision.processor import quiet_transformers

IMAGE_PROBES = [[{"role": "user", "content": "<image>What is in this picture?"}]]
"""Probe conversations of a vision-language model, each ``<image>`` the :func:`probe_image`."""


def probe_image():
    """The image of the vision-language probes: 48 x 40 pixels of colour gradients (every pixel
    differs from its neighbours, so a changed image processor shows in the logits)."""
    from PIL import Image

    image = Image.new("RGB", (48, 40))
    image.putdata([((x * 5) % 256, (y * 6) % 256, ((x + y) * 3) % 256) for y in range(40) for x in range(48)])
    return image


def image_probes(model, tokenizer, template: str, vision) -> tuple[list[list[int]], list[list]]:
    """The prompt ids of :data:`IMAGE_PROBES` as chattune renders them for ``model`` (its
    template, each image expanded into the tokens ``vision``, its processor, gives it), and the
    images each keeps."""
    from chattune.inference.runs import in_memory_run

    run = in_memory_run(model, tokenizer, template, vision=vision)
    prompts, images = [], []
    for messages in IMAGE_PROBES:
        shown = [probe_image() for _ in range(count_placeholders(messages))]
        ids, kept = run.image_prompt(images_on_messages(messages, shown))
        prompts.append(ids)
        images.append(kept)
    return prompts, images


def image_prompt_mismatches(folder: Path, ours: list[list[int]], images: list[list]) -> list[str]:
    """Image probes whose ids through the exported folder's own route (its tokenizer's chat
    template rendered as text, each ``<image>`` the processor's image token, then
    ``AutoProcessor(text=..., images=...)``) differ from chattune's prompt ids ``ours``."""
    from transformers import AutoProcessor

    with quiet_transformers():
        processor = AutoProcessor.from_pretrained(folder)
    token = getattr(processor, "image_token", None) or "<image>"
    found = []
    for messages, ids, shown in zip(IMAGE_PROBES, ours, images, strict=True):
        text = processor.tokenizer.apply_chat_template(with_image_token(messages, token), add_generation_prompt=True,
                                                       tokenize=False)
        with quiet_transformers():
            out = processor(text=[text], images=[list(shown)], add_special_tokens=False)
        theirs = [int(i) for i in (out["input_ids"][0].tolist() if hasattr(out["input_ids"][0], "tolist")
                                   else out["input_ids"][0])]
        if theirs != ids:
            pairs = enumerate(zip(ids, theirs, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(ids), len(theirs)))
            found.append(f"{messages[-1]['content'][:40]!r}: ids differ from token {at} "
                         f"({ids[at:at + 4]} chattune, {theirs[at:at + 4]} chat template + processor)")
    return found
