"""Fine-tuning methods, applied to a loaded base model and loaded back from a run folder.

peft is the engine: LoRA layers, saving only the adapter, loading it back.
"""

from __future__ import annotations

from chattune.config import MethodArgs
from chattune.model import default_lora_targets


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
    )


def apply_method(model, args: MethodArgs):
    """Wrap the base model for training with the configured method."""
    from peft import get_peft_model

    if args.method != "lora":
        raise ValueError(f"method: {args.method!r} is not supported; expected 'lora'")
    try:
        return get_peft_model(model, lora_config(args, model.config.model_type))
    except ValueError as exc:
        raise ValueError(f"lora_target: {exc}") from exc


def load_adapter(base_model, run_dir: str, method: str):
    """Put a run folder's trained weights back on the base model (inference mode)."""
    from peft import PeftModel

    if method != "lora":
        raise ValueError(f"run folder {run_dir}: method {method!r} is not supported by this chattune")
    return PeftModel.from_pretrained(base_model, run_dir, is_trainable=False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
