"""How the model is sharded across processes: plain DDP, PyTorch FSDP, or DeepSpeed ZeRO.

The config keys ``fsdp``, ``fsdp_config`` and ``deepspeed`` become keyword arguments of
transformers' ``TrainingArguments`` (:func:`sharding_arguments`); transformers and
accelerate do the sharding itself, on CUDA only (:func:`check_sharding_supported`).
Design notes (FSDP option words and versions, DeepSpeed's ``"auto"`` values and ZeRO-3
loading, what accelerate does on CPU): docs/design/sharding.md.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from chattune.config import RunConfig
from chattune.errors import ConfigError

FSDP_VERSION = 2
"""The FSDP version chattune asks for unless ``fsdp_config`` says otherwise."""
FSDP2_RESHARD = {"full_shard": True, "shard_grad_op": False}
"""FSDP2's ``reshard_after_forward`` for each sharding word it supports."""
TRANSFORMER_WRAP = "TRANSFORMER_BASED_WRAP"
DEEPSPEED_STAGES = (2, 3)
DEEPSPEED_INSTALL = "pip install 'chattune[deepspeed]'"


def sharding_arguments(config: RunConfig, model=None) -> dict[str, Any]:
    """Keyword arguments to add to transformers' ``TrainingArguments`` for the configured
    sharding: ``{}`` for plain DDP (or one process), ``fsdp`` and ``fsdp_config`` for FSDP
    (``model``, the model to train, peft-wrapped or not, names the block class to wrap), or
    ``deepspeed`` (the checked JSON config as a mapping). Raises ConfigError naming the key."""
    t = config.train
    if t.fsdp.strip() and t.deepspeed:
        raise ConfigError("fsdp and deepspeed: choose one")
    if t.deepspeed:
        return {"deepspeed": checked_deepspeed_config(t.deepspeed)}
    if t.fsdp.strip():
        if model is None:
            raise ConfigError("fsdp: the FSDP settings need the model, to find its transformer block class")
        return {"fsdp": _fsdp_flag(t.fsdp), "fsdp_config": fsdp_config_for(t.fsdp, t.fsdp_config, model)}
    return {}


def check_sharding_supported(config: RunConfig, cuda_available: bool | None = None) -> None:
    """Refuse, before any model is loaded, FSDP or DeepSpeed without CUDA: accelerate turns
    on FSDP and DeepSpeed only for GPU-type devices (not with ``use_cpu``), so several CPU
    processes would silently train as plain DDP. ``cuda_available``: for tests; default asks torch."""
    import torch

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if cuda:
        return
    if config.train.fsdp.strip():
        raise ConfigError(f"fsdp: {config.train.fsdp!r} needs CUDA GPUs, and none is present: on CPU accelerate "
                          "runs several processes as plain DDP and would not shard the model; leave fsdp empty "
                          "here (torchrun --nproc_per_node N still trains data-parallel over gloo)")
    if config.train.deepspeed:
        raise ConfigError(f"deepspeed: {config.train.deepspeed} needs CUDA GPUs, and none is present; leave "
                          "deepspeed unset here (torchrun --nproc_per_node N still trains data-parallel over gloo)")


# ---------------------------------------------------------------- FSDP


def fsdp_options() -> list[str]:
    """The ``fsdp`` option words transformers accepts (its ``FSDPOption``)."""
    from transformers.trainer_utils import FSDPOption

    return [option.value for option in FSDPOption]


def fsdp_words(fsdp: str) -> list[str]:
    """The words of the ``fsdp`` setting, checked: each one transformers knows, at most one
    sharding strategy."""
    valid = fsdp_options()
    words = fsdp.split()
    for word in words:
        if word not in valid:
            raise ConfigError(f"fsdp: unknown option {word!r}; expected words from {', '.join(valid)} "
                              "(e.g. 'full_shard auto_wrap')")
    strategies = [w for w in words if w not in ("offload", "auto_wrap")]
    if len(strategies) > 1:
        raise ConfigError(f"fsdp: choose one sharding strategy, got {' and '.join(strategies)}")
    return words


def fsdp_config_for(fsdp: str, user_config: dict | None, model) -> dict[str, Any]:
    """The ``fsdp_config`` for transformers: the user's entries (``fsdp_`` prefixes dropped,
    as transformers does), then the translated ``fsdp`` words, the FSDP version and the
    block class to wrap for what the user left out."""
    words = fsdp_words(fsdp)
    result = {(k[5:] if k.startswith("fsdp_") else k): v for k, v in (user_config or {}).items()}
    version = _fsdp_version(result)
    result["version"] = version
    # the model saved whole by rank 0: every checkpoint and the run folder hold an adapter (or
    # model) that loads anywhere; the optimizer state is saved sharded beside it for resuming
    result.setdefault("state_dict_type", "FULL_STATE_DICT")
    _apply_words(words, version, result)
    if result.setdefault("auto_wrap_policy", TRANSFORMER_WRAP) == TRANSFORMER_WRAP:
        _fill_wrap_classes(result, model)
    return result


def _fsdp_version(settings: dict) -> int:
    value = settings.get("version", FSDP_VERSION)
    if str(value).strip() not in ("1", "2"):
        raise ConfigError(f"fsdp_config: version must be 1 or 2 (FSDP1 or FSDP2), got {value!r}")
    return int(value)


def _apply_words(words: list[str], version: int, settings: dict) -> None:
    """Translate the option words into ``fsdp_config`` entries the user did not set."""
    for word in words:
        if word == "offload":
            settings.setdefault("cpu_offload", True)
        elif word == "auto_wrap":
            continue
        elif version == 1:
            settings.setdefault("reshard_after_forward", word)
        elif word in FSDP2_RESHARD:
            settings.setdefault("reshard_after_forward", FSDP2_RESHARD[word])
        else:
            raise ConfigError(f"fsdp: {word} exists only in FSDP1 (fsdp_config version: 1, deprecated in "
                              f"transformers); with FSDP2 use {' or '.join(FSDP2_RESHARD)}")
    if version == 1:
        settings.setdefault("use_orig_params", True)


def _fill_wrap_classes(settings: dict, model) -> None:
    """Set ``transformer_layer_cls_to_wrap`` to the model's block class unless the user named
    classes, which are then checked against the model."""
    given = settings.get("transformer_layer_cls_to_wrap")
    if given is None:
        settings["transformer_layer_cls_to_wrap"] = block_class_names(model)
        return
    names = [given] if isinstance(given, str) else list(given)
    present = {type(module).__name__ for module in model.modules()}
    missing = [name for name in names if name not in present]
    if missing:
        raise ConfigError(f"fsdp_config: transformer_layer_cls_to_wrap names {', '.join(missing)}, which "
                          f"{type(model).__name__} does not contain; expected module class names of this model "
                          "(leave the key out and chattune fills in the model's block class)")
    settings["transformer_layer_cls_to_wrap"] = names


def block_class_names(model) -> list[str]:
    """Class names of the model's transformer blocks (usually one, e.g. ``LlamaDecoderLayer``),
    found as ``freeze`` finds the blocks; works on peft-wrapped models."""
    from chattune.methods import block_list

    try:
        blocks = block_list(model)
    except ConfigError as exc:
        raise ConfigError(f"fsdp: FSDP wraps each transformer block, and no list of blocks was found in "
                          f"{type(model).__name__} ({exc}); name the block class in fsdp_config: "
                          "{transformer_layer_cls_to_wrap: [...]}") from None
    return list(dict.fromkeys(type(block).__name__ for block in blocks))


def _fsdp_flag(fsdp: str) -> bool | str:
    """``fsdp=True`` for transformers 5 (everything in ``fsdp_config``); the option words,
    with ``auto_wrap`` (chattune always wraps blocks), for transformers 4."""
    from transformers import TrainingArguments

    if hasattr(TrainingArguments, "_process_fsdp_args"):
        return True
    words = fsdp.split()
    return " ".join(words if "auto_wrap" in words else [*words, "auto_wrap"])


# ---------------------------------------------------------------- DeepSpeed


def checked_deepspeed_config(path: str) -> dict[str, Any]:
    """The DeepSpeed JSON config at ``path``, checked (readable, ZeRO stage 2 or 3) and with
    the deepspeed package present."""
    settings = load_deepspeed_config(path)
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"deepspeed: {path} needs the deepspeed package: {DEEPSPEED_INSTALL}")
    return settings


def load_deepspeed_config(path: str) -> dict[str, Any]:
    """Read the DeepSpeed JSON config at ``path`` and check its ZeRO stage; errors name the
    key ``deepspeed``, the file and, for bad JSON, the line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"deepspeed: {path}: no such file; expected a DeepSpeed JSON config "
                          "(e.g. examples/deepspeed/zero2.json)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"deepspeed: {path}: cannot be read as a JSON config ({exc})") from None
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed: {path}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"deepspeed: {path}: expected a JSON object (a DeepSpeed config), "
                          f"got a {type(settings).__name__}")
    _check_zero_stage(settings, path)
    return settings


def _check_zero_stage(settings: dict, path: str) -> None:
    zero = settings.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if isinstance(stage, bool) or stage not in DEEPSPEED_STAGES:
        found = "has no zero_optimization.stage" if stage is None else f"has zero_optimization.stage {stage!r}"
        raise ConfigError(f"deepspeed: {path} {found}; chattune supports ZeRO stages 2 and 3 "
                          "(examples/deepspeed/zero2.json, examples/deepspeed/zero3.json)")
