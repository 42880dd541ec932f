"""Fine-tuning methods: what each trains, how it is saved, how it is put back.

| method  | trains                                    | run folder holds                      |
|---------|-------------------------------------------|---------------------------------------|
| lora    | LoRA (DoRA / rsLoRA) adapters             | peft adapter                          |
| qlora   | LoRA on a 4-bit NF4 (or 8-bit) base, CUDA | peft adapter                          |
| freeze  | chosen modules of the last n blocks       | the trained tensors (model.safetensors, no config.json) |
| ptuning | P-Tuning v2 prefix encoder                | peft prefix-tuning adapter            |
| full    | every parameter                           | a complete Hugging Face model         |

peft is the engine for lora, qlora and ptuning; freeze and full are plain
``requires_grad`` choices on the base model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from chattune.config import CUDA_OPTIMIZERS, ConfigError, MethodArgs
from chattune.model import default_lora_targets

PEFT_METHODS = ("lora", "qlora", "ptuning")
FREEZE_CONFIG_NAME = "freeze_config.json"
FREEZE_WEIGHTS_NAME = "model.safetensors"

_SETTINGS = {
    "lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_dora", "use_rslora",
             "modules_to_save"),
    "freeze": ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"),
    "ptuning": ("pre_seq_len", "prefix_projection", "prefix_hidden_size"),
    "full": (),
}
_SETTINGS["qlora"] = _SETTINGS["lora"] + ("quantization_bit",)


def method_settings(args: MethodArgs) -> dict:
    """The method's name and the settings that matter for it (for the manifest)."""
    values = asdict(args)
    return {"name": args.method, **{k: values[k] for k in _SETTINGS[args.method]}}


def check_supported(args: MethodArgs, optim: str = "adamw_torch") -> None:
    """Refuse, before any model is loaded, what this machine cannot run."""
    if args.method == "qlora" and not torch.cuda.is_available():
        raise ConfigError(
            "method: qlora loads the base model in 4/8-bit with bitsandbytes, which needs a CUDA GPU, "
            "and none is present. Use method=lora here (optionally dtype=bfloat16 to halve memory), "
            "or run on a CUDA machine."
        )
    if optim in CUDA_OPTIMIZERS and not torch.cuda.is_available():
        raise ConfigError(f"optim: {optim} is a bitsandbytes optimizer and needs a CUDA GPU; use adamw_torch here")


def quantization_config(args: MethodArgs):
    """bitsandbytes settings for qlora (imported only here)."""
    from transformers import BitsAndBytesConfig

    if args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def lora_config(args: MethodArgs, model_type: str):
    """The peft LoraConfig for these settings and this architecture."""
    from peft import LoraConfig, TaskType

    targets = args.lora_target or default_lora_targets(model_type)
    if isinstance(targets, list) and targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=args.lora_rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        modules_to_save=args.modules_to_save,
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
    ``num_hidden_layers`` (``num_layers`` for ChatGLM remote code)."""
    config = model.config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    candidates = [m for _, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not candidates:
        raise ValueError(f"freeze: cannot find the list of {count} transformer blocks in {type(model).__name__}")
    return candidates[0]


def freeze_parameter_names(model, args: MethodArgs) -> list[str]:
    """Names of the parameters the freeze method trains."""
    blocks = block_list(model)
    n = args.freeze_trainable_layers
    chosen = range(len(blocks) - n, len(blocks)) if n > 0 else range(0, -n)
    if n > len(blocks) or -n > len(blocks):
        raise ConfigError(f"freeze_trainable_layers: {n} but the model has {len(blocks)} blocks")
    block_ids = {id(blocks[i]): i for i in chosen}
    names = set()
    block_prefix = {}
    for name, module in model.named_modules():
        if id(module) in block_ids:
            block_prefix[name] = block_ids[id(module)]
    wanted = set(args.freeze_trainable_modules)
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


def apply_method(model, args: MethodArgs, gradient_checkpointing: bool = False):
    """Make the loaded base model trainable in the configured way; return the model to train."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    method = args.method
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if method in ("lora", "qlora"):
        try:
            return get_peft_model(model, lora_config(args, model.config.model_type))
        except ValueError as exc:
            raise ConfigError(f"lora_target: {exc}") from exc
    if method == "ptuning":
        return get_peft_model(model, prefix_config(args))
    if method == "freeze":
        names = set(freeze_parameter_names(model, args))
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        model.save_pretrained = _save_trained_tensors(model, sorted(names))
        return model
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    raise ConfigError(f"method: unknown method {method!r}")


def load_trained(base_model, run_dir: str | Path, method: str):
    """Put a run folder's trained weights back on a loaded base model (inference mode).

    For ``full`` the run folder is itself the model: load it with
    :func:`chattune.model.load_model` instead and skip this.
    """
    from peft import PeftModel

    run_dir = Path(run_dir)
    if method in PEFT_METHODS:
        return PeftModel.from_pretrained(base_model, str(run_dir), is_trainable=False)
    if method == "freeze":
        from safetensors.torch import load_file

        tensors = load_file(str(run_dir / FREEZE_WEIGHTS_NAME))
        params = dict(base_model.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ValueError(f"{run_dir}: trained tensors not found in the base model: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name].dtype))
        return base_model
    raise ValueError(f"run folder {run_dir}: method {method!r} is not supported by this chattune")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_names(model) -> list[str]:
    """Names of the parameters that require gradients."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
