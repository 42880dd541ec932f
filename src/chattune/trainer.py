"""transformers' Trainer as chattune runs it: its arguments from the run config, where the
model goes, what a run folder may resume from, and a token-weighted eval loss.

The Trainer does the loop, mixed precision, gradient accumulation, clipping, checkpoint
rotation and exact resume (model, optimizer, scheduler, RNG and the position in the data
order); :class:`ChattuneTrainer` changes only how the eval loss is averaged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from chattune.batching import Batches
from chattune.config import RunConfig
from chattune.config_io import resume_setting
from chattune.errors import ConfigError
from chattune.loss import CausalLMLoss
from chattune.methods import Method


class ChattuneTrainer(Trainer):
    """transformers' Trainer with one change: the eval loss is the mean over every supervised
    token of the eval set (the Trainer's own is a mean of per-batch means, which depends
    on how rows are batched or packed)."""

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's evaluation loop, with ``<prefix>_loss`` token-weighted."""
        loss = self.compute_loss_func
        if isinstance(loss, CausalLMLoss):
            loss.reset_eval()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if isinstance(loss, CausalLMLoss):
            dtype = torch.float64 if self.args.device.type in ("cpu", "cuda") else torch.float32
            totals = torch.tensor([loss.eval_sum, loss.eval_count], dtype=dtype, device=self.args.device)
            totals = self.accelerator.reduce(totals, reduction="sum")
            if totals[1] > 0:
                output.metrics[f"{prefix}_loss"] = (totals[0] / totals[1]).item()
        return output

    def final_eval_loss(self) -> float | None:
        """The eval loss after the last step: the one logged at that step (the Trainer
        evaluates there when the step is an eval step), else evaluated now; None without
        eval data."""
        if self.eval_dataset is None:
            return None
        last = [entry["eval_loss"] for entry in self.state.log_history
                if "eval_loss" in entry and entry.get("step") == self.state.global_step]
        return last[-1] if last else self.evaluate()["eval_loss"]


def resume_path(config: RunConfig, output_dir: Path) -> str | None:
    """The checkpoint to resume from: as set by ``resume_from_checkpoint`` (``true``: the
    last one in ``output_dir``), else None; an ``output_dir`` that already holds
    checkpoints without it is an error (chattune never overwrites checkpoints)."""
    setting = resume_setting(config)
    existing = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if setting is True:
        if existing is None:
            raise ConfigError(f"resume_from_checkpoint: no checkpoint-* folder in {output_dir} to resume from")
        return existing
    if isinstance(setting, str):
        if not Path(setting).is_dir():
            raise ConfigError(f"resume_from_checkpoint: {setting} is not a checkpoint folder")
        return setting
    if existing is not None:
        raise ConfigError(
            f"output_dir: {output_dir} already holds checkpoints ({Path(existing).name}); "
            "set resume_from_checkpoint=true to continue, or choose another output_dir "
            "(chattune never overwrites checkpoints)"
        )
    return None


def place_model(model, method: Method) -> None:
    """Put the model on the device the Trainer would put it on, before the probes run on it
    (not a model dispatched with a device map, nor a quantized base: those stay put)."""
    if getattr(model, "hf_device_map", None) is None and not method.quantized_base:
        from accelerate import PartialState

        model.to(PartialState().device)


def dataloader_workers(setting: int | None) -> int:
    """DataLoader workers: as set, else 2-4 on CUDA (batches are built while the GPU computes)
    and 0 on CPU (workers would take cores from the compute)."""
    if setting is not None:
        return setting
    if not torch.cuda.is_available():
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def training_arguments(config: RunConfig, has_eval: bool, batches: Batches | None = None) -> TrainingArguments:
    """transformers TrainingArguments from the run config (and the batching plan)."""
    t = config.train
    eval_steps = t.eval_steps or t.save_steps
    report = [r for r in t.report_to if r != "none"]
    fields = TrainingArguments.__dataclass_fields__
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    extra = {}
    if batches is not None and batches.mode == "group_by_length":
        if "train_sampling_strategy" in fields:
            extra["train_sampling_strategy"] = "group_by_length"
        else:  # transformers 4
            extra["group_by_length"] = True
    if t.torch_compile:
        extra.update(torch_compile=True, torch_compile_backend="inductor")
    workers = dataloader_workers(t.dataloader_num_workers)
    return TrainingArguments(
        **{checkpointing: t.gradient_checkpointing},
        **extra,
        output_dir=t.output_dir,
        per_device_train_batch_size=batches.train_batch_size if batches else t.per_device_train_batch_size,
        per_device_eval_batch_size=batches.eval_batch_size if batches else t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=t.optim,
        max_grad_norm=t.max_grad_norm,
        fp16=t.fp16,
        bf16=t.bf16,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        seed=t.seed,
        data_seed=t.seed,
        report_to=report or "none",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
