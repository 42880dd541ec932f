"""How the model is sharded across processes: plain DDP, PyTorch FSDP, or DeepSpeed ZeRO.

The config keys ``fsdp``, ``fsdp_config`` and ``deepspeed`` become keyword arguments of
transformers' ``TrainingArguments`` (:func:`sharding_arguments`); transformers and
accelerate do the sharding itself. With neither key set, several processes (torchrun)
train with plain data parallel (DDP) and nothing is added here.

FSDP (transformers >= 5, accelerate's FSDP plugin)
    ``fsdp`` holds the familiar option words (``full_shard auto_wrap``, ``shard_grad_op
    offload``, ...). chattune checks them against transformers' ``FSDPOption`` and translates
    them into ``fsdp_config`` entries itself, as transformers' own (deprecated) string path
    does, and passes ``fsdp=True``: ``full_shard`` -> ``reshard_after_forward: true``,
    ``shard_grad_op`` -> ``false``, ``offload`` -> ``cpu_offload: true``. ``auto_wrap`` is
    accepted but changes nothing: transformers 5 always wraps by the transformer-block policy,
    and chattune fills ``transformer_layer_cls_to_wrap`` with the class of the architecture's
    own blocks (the list :func:`chattune.methods.block_list` finds for ``freeze``; also
    through a peft wrapper), so that each block is one FSDP unit even where a model's
    ``_no_split_modules`` is missing or names other classes.

    chattune sets ``version: 2`` explicitly (transformers' default today; explicit so that
    the run's recorded config says what ran and a change of default cannot change a run).
    FSDP2 (``fully_shard``) shards each parameter as a DTensor, so frozen base weights and
    trainable LoRA weights may share a unit: peft models need nothing more (no
    ``use_orig_params``). With bf16/fp16, accelerate upcasts the *trainable* parameters to
    float32 master weights (LoRA weights already are). A user's ``version: 1`` (FSDP1,
    deprecated in transformers) is kept: then ``no_shard`` / ``hybrid_shard`` /
    ``hybrid_shard_zero2`` become possible, chattune sets ``use_orig_params: true`` (needed
    when frozen and trainable parameters share a flat parameter, as with LoRA; transformers'
    default too), and for a peft model the Trainer replaces the wrap policy with peft's
    ``fsdp_auto_wrap_policy`` (each trainable LoRA layer its own unit, blocks from the
    ``FSDP_TRANSFORMER_CLS_TO_WRAP`` environment variable or ``_no_split_modules``, not from
    ``transformer_layer_cls_to_wrap``). Every entry a user gives in ``fsdp_config`` wins
    over what chattune fills in.

DeepSpeed (optional extra: ``pip install 'chattune[deepspeed]'``)
    ``deepspeed`` names a JSON file; it is read and checked here (ZeRO stage 2 or 3) and the
    loaded mapping is passed as ``TrainingArguments(deepspeed=...)``. transformers replaces
    its ``"auto"`` values at run time (``HfTrainerDeepSpeedConfig.trainer_config_process``
    when the TrainingArguments are built, ``trainer_config_finalize`` once the model and the
    number of steps are known) and refuses values that contradict the Trainer's.
    :func:`filled_deepspeed_config` does the same filling from the chattune config, so that
    a dry run or a test can show the numbers a run will use. For ZeRO-3 the TrainingArguments
    must exist (and stay alive) before the base model is loaded, so that ``from_pretrained``
    partitions the weights as it loads them (``deepspeed.zero.Init``); ``sharding_arguments``
    needs no model for DeepSpeed (``model=None`` is fine).

Both need CUDA (:func:`check_sharding_supported`). On CPU, accelerate (1.15) enables its
FSDP plugin only for GPU-type devices: two torchrun processes with ``use_cpu=True`` and
gloo build the TrainingArguments with the FSDP settings, and the Trainer then trains them
as plain DDP (``DistributedType.MULTI_CPU``, a ``DistributedDataParallel`` wrapper), without
a word, although torch's ``fully_shard`` itself shards and trains a LoRA model on CPU over
gloo. DeepSpeed is likewise enabled only off CPU.
"""

from __future__ import annotations

import copy
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


def filled_deepspeed_config(config: RunConfig, world_size: int, *,
                            micro_batch_size: int | None = None) -> dict[str, Any]:
    """The configured DeepSpeed JSON with the ``"auto"`` values the chattune config implies
    filled in, as transformers fills them at run time: batch sizes (train_batch_size =
    micro batch x gradient_accumulation_steps x world_size), gradient clipping, the optimizer
    block's lr / betas / eps / weight_decay, the scheduler block's warmup and, with max_steps,
    total_num_steps, and fp16 / bf16. ``micro_batch_size``: the per-device batch the Trainer
    gets, where the batching plan changed it (default: per_device_train_batch_size).
    Left ``"auto"``: what needs the model (the hidden-size based ZeRO bucket sizes) or the
    data (total_num_steps of an epoch-based run); transformers fills those once it has them.
    A value that is set and contradicts the config is a ConfigError, as it would be an error
    in transformers."""
    if world_size < 1:
        raise ConfigError(f"world_size: must be >= 1, got {world_size}")
    path = config.train.deepspeed
    if not path:
        raise ConfigError("deepspeed: not set; name a DeepSpeed JSON config (e.g. examples/deepspeed/zero2.json)")
    settings = copy.deepcopy(load_deepspeed_config(path))
    mismatches: list[str] = []
    for key, value, source, must_match in _deepspeed_values(config, world_size, micro_batch_size):
        mismatch = _fill(settings, key, value, must_match)
        if mismatch is not None:
            mismatches.append(f"{key}={mismatch!r} but {source}={value!r}")
    if mismatches:
        raise ConfigError(f"deepspeed: {path}: {'; '.join(mismatches)}; set these to \"auto\" or to the "
                          "config's values")
    return settings


def _deepspeed_values(config: RunConfig, world_size: int, micro_batch_size: int | None) -> list[tuple]:
    """(DeepSpeed key, value, chattune key, must match) for every value transformers fills."""
    t = config.train
    micro = micro_batch_size or t.per_device_train_batch_size
    betas, eps = _adam_defaults()
    values = [
        ("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size", True),
        ("gradient_accumulation_steps", t.gradient_accumulation_steps, "gradient_accumulation_steps", True),
        ("train_batch_size", micro * t.gradient_accumulation_steps * world_size,
         "per_device_train_batch_size x gradient_accumulation_steps x world_size", True),
        ("gradient_clipping", t.max_grad_norm, "max_grad_norm", True),
        ("optimizer.params.lr", t.learning_rate, "learning_rate", True),
        ("optimizer.params.betas", betas, "adam betas (transformers' defaults)", True),
        ("optimizer.params.eps", eps, "adam epsilon (transformers' default)", True),
        ("optimizer.params.weight_decay", t.weight_decay, "weight_decay", True),
        ("scheduler.params.warmup_min_lr", 0, "(no chattune key)", False),
        ("scheduler.params.warmup_max_lr", t.learning_rate, "learning_rate", True),
        ("scheduler.params.warmup_num_steps", max(1, t.warmup_steps), "warmup_steps", True),
        ("fp16.enabled", t.fp16, "fp16", True),
        ("bf16.enabled", t.bf16, "bf16", True),
    ]
    if t.max_steps > 0:
        values.append(("scheduler.params.total_num_steps", t.max_steps, "max_steps", True))
    return values


def _adam_defaults() -> tuple[list[float], float]:
    """transformers' default Adam betas and epsilon (chattune has no keys for them)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return [fields["adam_beta1"].default, fields["adam_beta2"].default], fields["adam_epsilon"].default


def _fill(settings: dict, dotted_key: str, value, must_match: bool):
    """Replace an ``"auto"`` at ``dotted_key`` with ``value`` (only where the enclosing block
    exists, as transformers does); return the set value where it contradicts ``value``."""
    *parents, leaf = dotted_key.split(".")
    node = settings
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return None
    current = node.get(leaf)
    if current == "auto":
        node[leaf] = value
        return None
    if must_match and current is not None and current != value:
        return current
    return None
