"""The fine-tuning methods on a vision-language model: the vision tower frozen unless
``train_vision_tower``; the projector trained unless ``train_projector`` is false; LoRA adapts
the language model's linear layers only; ``freeze`` trains the projector alone (MiniGPT-4's
first stage), ``full`` the language model and the projector."""

from __future__ import annotations

import dataclasses
import re

import torch

from chattune.config import MethodArgs
from chattune.errors import ConfigError
from chattune.methods import Method, train_only
from chattune.vision.processor import VisionParts

ADAPTER_METHODS = ("lora", "qlora")


def language_linear_names(model, parts: VisionParts) -> list[str]:
    """The leaf names of the language model's linear layers (its attention and MLP projections)."""
    language = model.get_submodule(parts.language)
    return sorted({name.rsplit(".", 1)[-1] for name, module in language.named_modules()
                   if isinstance(module, torch.nn.Linear) and name})


def lora_targets(model, parts: VisionParts, wanted: list[str] | str | None) -> str:
    """peft ``target_modules`` as a regular expression matching only the language model's
    layers named in ``wanted`` (``all-linear`` or None: all its linear layers)."""
    names = language_linear_names(model, parts)
    if wanted not in (None, "all-linear", ["all-linear"]):
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ConfigError(f"lora_target: {unknown} not found in the language model ({parts.language}); "
                              f"its linear layers: {names}")
        names = sorted(set(wanted))
    return rf"{re.escape(parts.language)}\..*\.({'|'.join(map(re.escape, names))})"


def vision_method_args(args: MethodArgs, model, parts: VisionParts, method: Method) -> MethodArgs:
    """The method settings for a vision-language model (LoRA: targets in the language model,
    the projector and, if asked, the tower trained in full beside the adapters)."""
    if method.name not in ADAPTER_METHODS:
        return args
    extra = [leaf(parts.projector)] if args.train_projector else []
    extra += [leaf(parts.tower)] if args.train_vision_tower else []
    targets = lora_targets(model, parts, args.lora_target)
    chosen = dataclasses.replace(args, modules_to_save=sorted({*(args.modules_to_save or []), *extra}) or None)
    chosen.lora_target = targets  # peft's regular expression, set past the list the config key takes
    return chosen


def leaf(name: str) -> str:
    """The last part of a dotted module name."""
    return name.rsplit(".", 1)[-1]


def _under(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def apply_vision_method(method: Method, model, args: MethodArgs, parts: VisionParts,
                        gradient_checkpointing: bool):
    """``method`` applied to a vision-language model as the module docstring says; ConfigError
    for ptuning and qlora (not supported on one yet) and for a freeze that would train nothing."""
    if method.name in ("ptuning", "qlora"):
        why = ("a prefix over image tokens" if method.name == "ptuning"
               else "bitsandbytes would quantize the vision tower and the projector too")
        raise ConfigError(f"method: {method.name} is not supported on a vision-language model ({why}); use lora, "
                          "freeze (the projector, MiniGPT-4's stage) or full")
    if method.name in ADAPTER_METHODS:
        return method.apply(model, vision_method_args(args, model, parts, method), gradient_checkpointing)
    if method.name == "freeze":
        names = {name for name, _ in model.named_parameters()
                 if (args.train_projector and _under(name, parts.projector))
                 or (args.train_vision_tower and _under(name, parts.tower))
                 or (args.freeze_extra_modules and set(args.freeze_extra_modules) & set(name.split(".")[:-1]))}
        if not names:
            raise ConfigError("train_projector: false with method freeze trains nothing on a vision-language "
                              "model; set train_projector true, train_vision_tower true or freeze_extra_modules")
        return train_only(model, names)
    model = method.apply(model, args, gradient_checkpointing)  # full
    for name, param in model.named_parameters():
        if (_under(name, parts.tower) and not args.train_vision_tower) or (
                _under(name, parts.projector) and not args.train_projector):
            param.requires_grad_(False)
    return model
