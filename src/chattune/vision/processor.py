"""A vision-language model's processor, as chattune uses it: what an image placeholder becomes
in the text, the image tokens each image expands into (the processor's own expansion, never
chattune's guess), the pixel tensors of a batch of images, and which modules of the model are
its vision tower, its projector and its language model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from chattune.errors import ConfigError, ModelLoadError
from chattune.model import vision_model_type

TOWER_NAMES = ("vision_tower", "vision_model", "visual")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "mm_projector")
LANGUAGE_NAMES = ("language_model", "text_model")


def is_vision_config(config) -> bool:
    """Whether a transformers config is of a vision-language model chattune reads images with
    (:data:`chattune.model.VISION_TYPES`)."""
    return vision_model_type(config) is not None


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off (its image processors warn that torchvision is missing and
    fall back to Pillow, which is what chattune wants)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@dataclass(frozen=True)
class VisionParts:
    """The dotted module names (in the bare model) of the vision tower, the projector between it
    and the language model, and the language model."""

    tower: str
    projector: str
    language: str


def vision_parts(model) -> VisionParts:
    """The three parts of a vision-language model, found by the names transformers gives them;
    ConfigError naming the model's modules when one is missing."""
    found: dict[str, str] = {}
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        for role, names in (("tower", TOWER_NAMES), ("projector", PROJECTOR_NAMES), ("language", LANGUAGE_NAMES)):
            if leaf in names and role not in found:
                found[role] = name
    missing = [role for role in ("tower", "projector", "language") if role not in found]
    if missing:
        children = [n for n, _ in model.named_children()]
        raise ConfigError(f"{type(model).__name__}: cannot find its {', '.join(missing)} (looked for "
                          f"{TOWER_NAMES + PROJECTOR_NAMES + LANGUAGE_NAMES}); its modules: {children}")
    return VisionParts(**found)


class VisionProcessor:
    """Images into what a vision-language model reads, through the model's own processor.

    ``placeholder``: the text an image placeholder becomes before tokenizing (the processor's
    image token); ``image_token_id``: its id. :meth:`expansion` is the token ids one image
    becomes (cached by image size: the processors supported expand by size alone);
    :meth:`pixels` the tensors of a batch's images, in order.
    """

    def __init__(self, processor, model_type: str):
        self.processor = processor
        self.model_type = model_type
        self.tokenizer = processor.tokenizer
        self.placeholder = getattr(processor, "image_token", None) or "<image>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.placeholder)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ModelLoadError(f"processor of a {model_type} model: its tokenizer has no {self.placeholder} "
                                 "token; expected the image token the processor expands")
        self._expansions: dict[tuple[int, int], list[int]] = {}

    def expansion(self, image) -> list[int]:
        """The token ids that ``image`` (a Pillow image) becomes in the model's input."""
        key = image.size
        if key not in self._expansions:
            with quiet_transformers():
                out = self.processor(text=[self.placeholder], images=[[image]], add_special_tokens=False)
            ids = out["input_ids"][0]
            self._expansions[key] = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        return list(self._expansions[key])

    def pixels(self, images: list) -> dict:
        """The image processor's tensors for ``images`` (Pillow images, in the order their
        tokens appear in the batch): ``pixel_values`` and whatever else the model reads with it."""
        with quiet_transformers():
            out = self.processor.image_processor(images=[list(images)], return_tensors="pt")
        return dict(out)

    def fingerprint(self) -> dict:
        """What the encoded rows depend on: the image processor's and the processor's settings
        (``image_seq_len``, the feature selection...) and the image token."""
        settings = {key: value for key, value in self.processor.to_dict().items()
                    if key not in ("tokenizer", "image_processor", "chat_template")}
        return {"image_processor": self.processor.image_processor.to_dict(), "processor": settings,
                "placeholder": self.placeholder, "model_type": self.model_type}


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
"""What a processor's ``save_pretrained`` writes beside the tokenizer's files and chat template."""


def save_processor_files(processor, folder) -> list[str]:
    """The processor's own files (:data:`PROCESSOR_FILES`) saved into ``folder``, beside the
    tokenizer and chat template already there (left as they are); the names written."""
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(folder)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-processor-") as scratch:
        with quiet_transformers():
            processor.save_pretrained(scratch)
        written = [name for name in PROCESSOR_FILES if (Path(scratch) / name).is_file()]
        for name in written:
            shutil.copyfile(Path(scratch) / name, folder / name)
    return written


def load_vision(path: str, trust_remote_code: bool = False) -> VisionProcessor | None:
    """The :class:`VisionProcessor` of the model at ``path``, or None for a text-only model (and
    for a vision-language type chattune reads no images with, which then loads as before, as text).

    Raises ModelLoadError when the processor of a supported type cannot be loaded.
    """
    from transformers import AutoConfig, AutoProcessor

    from chattune.model import load_error, native_model_path

    if str(path).lower().endswith(".gguf"):
        return None
    local = native_model_path(path)
    try:
        config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
    except Exception:  # a GGUF file or a folder without config.json: not a vision model chattune loads
        return None
    if not is_vision_config(config):
        return None
    try:
        with quiet_transformers():
            processor = AutoProcessor.from_pretrained(local, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise load_error(local, exc, "processor") from exc
    if not hasattr(processor, "image_processor"):
        raise ModelLoadError(f"{path}: a {config.model_type} vision-language model without an image processor "
                             "(preprocessor_config.json / processor_config.json); expected the processor saved "
                             "beside the model")
    return VisionProcessor(processor, config.model_type)
