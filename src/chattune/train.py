"""Train: config -> data -> base model + method -> transformers Trainer -> run folder.

transformers' Trainer does the loop, mixed precision, gradient accumulation,
clipping, checkpoint rotation and exact resume (model, optimizer, scheduler,
RNG and the position in the data order). chattune adds what it does not do:
a manifest in every checkpoint, metrics.jsonl with tokens/s, refusing to
overwrite checkpoints, and a clear word when the loss goes NaN.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from chattune.config import ConfigError, RunConfig, resume_setting
from chattune.data.encode import IGNORE_INDEX
from chattune.data.prepare import PreparedData, format_audit, prepare_data
from chattune.data.templates import resolve_template_name
from chattune.manifest import build_manifest, write_run_files
from chattune.methods import apply_method, check_supported, count_parameters, quantization_config
from chattune.model import base_model_fingerprint, load_model, load_tokenizer, resolve_dtype

METRICS_NAME = "metrics.jsonl"
AUDIT_NAME = "data_audit.json"


class PadCollator:
    """Pads a batch to its longest row: pad id on inputs, -100 on labels, 0 on the mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class MetricsLogger(TrainerCallback):
    """Appends every log event (loss, lr, grad norm, tokens/s, eval loss) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self.last_time: float | None = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = time.perf_counter()
        if "loss" in logs and self.last_time is not None:
            seen = state.num_input_tokens_seen
            elapsed = max(now - self.last_time, 1e-9)
            logs["tokens_per_second"] = round((seen - self.last_tokens) / elapsed, 1)
            self.last_time, self.last_tokens = now, seen
        loss = logs.get("loss")
        if isinstance(loss, float) and (math.isnan(loss) or math.isinf(loss)):
            print(f"chattune: loss is {loss} at step {state.global_step}. Under fp16 this usually "
                  "means overflow: lower learning_rate, use bf16, or train in float32.")
        row = {"step": state.global_step, **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


class ManifestWriter(TrainerCallback):
    """Makes each checkpoint a self-describing run folder (manifest + config)."""

    def __init__(self, manifest: dict, config: RunConfig):
        self.manifest = manifest
        self.config = config

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_run_files(folder, self.manifest, self.config, {"global_step": state.global_step})


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    global_step: int
    train_loss: float
    eval_loss: float | None
    prepared: PreparedData
    model: object = None


def _resume_path(config: RunConfig, output_dir: Path) -> str | None:
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


def training_arguments(config: RunConfig, has_eval: bool) -> TrainingArguments:
    """transformers TrainingArguments from the run config."""
    t = config.train
    eval_steps = t.eval_steps or t.save_steps
    report = [r for r in t.report_to if r != "none"]
    fields = TrainingArguments.__dataclass_fields__
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return TrainingArguments(
        **{checkpointing: t.gradient_checkpointing},
        output_dir=t.output_dir,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
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
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )


def train(config: RunConfig, *, log=print) -> TrainResult:
    """Run one training job described by ``config``; return where its run folder is."""
    if not config.model.model_name_or_path:
        raise ConfigError("model_name_or_path: no base model given")
    check_supported(config.method, config.train.optim)
    output_dir = Path(config.train.output_dir)
    resume = _resume_path(config, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.train.seed)

    tokenizer = load_tokenizer(config.model.model_name_or_path, config.model.trust_remote_code)
    template_name = resolve_template_name(config.data.template, tokenizer)
    prepared = prepare_data(config.data, tokenizer, template_name, config.train.seed)
    log(format_audit(prepared.audit))
    (output_dir / AUDIT_NAME).write_text(json.dumps(prepared.audit, indent=2, ensure_ascii=False))

    dtype = resolve_dtype(config.model.dtype, config.train.fp16, config.train.bf16)
    extra = {"quantization_config": quantization_config(config.method)} if config.method.method == "qlora" else {}
    model = load_model(config.model, dtype, **extra)
    model.config.use_cache = False  # a KV cache is never needed in training
    if config.train.gradient_checkpointing:
        model.enable_input_require_grads()
    model = apply_method(model, config.method, config.train.gradient_checkpointing)
    trainable, total = count_parameters(model)
    log(f"method {config.method.method}: {trainable:,} trainable of {total:,} parameters "
        f"({trainable / total:.3%})")

    base = base_model_fingerprint(config.model.model_name_or_path, config.model.trust_remote_code, tokenizer)
    manifest = build_manifest(config, base, template_name, tokenizer, prepared.fingerprint)
    args = training_arguments(config, prepared.eval is not None)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsLogger(output_dir / METRICS_NAME), ManifestWriter(manifest, config)],
    )
    result = trainer.train(resume_from_checkpoint=resume)
    eval_loss = None
    if prepared.eval is not None:
        eval_loss = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(output_dir))
    write_run_files(output_dir, manifest, config, {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "trainable_parameters": trainable,
    })
    model.eval()
    return TrainResult(output_dir, trainer.state.global_step, result.training_loss, eval_loss, prepared, model)
