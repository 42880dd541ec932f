"""Train: config -> data -> base model + method -> transformers Trainer -> run folder.

transformers' Trainer does the loop, mixed precision, accumulation, clipping, checkpoint
rotation and exact resume (:mod:`chattune.trainer`); chattune adds a manifest in every
checkpoint and metrics.jsonl (:mod:`chattune.callbacks`), never overwrites checkpoints,
and trains fast: rows packed without cross-talk (:mod:`chattune.batching`, checked on the
model by :mod:`chattune.attention`), a chunked token-weighted loss (:mod:`chattune.loss`),
and on CPU faster LoRA kernels (:mod:`chattune.kernels`) and per-row SDPA.

Every patch of the model (kernels, attention, head capture) holds for the time of
training only: the model returned and the run folder are plain transformers / peft.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed

from chattune.attention import use_varlen_sdpa, uses_varlen_attention
from chattune.batching import PACKED_MODES, Batches, build_batches, format_batches, resolve_packing
from chattune.callbacks import ManifestWriter, MetricsLogger
from chattune.config import RunConfig
from chattune.data.prepare import PreparedData, format_audit, prepare_data
from chattune.data.templates import resolve_template_name
from chattune.errors import ConfigError
from chattune.kernels import use_cpu_kernels
from chattune.loss import CausalLMLoss, resolve_loss
from chattune.manifest import build_manifest, write_run_files
from chattune.methods import Method, count_parameters, get_method, quantization_config
from chattune.model import base_model_fingerprint, load_model, load_tokenizer, resolve_dtype
from chattune.trainer import ChattuneTrainer, place_model, resume_path, training_arguments

METRICS_NAME = "metrics.jsonl"
AUDIT_NAME = "data_audit.json"


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    global_step: int
    train_loss: float
    eval_loss: float | None
    prepared: PreparedData
    model: object = None


def load_for_training(config: RunConfig, method: Method):
    """The base model as configured (dtype, quantization, attention; no KV cache), with the
    method applied: the model to train."""
    dtype = resolve_dtype(config.model.dtype, config.train.fp16, config.train.bf16)
    extra = {"quantization_config": quantization_config(config.method)} if method.quantized_base else {}
    if config.model.attn_implementation:
        extra["attn_implementation"] = config.model.attn_implementation
    model = load_model(config.model, dtype, **extra)
    model.config.use_cache = False  # a KV cache is never needed in training (and would break packing)
    if config.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return method.apply(model, config.method, config.train.gradient_checkpointing)


def speed_setup(config: RunConfig, model, prepared: PreparedData, pad_token_id: int, patches: ExitStack,
                log=print) -> tuple[Batches, CausalLMLoss]:
    """Put the model where it trains, switch on (in ``patches``) the CPU kernels and per-row
    SDPA where they apply, and settle, with probes on the model, how data is batched and
    the loss computed."""
    place_model(model, get_method(config.method.method))
    vocab_size = model.get_input_embeddings().weight.shape[0]
    eager_cpu = next(model.parameters()).device.type == "cpu" and not config.train.torch_compile
    if eager_cpu:  # (torch.compile fuses on its own and keeps transformers' masked SDPA)
        patches.enter_context(use_cpu_kernels(model))
    # packed rows attend within their own span, not over the whole bin (the probe checks it);
    # on CUDA, attn_implementation=flash_attention_2 gives the varlen path
    attention = patches.enter_context(ExitStack())  # closed early when rows are not packed
    if eager_cpu:
        attention.enter_context(use_varlen_sdpa(model))
    mode = resolve_packing(config, model, pad_token_id, vocab_size, log)
    if mode not in PACKED_MODES:
        attention.close()  # back to transformers' SDPA
    batches = build_batches(mode, prepared, config, pad_token_id, uses_varlen_attention(model))
    log(format_batches(batches))
    loss = resolve_loss(config, model, vocab_size, log)
    log(f"loss: {loss.mode}")
    return batches, loss


def train(config: RunConfig, *, log=print) -> TrainResult:
    """Run one training job described by ``config``; return where its run folder is."""
    if not config.model.model_name_or_path:
        raise ConfigError("model_name_or_path: no base model given")
    method = get_method(config.method.method)
    method.check_supported(config.train.optim)
    output_dir = Path(config.train.output_dir)
    resume = resume_path(config, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.train.seed)

    tokenizer = load_tokenizer(config.model.model_name_or_path, config.model.trust_remote_code)
    template_name = resolve_template_name(config.data.template, tokenizer)
    prepared = prepare_data(config.data, tokenizer, template_name, config.train.seed)
    log(format_audit(prepared.audit))

    model = load_for_training(config, method)
    trainable, total = count_parameters(model)
    log(f"method {method.name}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.3%})")

    with ExitStack() as patches:  # undone when training ends, also on an error
        batches, loss = speed_setup(config, model, prepared, tokenizer.pad_token_id, patches, log)
        audit = {**prepared.audit, "batching": {**batches.summary, "loss": loss.mode}}
        (output_dir / AUDIT_NAME).write_text(json.dumps(audit, indent=2, ensure_ascii=False))
        base = base_model_fingerprint(config.model.model_name_or_path, config.model.trust_remote_code, tokenizer)
        manifest = build_manifest(config, base, template_name, tokenizer, prepared.fingerprint)
        trainer = ChattuneTrainer(
            model=model, args=training_arguments(config, batches.eval is not None, batches),
            train_dataset=batches.train, eval_dataset=batches.eval, data_collator=batches.collator,
            processing_class=tokenizer, compute_loss_func=loss,
            callbacks=[MetricsLogger(output_dir / METRICS_NAME), ManifestWriter(manifest, config)],
        )
        patches.enter_context(loss.capturing())
        result = trainer.train(resume_from_checkpoint=resume)
        eval_loss = trainer.final_eval_loss()
    trainer.save_model(str(output_dir))
    write_run_files(output_dir, manifest, config, {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "trainable_parameters": trainable,
    })
    model.eval()
    return TrainResult(output_dir, trainer.state.global_step, result.training_loss, eval_loss, prepared, model)
