"""Rows with images, encoded for a vision-language model.

Each ``<image>`` placeholder becomes the processor's image token, the conversation is encoded
by the template as any other (with room left for the images), and each image token is then
replaced by the tokens the processor expands that image into. Image tokens are never
supervised (their labels are -100 even with ``train_on_prompt``). A row whose images a cut would
split, or whose images cannot be read any more, is dropped with the reason.
"""

from __future__ import annotations

import dataclasses

from chattune.data.encode import (
    IGNORE_INDEX,
    Encoded,
    EncodeOptions,
    PieceEncoder,
    encode_conversation,
)
from chattune.vision.images import PLACEHOLDER, ImageError, load_image

NOT_VISION = ("the row has images and chattune reads none with this model (a text model, or a vision-language "
              "type not supported: llava, idefics3, smolvlm are)")
IMAGE_CUT = "max_seq_length would cut an image's tokens (a turn with an image dropped or cut); raise max_seq_length"
STRAY_IMAGE_TOKEN = "the text holds the model's image token but the row has no image for it"


def with_image_token(messages: list[dict], token: str) -> list[dict]:
    """``messages`` with each :data:`PLACEHOLDER` written as the model's image ``token``."""
    if token == PLACEHOLDER:
        return messages
    return [{**m, **{key: m[key].replace(PLACEHOLDER, token) for key in ("content", "input")
                     if isinstance(m.get(key), str)}} for m in messages]


def splice_images(input_ids: list[int], labels: list[int], image_token_id: int,
                  expansions: list[list[int]]) -> tuple[list[int], list[int]] | None:
    """``input_ids``/``labels`` with the n-th ``image_token_id`` replaced by ``expansions[n]``
    (labels -100 there); None when the number of image tokens differs from the expansions'."""
    ids: list[int] = []
    kept: list[int] = []
    n = 0
    for token, label in zip(input_ids, labels, strict=True):
        if token != image_token_id:
            ids.append(token)
            kept.append(label)
            continue
        if n == len(expansions):
            return None
        ids += expansions[n]
        kept += [IGNORE_INDEX] * len(expansions[n])
        n += 1
    return (ids, kept) if n == len(expansions) else None


def encode_image_record(record, template: str, encoder: PieceEncoder, options: EncodeOptions,
                        vision) -> tuple[Encoded, int]:
    """One record with images encoded for ``vision`` (a
    :class:`~chattune.vision.processor.VisionProcessor`, or None for a text-only model): the row,
    or the reason it was dropped, and its number of image tokens."""
    if vision is None:
        return Encoded(dropped=NOT_VISION), 0
    try:
        expansions = [vision.expansion(load_image(ref, record.source)) for ref in record.images]
    except ImageError as exc:
        return Encoded(dropped=str(exc)), 0
    extra = sum(len(e) - 1 for e in expansions)
    room = dataclasses.replace(options, max_seq_length=options.max_seq_length - extra)
    if room.max_seq_length < 2:
        return Encoded(truncated=True, dropped=IMAGE_CUT), 0
    messages = with_image_token(record.messages, vision.placeholder)
    encoded = encode_conversation(messages, template, encoder, room, tools=record.tools)
    if encoded.dropped:
        return encoded, 0
    spliced = splice_images(encoded.input_ids, encoded.labels, vision.image_token_id, expansions)
    if spliced is None:
        return Encoded(truncated=True, turns_dropped=encoded.turns_dropped, dropped=IMAGE_CUT), 0
    encoded.input_ids, encoded.labels = spliced
    return encoded, sum(map(len, expansions))


def stray_image_token(encoded: Encoded, vision) -> Encoded:
    """A text-only row as encoded, or dropped when its text holds ``vision``'s image token (the
    model would look for an image that is not there)."""
    if vision is not None and not encoded.dropped and vision.image_token_id in encoded.input_ids:
        return Encoded(dropped=STRAY_IMAGE_TOKEN)
    return encoded
