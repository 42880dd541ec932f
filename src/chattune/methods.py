"""Fine-tuning methods, as one table: what each needs, trains, saves and how it is put back.

| method  | trains                                    | run folder holds                      |
|---------|-------------------------------------------|---------------------------------------|
| lora    | LoRA (DoRA / rsLoRA) adapters             | peft adapter                          |
| qlora   | LoRA on a 4-bit NF4 (or 8-bit) base, CUDA | peft adapter                          |
| freeze  | chosen modules of the last n blocks       | the trained tensors (model.safetensors, no config.json) |
| ptuning | P-Tuning v2 prefix encoder                | peft prefix-tuning adapter            |
| full    | every parameter                           | a complete Hugging Face model         |

A lora run whose ``lora_init`` changes the base weights while training (PiSSA, OLoRA) saves its
adapter converted to a plain LoRA of the original base (:mod:`chattune.lora_init`).

Each :class:`Method` declares once whether it needs CUDA, whether its rows may be
packed, how it is applied to a base model, how a run folder of it is loaded, how
the memory plan counts it, and whether a server can batch it beside other
adapters. The rest of chattune asks :func:`get_method`, never the method's name.
peft is the engine for lora, qlora and ptuning; freeze and full are plain
``requires_grad`` choices on the base model.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from chattune.config import CUDA_OPTIMIZERS, OPTIMIZER_PACKAGES, MethodArgs, RunConfig
from chattune.errors import ConfigError, ManifestError
from chattune.lora_init import (
    check_lora_init,
    keep_initial_adapter,
    mutates_base,
    peft_init,
    starting_rng,
)
from chattune.model import REWARD_HEAD, default_lora_targets, text_config

FREEZE_CONFIG_NAME = "freeze_config.json"
FREEZE_WEIGHTS_NAME = "model.safetensors"

LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora", "use_rslora",
                 "lora_init", "modules_to_save", "trainable_token_indices")


@dataclass(frozen=True)
class Method:
    """One fine-tuning method, as every stage of chattune needs to know it."""

    name: str
    settings: tuple[str, ...]
    """The MethodArgs keys that matter for it (recorded in the manifest)."""
    apply: Callable[[object, MethodArgs, bool], object]
    """(base model, settings, gradient checkpointing) -> the model to train."""
    load: Callable[[object, Path], object] | None
    """(base model, run folder) -> the model for inference; None when the run folder is
    itself a complete model (``run_is_model``)."""
    needs_cuda: bool = False
    quantized_base: bool = False
    """The base is loaded in 4/8-bit (bitsandbytes) for training and, on CUDA, inference."""
    packing_refusal: str | None = None
    """Why rows cannot be packed with this method; None where they can."""
    run_is_model: bool = False
    """The run folder holds a complete Hugging Face model (loaded instead of the base)."""
    trains_base_weights: bool = False
    """Base weights themselves train (gradients and optimizer state in the load dtype)."""
    activations: Literal["frozen_blocks", "trained_blocks", "all_blocks"] = "frozen_blocks"
    """How the memory plan counts saved activations: gradients flow through frozen blocks to
    adapters or a prefix; only blocks from the first trained one on; every block trained."""
    batches_with_adapters: bool = False
    """A server may batch its rows beside other LoRA adapters and the bare base model."""
    plan_apply: Callable[[object, MethodArgs, bool], object] | None = None
    """``apply`` for the memory plan on the meta device, where it differs (qlora: the k-bit
    preparation needs CUDA; the LoRA shapes are the same)."""

    def manifest_settings(self, args: MethodArgs) -> dict:
        """The method's name and the settings that matter for it (for the manifest)."""
        values = asdict(args)
        return {"name": self.name, **{k: values[k] for k in self.settings}}

    def served_alone(self, settings: dict) -> bool:
        """Whether a run with these (manifest) settings must be served without other adapters:
        it replaces base weights (freeze, full), changes every layer's cache (ptuning), or
        peft cannot mix it in a batch (DoRA)."""
        return not self.batches_with_adapters or bool(settings.get("use_dora"))

    def base_load_kwargs(self, settings: dict) -> dict:
        """Extra ``from_pretrained`` arguments for the base model of a run (qlora on CUDA:
        the quantization it was trained with; elsewhere the base loads unquantized)."""
        if not self.quantized_base or not torch.cuda.is_available():
            return {}
        known = {k: v for k, v in settings.items() if k in MethodArgs.__dataclass_fields__}
        return {"quantization_config": quantization_config(MethodArgs(**known))}

    def check_supported(self, optim: str = "adamw_torch") -> None:
        """Refuse, before any model is loaded, what this machine cannot run."""
        if self.needs_cuda and not torch.cuda.is_available():
            raise ConfigError(
                f"method: {self.name} loads the base model in 4/8-bit with bitsandbytes, which needs a "
                "CUDA GPU, and none is present. Use method=lora here (optionally dtype=bfloat16 to halve "
                "memory), or run on a CUDA machine."
            )
        if optim in CUDA_OPTIMIZERS and not torch.cuda.is_available():
            raise ConfigError(f"optim: {optim} is a bitsandbytes optimizer and needs a CUDA GPU; use adamw_torch here")
        for prefix, (module, package) in OPTIMIZER_PACKAGES.items():
            if optim.startswith(prefix) and importlib.util.find_spec(module) is None:
                raise ConfigError(f"optim: {optim} needs the {package} package, which is not installed "
                                  f"(pip install {package}); or use adamw_torch")


def quantization_config(args: MethodArgs):
    """bitsandbytes settings for qlora (imported only here)."""
    from transformers import BitsAndBytesConfig

    if args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def is_reward_model(model) -> bool:
    """Whether ``model`` is a reward model (a transformers ``*ForSequenceClassification`` model
    with its scalar head, ``score``), not a causal LM."""
    return type(model).__name__.endswith("ForSequenceClassification") and hasattr(model, REWARD_HEAD)


def lora_config(args: MethodArgs, model_type: str, reward: bool = False):
    """The peft LoraConfig for these settings and this architecture; ``reward``: for a reward model
    (peft's SEQ_CLS task, which trains and saves the reward head whole beside the adapter)."""
    from peft import LoraConfig, TaskType

    targets = args.lora_target or default_lora_targets(model_type)
    if isinstance(targets, list) and targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if reward else TaskType.CAUSAL_LM,
        r=args.lora_rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        init_lora_weights=peft_init(args.lora_init),
        modules_to_save=args.modules_to_save,
        trainable_token_indices=args.trainable_token_indices,
    )


def prefix_config(args: MethodArgs):
    """The peft PrefixTuningConfig of P-Tuning v2."""
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.pre_seq_len,
        prefix_projection=args.prefix_projection, encoder_hidden_size=args.prefix_hidden_size,
    )


def block_list(model) -> torch.nn.ModuleList:
    """The architecture's own list of transformer blocks: the ModuleList whose length is
    ``num_hidden_layers`` (``num_layers`` for ChatGLM remote code); for a vision-language model,
    its language model's (never the vision tower's)."""
    config = text_config(model.config)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    candidates = [m for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count
                  and not any(part.startswith(("vision", "visual")) for part in name.split("."))]
    if not candidates:
        raise ConfigError(f"method: freeze needs the model's list of transformer blocks, and no list of {count} "
                          f"modules (the config's num_hidden_layers) was found in {type(model).__name__}")
    return candidates[0]


def freeze_parameter_names(model, args: MethodArgs) -> list[str]:
    """Names of the parameters the freeze method trains."""
    blocks = block_list(model)
    n = args.freeze_trainable_layers
    if n > len(blocks) or -n > len(blocks):
        raise ConfigError(f"freeze_trainable_layers: {n} but the model has {len(blocks)} blocks")
    chosen = range(len(blocks) - n, len(blocks)) if n > 0 else range(0, -n)
    block_ids = {id(blocks[i]): i for i in chosen}
    block_prefix = {name: block_ids[id(module)] for name, module in model.named_modules() if id(module) in block_ids}
    wanted = set(args.freeze_trainable_modules)
    names = set()
    for name, _ in model.named_parameters():
        for prefix in block_prefix:
            if name.startswith(prefix + "."):
                inner = name[len(prefix) + 1:].split(".")
                if "all" in wanted or wanted.intersection(inner[:-1]):
                    names.add(name)
        if args.freeze_extra_modules and set(args.freeze_extra_modules).intersection(name.split(".")[:-1]):
            names.add(name)
    if not names:
        raise ConfigError(
            f"freeze_trainable_modules: none of {sorted(wanted)} found in blocks {list(chosen)}; "
            f"module names there: {sorted({n.split('.')[-2] for n, _ in blocks[list(chosen)[0]].named_parameters()})}"
        )
    return sorted(names)


def _save_trained_tensors(model, names: list[str]):
    """A ``save_pretrained`` for freeze: only the trained tensors, plus their names."""
    from safetensors.torch import save_file

    def save_pretrained(output_dir, state_dict=None, **_):
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        params = dict(model.named_parameters())
        tensors = {name: params[name].detach().cpu().contiguous() for name in names}
        save_file(tensors, str(folder / FREEZE_WEIGHTS_NAME), metadata={"format": "pt", "chattune": "freeze"})
        (folder / FREEZE_CONFIG_NAME).write_text(json.dumps({"trained_tensors": names}, indent=1))

    return save_pretrained


def _trainable_tokens(model, ids: list[int]) -> list[int] | dict[str, list[int]]:
    """peft's ``trainable_token_indices`` for ``ids``: the input embedding's rows (peft follows a
    tied output layer), or for an untied output layer both layers' rows by module name."""
    output = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if output is None or output.weight is embedding.weight:
        return ids
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return {names[id(embedding)]: ids, names[id(output)]: ids}


def _apply_lora(model, args: MethodArgs, gradient_checkpointing: bool):
    """peft's LoRA on ``model``; a start that changes the base weights (``lora_init`` pissa,
    olora) made with seeded random generators, its initial adapter kept so that every adapter
    saved is a LoRA of the original base (:mod:`chattune.lora_init`). On the meta device (a
    memory plan, shapes alone) every start is peft's default."""
    config = lora_config(args, model.config.model_type, is_reward_model(model))
    if args.trainable_token_indices:
        config.trainable_token_indices = _trainable_tokens(model, args.trainable_token_indices)
    if any(param.device.type == "meta" for param in model.parameters()):
        config.init_lora_weights = True
    if config.init_lora_weights is True or not mutates_base(args.lora_init):
        return _peft_model(model, config)
    with starting_rng():
        model = _peft_model(model, config)
    keep_initial_adapter(model)
    return model


def _peft_model(model, config):
    """peft's ``get_peft_model``; its ValueError (a target the model lacks) a ConfigError."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"lora_target: {exc}") from exc


def _apply_qlora(model, args: MethodArgs, gradient_checkpointing: bool):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return _apply_lora(model, args, gradient_checkpointing)


def _apply_ptuning(model, args: MethodArgs, gradient_checkpointing: bool):
    from peft import get_peft_model

    return get_peft_model(model, prefix_config(args))


def train_only(model, names: set[str]):
    """``model`` with only the parameters ``names`` trainable, saving (``save_pretrained``) only
    those tensors, as the freeze method does."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    model.save_pretrained = _save_trained_tensors(model, sorted(names))
    return model


def _apply_freeze(model, args: MethodArgs, gradient_checkpointing: bool):
    names = set(freeze_parameter_names(model, args))
    if is_reward_model(model):  # a reward model's new head always trains
        names |= {name for name, _ in model.named_parameters() if name.split(".")[0] == REWARD_HEAD}
    return train_only(model, names)


def _apply_full(model, args: MethodArgs, gradient_checkpointing: bool):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def _load_peft(base_model, run_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(run_dir), is_trainable=False)


def _load_freeze(base_model, run_dir: Path):
    from safetensors.torch import load_file

    path = run_dir / FREEZE_WEIGHTS_NAME
    if not path.is_file():
        raise ManifestError(f"{run_dir}: no {FREEZE_WEIGHTS_NAME}; a freeze run folder holds its trained tensors there")
    tensors = load_file(str(path))
    params = dict(base_model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ManifestError(f"{path}: trained tensors not found in the base model: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise ManifestError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the base model's "
                                    f"{tuple(params[name].shape)}")
            params[name].copy_(tensor.to(params[name].dtype))
    return base_model


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", LORA_SETTINGS, _apply_lora, _load_peft, batches_with_adapters=True),
    Method("qlora", LORA_SETTINGS + ("quantization_bit",), _apply_qlora, _load_peft, needs_cuda=True,
           quantized_base=True, batches_with_adapters=True, plan_apply=_apply_lora),
    Method("freeze", ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"),
           _apply_freeze, _load_freeze, trains_base_weights=True, activations="trained_blocks"),
    Method("ptuning", ("pre_seq_len", "prefix_projection", "prefix_hidden_size"), _apply_ptuning, _load_peft,
           packing_refusal="P-Tuning v2 feeds every layer a KV prefix, and with a KV cache transformers "
                           "does not keep packed rows apart"),
    Method("full", (), _apply_full, None, run_is_model=True, trains_base_weights=True, activations="all_blocks"),
)}


def get_method(name: str) -> Method:
    """The method called ``name``, or an error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method: unknown method {name!r}; expected one of {', '.join(METHODS)}") from None


def check_run_config(config: RunConfig) -> None:
    """What a run's config asks of its method (ConfigError naming the key): a method that cannot
    train packed rows refuses ``packing=pack`` / ``padding_free``; ``lora_init`` must be one
    the method (and the sharding) can honour (:func:`chattune.lora_init.check_lora_init`)."""
    refusal = get_method(config.method.method).packing_refusal
    if refusal and config.data.packing in ("pack", "padding_free"):
        raise ConfigError(f"packing: {config.data.packing} is not possible with method={config.method.method} "
                          f"({refusal}); use packing=auto, group_by_length or pad")
    sharding = "fsdp" if config.train.fsdp.strip() else "deepspeed" if config.train.deepspeed else None
    check_lora_init(config.method.lora_init, config.method.method, sharding)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
