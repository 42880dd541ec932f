"""Train: config -> data -> base model + method -> transformers Trainer -> run folder.

transformers' Trainer does the loop, mixed precision, gradient accumulation,
clipping, checkpoint rotation and exact resume (model, optimizer, scheduler,
RNG and the position in the data order). chattune adds what it does not do:
a manifest in every checkpoint, metrics.jsonl with tokens/s, refusing to
overwrite checkpoints, a clear word when the loss goes NaN, and speed:

- batching (``packing``): rows packed into ``pack_length`` bins without cross-talk
  (:mod:`chattune.data.packing`, checked on the real model before training), padding-free
  batches, length-grouped batches or plain padding. Whatever the mode, a step carries
  the tokens of ``per_device_train_batch_size`` rows on average, so steps, warm-up and
  the learning-rate schedule mean the same thing with and without packing;
- the loss (``loss``): token-weighted, chunked so that the full-vocabulary logits are
  never built (:mod:`chattune.loss`), checked against the model's own logits;
- the eval loss is the mean over all supervised tokens, however rows are batched;
- on CPU, faster LoRA dropout and rank-r matmuls (:mod:`chattune.kernels`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from chattune.config import ConfigError, RunConfig, resume_setting
from chattune.data.encode import IGNORE_INDEX
from chattune.data.packing import (
    PackCollator,
    PackedSteps,
    check_packed_attention,
    plan_packing,
    use_varlen_sdpa,
    uses_varlen_attention,
)
from chattune.data.prepare import PreparedData, format_audit, prepare_data
from chattune.data.templates import resolve_template_name
from chattune.kernels import use_cpu_kernels
from chattune.loss import CausalLMLoss, HeadCapture, check_head_logits, output_layer
from chattune.manifest import build_manifest, write_run_files
from chattune.methods import apply_method, count_parameters, get_method, quantization_config
from chattune.model import base_model_fingerprint, load_model, load_tokenizer, resolve_dtype

METRICS_NAME = "metrics.jsonl"
AUDIT_NAME = "data_audit.json"
COMPILE_BACKEND: str | None = None
"""torch.compile backend with ``torch_compile: true`` (None: inductor); tests use aot_eager."""


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


@dataclass
class Batches:
    """How training and evaluation data reach the model."""

    mode: str
    train: object
    eval: object | None
    collator: object
    train_batch_size: int
    eval_batch_size: int
    summary: dict = field(default_factory=dict)


def row_lengths(dataset) -> list[int]:
    """Tokens of every row of an encoded data set (read from Arrow, not row by row)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_pylist()


def resolve_packing(config: RunConfig, model, pad_token_id: int, vocab_size: int, log=print) -> str:
    """The batching mode to train with: ``auto`` becomes ``pack`` where the model keeps packed
    rows apart (checked on a probe), else ``group_by_length``; an explicit ``pack`` or
    ``padding_free`` the model cannot honour is an error."""
    wanted = config.data.packing
    if wanted in ("pad", "group_by_length"):
        return wanted
    reason = get_method(config.method.method).packing_refusal
    if reason is None:
        collator = PackCollator(pad_token_id, flatten=wanted == "padding_free" or uses_varlen_attention(model))
        reason = check_packed_attention(model, collator, vocab_size)
    if reason is None:
        return "pack" if wanted == "auto" else wanted
    if wanted == "auto":
        log(f"packing: not packing ({reason}); batching rows grouped by length instead")
        return "group_by_length"
    raise ConfigError(f"packing: {wanted} is not possible here: {reason}. Use packing=group_by_length or pad.")


def build_batches(mode: str, prepared: PreparedData, config: RunConfig, pad_token_id: int,
                  flatten: bool) -> Batches:
    """Datasets, collator and Trainer batch sizes for a batching mode.

    ``pack``: Trainer items are whole steps (bins grouped to carry the tokens of
    ``per_device_train_batch_size`` average rows), so its batch size is 1.
    ``padding_free``: batches of rows, concatenated into one sequence.
    ``group_by_length`` / ``pad``: batches of rows padded to the longest (with an attention mask).
    """
    t, d = config.train, config.data
    if mode == "pack":
        capacity = d.pack_length or d.max_seq_length
        train_plan = plan_packing(row_lengths(prepared.train), capacity, t.per_device_train_batch_size, t.seed)
        train = PackedSteps(prepared.train, train_plan.steps)
        summary = {"mode": mode, "train": train_plan.summary()}
        evaluation = None
        if prepared.eval is not None:
            eval_plan = plan_packing(row_lengths(prepared.eval), capacity, t.per_device_eval_batch_size,
                                     t.seed, shuffle=False)
            evaluation = PackedSteps(prepared.eval, eval_plan.steps)
            summary["eval"] = eval_plan.summary()
        collator = PackCollator(pad_token_id, flatten, pad_to=train_plan.pad_to)
        return Batches(mode, train, evaluation, collator, 1, 1, summary)
    train, evaluation = prepared.train, prepared.eval
    if mode == "padding_free":
        collator = PackCollator(pad_token_id, flatten=True)
    else:
        collator = PadCollator(pad_token_id)
    if mode == "group_by_length":
        train = train.add_column("length", row_lengths(train))
    return Batches(mode, train, evaluation, collator, t.per_device_train_batch_size,
                   t.per_device_eval_batch_size, {"mode": mode})


def format_batches(batches: Batches) -> str:
    """One line on how the data is batched (for the log)."""
    if batches.mode != "pack":
        return f"batching: {batches.mode}"
    p = batches.summary["train"]
    size = f"{p['bin_length']}" + (f" (a step's budget; pack_length {p['pack_length']})"
                                  if p["bin_length"] < p["pack_length"] else "")
    line = (f"packing: {p['rows']} rows into {p['bins']} bins of {size} tokens "
            f"({p['fill']:.1%} full); {p['steps']} steps of {p['rows_per_step']} rows "
            f"({p['bins_per_step'][0]}-{p['bins_per_step'][1]} bins) per epoch and device, "
            f"as {p['rows_per_step_unpacked']} rows a step unpacked")
    if abs(p["rows_per_step"] - p["rows_per_step_unpacked"]) > 0.25 * p["rows_per_step_unpacked"]:
        line += ("; steps hold a different number of rows than unpacked ones would, as some rows are "
                 "much longer than a step's budget: raise per_device_train_batch_size or use packing=pad")
    return line


def resolve_loss(config: RunConfig, model, vocab_size: int, log=print) -> CausalLMLoss:
    """The loss function: ``auto`` is chunked where the model's logits are exactly its output
    layer applied to the last hidden states (checked on a probe), else plain."""
    wanted = config.train.loss
    if wanted == "plain":
        return CausalLMLoss()
    head = output_layer(model)
    reason = "the model has no output layer chattune can find" if head is None else \
        check_head_logits(model, head, vocab_size)
    if reason is None:
        return CausalLMLoss(HeadCapture(head), config.train.loss_chunk_size)
    if wanted == "auto":
        log(f"loss: plain ({reason})")
        return CausalLMLoss()
    raise ConfigError(f"loss: chunked is not possible for this model: {reason}. Use loss=plain.")


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
        extra.update(torch_compile=True, torch_compile_backend=COMPILE_BACKEND or "inductor")
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


def _speed_setup(config: RunConfig, model, prepared: PreparedData, pad_token_id: int, log):
    """Put the model where it trains, switch on the CPU kernels and per-row SDPA where they
    apply, and settle (with probes on the model) how data is batched and the loss computed.
    Returns the batches, the loss function and the function that restores the attention."""
    if getattr(model, "hf_device_map", None) is None and not get_method(config.method.method).quantized_base:
        from accelerate import PartialState

        model.to(PartialState().device)  # where the Trainer would put it; the probes run there
    vocab_size = model.get_input_embeddings().weight.shape[0]
    eager_cpu = next(model.parameters()).device.type == "cpu" and not config.train.torch_compile
    restore_attention = None
    if eager_cpu:  # (torch.compile fuses on its own and keeps transformers' masked SDPA)
        use_cpu_kernels(model)
        # packed rows attend within their own span, not over the whole bin; on CUDA,
        # attn_implementation=flash_attention_2 gives the varlen path
        restore_attention = use_varlen_sdpa(model)
    mode = resolve_packing(config, model, pad_token_id, vocab_size, log)
    if mode not in ("pack", "padding_free") and restore_attention is not None:
        restore_attention = restore_attention()  # back to SDPA; returns None
    batches = build_batches(mode, prepared, config, pad_token_id, uses_varlen_attention(model))
    log(format_batches(batches))
    loss = resolve_loss(config, model, vocab_size, log)
    log(f"loss: {loss.mode}")
    return batches, loss, restore_attention


def train(config: RunConfig, *, log=print) -> TrainResult:
    """Run one training job described by ``config``; return where its run folder is."""
    if not config.model.model_name_or_path:
        raise ConfigError("model_name_or_path: no base model given")
    method = get_method(config.method.method)
    method.check_supported(config.train.optim)
    output_dir = Path(config.train.output_dir)
    resume = _resume_path(config, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.train.seed)

    tokenizer = load_tokenizer(config.model.model_name_or_path, config.model.trust_remote_code)
    template_name = resolve_template_name(config.data.template, tokenizer)
    prepared = prepare_data(config.data, tokenizer, template_name, config.train.seed)
    log(format_audit(prepared.audit))

    dtype = resolve_dtype(config.model.dtype, config.train.fp16, config.train.bf16)
    extra = {"quantization_config": quantization_config(config.method)} if method.quantized_base else {}
    if config.model.attn_implementation:
        extra["attn_implementation"] = config.model.attn_implementation
    model = load_model(config.model, dtype, **extra)
    model.config.use_cache = False  # a KV cache is never needed in training (and would break packing)
    if config.train.gradient_checkpointing:
        model.enable_input_require_grads()
    model = apply_method(model, config.method, config.train.gradient_checkpointing)
    trainable, total = count_parameters(model)
    log(f"method {config.method.method}: {trainable:,} trainable of {total:,} parameters "
        f"({trainable / total:.3%})")

    batches, loss, restore_attention = _speed_setup(config, model, prepared, tokenizer.pad_token_id, log)
    audit = {**prepared.audit, "batching": {**batches.summary, "loss": loss.mode}}
    (output_dir / AUDIT_NAME).write_text(json.dumps(audit, indent=2, ensure_ascii=False))

    base = base_model_fingerprint(config.model.model_name_or_path, config.model.trust_remote_code, tokenizer)
    manifest = build_manifest(config, base, template_name, tokenizer, prepared.fingerprint)
    args = training_arguments(config, batches.eval is not None, batches)
    trainer = ChattuneTrainer(
        model=model,
        args=args,
        train_dataset=batches.train,
        eval_dataset=batches.eval,
        data_collator=batches.collator,
        processing_class=tokenizer,
        compute_loss_func=loss,
        callbacks=[MetricsLogger(output_dir / METRICS_NAME), ManifestWriter(manifest, config)],
    )
    if loss.capture is not None:
        loss.capture.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
        eval_loss = None
        if batches.eval is not None:  # the Trainer evaluates after the last step; else evaluate now
            last = [entry["eval_loss"] for entry in trainer.state.log_history
                    if "eval_loss" in entry and entry.get("step") == trainer.state.global_step]
            eval_loss = last[-1] if last else trainer.evaluate()["eval_loss"]
    finally:
        if loss.capture is not None:
            loss.capture.remove()
        if restore_attention is not None:
            restore_attention()
    trainer.save_model(str(output_dir))
    write_run_files(output_dir, manifest, config, {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "trainable_parameters": trainable,
    })
    model.eval()
    return TrainResult(output_dir, trainer.state.global_step, result.training_loss, eval_loss, prepared, model)
