"""Train: config -> data -> base model + method -> transformers Trainer -> run folder.

transformers' Trainer does the loop, mixed precision, accumulation, clipping, checkpoint
rotation and exact resume (:mod:`chattune.training.trainer`); chattune adds a manifest in every
checkpoint and metrics.jsonl (:mod:`chattune.training.callbacks`), never overwrites checkpoints,
writes each one whole or not at all and resumes from the newest complete one
(:mod:`chattune.training.checkpoints`), stops a diverged run on its step without saving NaN weights,
ends a full disk with one line,
and trains fast: rows packed without cross-talk (:mod:`chattune.training.batching`, checked on the
model by :mod:`chattune.training.attention`), a chunked token-weighted loss (:mod:`chattune.training.loss`),
and on CPU faster LoRA kernels (:mod:`chattune.training.kernels`) and per-row SDPA.

Every patch of the model (kernels, attention, head capture) holds for the time of
training only: the model returned and the run folder are plain transformers / peft.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from chattune.config import RunConfig
from chattune.config_io import source_prefix
from chattune.data.pair_encode import (
    PreparedPreference,
    format_preference_audit,
    prepare_preference_data,
)
from chattune.data.prepare import PreparedData, data_fingerprint, format_audit, prepare_data
from chattune.data.pretrain import format_pretrain_audit, prepare_pretrain_data, streamed_data
from chattune.data.prompts import PreparedPrompts, format_prompt_audit, prepare_prompt_data
from chattune.data.stream import ConversationStream, format_stream_audit, streamed_sft_data
from chattune.errors import ConfigError
from chattune.manifest import build_manifest, read_manifest, write_run_files
from chattune.methods import (
    Method,
    count_parameters,
    get_method,
    quantization_config,
)
from chattune.model import (
    base_model_fingerprint,
    load_model,
    load_reward_base,
    resolve_dtype,
    tokenizer_hash,
)
from chattune.paths import check_output_dir
from chattune.templates.registry import resolve_template_name
from chattune.training.attention import use_varlen_sdpa, uses_varlen_attention
from chattune.training.batching import (
    PACKED_MODES,
    Batches,
    StreamedBlocks,
    StreamedRows,
    build_batches,
    format_batches,
    resolve_packing,
    stream_batching,
)
from chattune.training.callbacks import (
    CollapseWatch,
    EarlyStopping,
    ManifestWriter,
    MetricsLogger,
    ProgressWriter,
    StopOnSignal,
    StreamAudit,
)
from chattune.training.checkpoints import WRITE_ERRORS, storage_error
from chattune.training.collate import ImageCollator
from chattune.training.distributed import (
    World,
    gather_objects,
    init_distributed,
    main_first,
    main_only_log,
)
from chattune.training.grpo import GrpoObjective, PromptCollator, resolve_grpo_reference
from chattune.training.kernels import use_cpu_kernels
from chattune.training.loss import CausalLMLoss, resolve_loss
from chattune.training.memory_plan import check_sampling_memory
from chattune.training.preference import (
    PreferenceCollator,
    PreferenceObjective,
    frozen_copy,
    precompute_reference,
    resolve_reference,
)
from chattune.training.reward import RewardCollator, RewardObjective
from chattune.training.rewards import RewardSet, build_rewards
from chattune.training.sharding import check_sharding_supported, sharding_arguments
from chattune.training.start import (
    ADAPTER_METHODS,
    PEFT_METHODS,
    context_note,
    load_tokenizers,
    new_token_settings,
    start_from_run,
)
from chattune.training.trackers import TrackerRecords, check_trackers, tracker_env, tracker_names
from chattune.training.trainer import ChattuneTrainer, place_model, resume_path, training_arguments
from chattune.vision.methods import apply_vision_method
from chattune.vision.processor import load_vision, save_processor_files, vision_parts
from chattune.vocab.extend import EXTENSION_NAME
from chattune.vocab.resize import NewRows, add_rows

METRICS_NAME = "metrics.jsonl"
AUDIT_NAME = "data_audit.json"


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    global_step: int
    train_loss: float
    eval_loss: float | None
    prepared: PreparedData | PreparedPreference | PreparedPrompts
    model: object = None
    stopped: bool = False
    """Stopped on request (SIGTERM or Ctrl-C) with a checkpoint, before the last step: the run
    folder holds checkpoints, not a finished run."""


def load_for_training(config: RunConfig, method: Method, continued: Path | None = None,
                      new_rows: NewRows | None = None, vision: bool = False, reward_pad_id: int | None = None):
    """The base model as configured (dtype, quantization, attention, RoPE scaling; no KV cache;
    with ``reward_pad_id``, stage rm's reward model: the base with a new scalar head, its config's
    pad token that id, :func:`~chattune.model.load_reward_base`),
    with rows for ``new_rows`` (an extended tokenizer's tokens, :mod:`chattune.vocab.resize`), with the method
    applied (for a ``vision``-language model, as :func:`~chattune.vision.methods.apply_vision_method` does) (or, ``continued``, that run's adapter loaded to train further): the model to train,
    and what the resize did (None without new tokens)."""
    dtype = resolve_dtype(config.model.dtype, config.train.fp16, config.train.bf16)
    extra = {"quantization_config": quantization_config(config.method)} if method.quantized_base else {}
    if config.model.attn_implementation:
        extra["attn_implementation"] = config.model.attn_implementation
    if reward_pad_id is not None:
        model = load_reward_base(config.model, reward_pad_id, dtype, **extra)
    else:
        model = load_model(config.model, dtype, **extra)
    model.config.use_cache = False  # a KV cache is never needed in training (and would break packing)
    resized = add_rows(model, new_rows) if new_rows is not None else None
    if config.train.gradient_checkpointing:
        model.enable_input_require_grads()
    if continued is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(continued), is_trainable=True)
    else:
        settings = new_token_settings(config, method, new_rows)
        if vision:
            model = apply_vision_method(method, model, settings, vision_parts(model),
                                        config.train.gradient_checkpointing)
        else:
            model = method.apply(model, settings, config.train.gradient_checkpointing)
    if new_rows is not None and method.name in PEFT_METHODS:
        keep_embeddings_out(model)
    return model, resized


def keep_embeddings_out(model) -> None:
    """Save the adapter without a copy of the base's whole (resized) embedding matrices, which peft
    adds by default when a model was resized: what trained is in the adapter (the trainable tokens'
    rows, or the modules_to_save copies), and loading resizes the base to the run's rows first
    (:func:`chattune.vocab.resize.resize_like_run`)."""
    save = model.save_pretrained

    def save_pretrained(*args, **kwargs):
        kwargs.setdefault("save_embedding_layers", False)
        return save(*args, **kwargs)

    model.save_pretrained = save_pretrained


def image_batching(config: RunConfig, log=print) -> str:
    """The batching mode of data with images: rows are not packed (each row's image tokens
    must meet its own pixels), so ``auto`` becomes ``group_by_length`` (said in the log), and an
    explicit ``pack`` or ``padding_free`` is a ConfigError."""
    wanted = config.data.packing
    if wanted in ("pack", "padding_free"):
        raise ConfigError(f"{source_prefix(config, 'packing')}packing: {wanted} is not possible with rows that "
                          "carry images; use packing=auto, group_by_length or pad")
    if wanted == "auto":
        log("packing: not packing (rows carry images, each row's image tokens meet its own pixels); "
            "batching rows grouped by length instead")
        return "group_by_length"
    return wanted


def has_images(prepared) -> bool:
    """Whether encoded data keeps rows' images (an ``images`` column, in the train or eval set)."""
    return any("images" in (getattr(getattr(prepared, split, None), "column_names", None) or [])
               for split in ("train", "eval"))


def setup_batching_and_loss(config: RunConfig, model, prepared: PreparedData, pad_token_id: int,
                            patches: ExitStack, log=print, world_size: int = 1,
                            vision=None) -> tuple[Batches, CausalLMLoss]:
    """Put the model where it trains, switch on (in ``patches``) the CPU kernels and per-row
    SDPA where they apply, and settle, with probes on the model, how data is batched (planned
    for ``world_size`` processes) and the loss computed. Data with images (``vision``: the
    model's processor) is padded, not packed, and batched with its pixels."""
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
    images = vision is not None and has_images(prepared)
    if isinstance(prepared.train, StreamedRows):
        mode = stream_batching(config, log)
    elif images:
        mode = image_batching(config, log)
    else:
        mode = resolve_packing(config, model, pad_token_id, vocab_size, log)
    if mode not in PACKED_MODES:
        attention.close()  # back to transformers' SDPA
    batches = build_batches(mode, prepared, config, pad_token_id, uses_varlen_attention(model), world_size)
    if images:
        batches.collator = ImageCollator(pad_token_id, vision)
        batches.summary["images"] = True
    log(format_batches(batches))
    loss = resolve_loss(config, model, vocab_size, log)
    log(f"loss: {loss.mode}")
    return batches, loss


def patch_for_sequences(config: RunConfig, model, pad_token_id: int, patches: ExitStack, log=print) -> bool:
    """For a stage whose batches are several sequences (preference pairs, GRPO completions): the
    CPU kernels and per-row SDPA switched on (in ``patches``) where they apply, and whether the
    sequences are packed into one row (the probe finds the model keeps packed rows apart; else
    they are padded and transformers' SDPA is back)."""
    vocab_size = model.get_input_embeddings().weight.shape[0]
    eager_cpu = next(model.parameters()).device.type == "cpu" and not config.train.torch_compile
    if eager_cpu:
        patches.enter_context(use_cpu_kernels(model))
    attention = patches.enter_context(ExitStack())
    if eager_cpu:
        attention.enter_context(use_varlen_sdpa(model))
    packed = resolve_packing(config, model, pad_token_id, vocab_size, log) in PACKED_MODES
    if not packed:
        attention.close()
    return packed


def setup_preference(config: RunConfig, model, prepared: PreparedPreference, pad_token_id: int,
                     patches: ExitStack, reference: str | None, log=print) -> tuple[Batches, PreferenceObjective]:
    """As :func:`setup_batching_and_loss` for a preference stage: the model placed, CPU kernels
    and per-row SDPA where they apply, each batch's sequences packed into one row where the model
    keeps packed rows apart (else padded), the answer log-probabilities chunked where exact, and
    the objective with its reference."""
    place_model(model, get_method(config.method.method))
    ref_model = frozen_copy(model) if reference == "copy" else None  # placed, not yet patched: a plain copy
    packed = patch_for_sequences(config, model, pad_token_id, patches, log)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    collator = PreferenceCollator(pad_token_id, packed)
    chunked = resolve_loss(config, model, vocab_size, log)
    objective = PreferenceObjective(config.preference, reference, chunked.capture, config.train.loss_chunk_size,
                                    ref_model)
    mode = "pairs packed" if packed else "pairs padded"
    log(f"batching: {mode} ({'each batch one row' if packed else 'padded to the longest'}); "
        f"log-probabilities: {chunked.mode}; reference: {reference or 'none (' + config.preference.stage + ')'}")
    batches = Batches(mode, prepared.train, prepared.eval, collator, config.train.per_device_train_batch_size,
                      config.train.per_device_eval_batch_size, {"mode": mode})
    return batches, objective


def setup_grpo(config: RunConfig, model, prepared: PreparedPrompts, tokenizer, template_name: str,
               rewards: RewardSet, patches: ExitStack, reference: str | None, log=print
               ) -> tuple[Batches, GrpoObjective]:
    """As :func:`setup_preference` for stage grpo: the model placed, CPU kernels and per-row SDPA
    where they apply, each batch's completions packed into one row where the model keeps packed
    rows apart (else padded), log-probabilities chunked where exact, the reference, and the
    objective that samples with chattune's decoder on the model being trained."""
    from chattune.inference.runs import in_memory_run

    place_model(model, get_method(config.method.method))
    check_sampling_memory(config, model.config, next(model.parameters()).device, log)
    ref_model = frozen_copy(model) if reference == "copy" else None
    packed = patch_for_sequences(config, model, tokenizer.pad_token_id, patches, log)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    chunked = resolve_loss(config, model, vocab_size, log)
    rl = config.rl
    objective = GrpoObjective(rl, rewards, reference, chunked.capture, packed=packed,
                              pad_token_id=tokenizer.pad_token_id, seed=config.train.seed,
                              run_factory=lambda: in_memory_run(model, tokenizer, template_name),
                              chunk_size=config.train.loss_chunk_size, ref_model=ref_model)
    size = config.train.per_device_train_batch_size
    log(f"grpo: {size} prompts x {rl.num_generations} completions of at most {rl.max_completion_length} tokens "
        f"per step, sampled by chattune's decoder (temperature {rl.grpo_temperature:g}, top_p {rl.grpo_top_p:g}); "
        f"rewards {', '.join(rewards.names)}; loss {rl.grpo_loss}, beta {rl.grpo_beta:g}; "
        f"reference: {reference or 'none (grpo_beta=0)'}; completions {'packed' if packed else 'padded'}, "
        f"log-probabilities: {chunked.mode}")
    batches = Batches("prompts", prepared.train, prepared.eval, PromptCollator(), size,
                      config.train.per_device_eval_batch_size,
                      {"mode": "prompts", "num_generations": rl.num_generations,
                       "completions": "packed" if packed else "padded"})
    return batches, objective


def load_reward_scorer(path: str):
    """A reward model run folder (stage rm) as a scorer of conversations."""
    from chattune.inference.reward import load_reward_model

    return load_reward_model(path)


def setup_reward(config: RunConfig, model, prepared: PreparedPreference, pad_token_id: int,
                 patches: ExitStack, log=print) -> tuple[Batches, RewardObjective]:
    """As :func:`setup_preference` for stage rm: the model placed, the CPU kernels where they
    apply, each batch's sequences padded (the reward is read at each one's last real token), and
    the Bradley-Terry objective."""
    place_model(model, get_method(config.method.method))
    if next(model.parameters()).device.type == "cpu" and not config.train.torch_compile:
        patches.enter_context(use_cpu_kernels(model))
    mode = "pairs padded"
    log(f"batching: {mode} (padded to the longest; the reward at each sequence's last token); "
        f"loss: Bradley-Terry{f' + {config.preference.rm_center_coef:g} x centring' if config.preference.rm_center_coef else ''}")
    batches = Batches(mode, prepared.train, prepared.eval, RewardCollator(pad_token_id),
                      config.train.per_device_train_batch_size, config.train.per_device_eval_batch_size, {"mode": mode})
    return batches, RewardObjective(config.preference)


def check_reward_stage(config: RunConfig, method: Method, continued: Path | None, new_rows) -> None:
    """What stage rm cannot do yet, refused (ConfigError naming the key) before the model loads:
    P-Tuning v2 (a prefix, no head), new tokens, and continuing a LoRA run's adapter (a causal
    LM's; start from a full fine-tune's folder or a merged export instead)."""
    where = source_prefix(config, "stage")
    if method.name == "ptuning":
        raise ConfigError(f"{where}stage: rm trains a reward head, which method=ptuning (a prefix) has none of; "
                          "use method=lora, freeze or full")
    if new_rows is not None:
        raise ConfigError(f"{source_prefix(config, 'tokenizer_name_or_path')}tokenizer_name_or_path: new tokens are "
                          "not supported with stage rm yet")
    if continued is not None:
        raise ConfigError(f"{source_prefix(config, 'model_name_or_path')}model_name_or_path: {continued} is a LoRA "
                          "run, and a reward model cannot train a causal LM's adapter further; merge it first "
                          f"(chattune export {continued} --out merged, then model_name_or_path=merged)")


def stage_record(config: RunConfig, reference: str | None, started_from: Path | None) -> dict:
    """What a pre-training or preference run's manifest says of its stage: the stage, its
    settings, the reference used."""
    p = config.preference
    if p.stage == "pretrain":
        d = config.data
        record = {"name": "pretrain", "text_field": d.text_field, "text_documents": d.text_documents,
                  "streaming": d.streaming}
        return {**record, "started_from": str(started_from)} if started_from is not None else record
    if p.stage == "grpo":
        rl = config.rl
        record = {"name": "grpo", **dataclasses.asdict(rl), "reference": reference}
        return {**record, "started_from": str(started_from)} if started_from is not None else record
    if p.stage == "rm":  # the seed drew the new head (an untrained head is what eval compares with)
        return {"name": "rm", "rm_center_coef": p.rm_center_coef, "reference": None, "head": "score",
                "seed": config.train.seed}
    keys = {"dpo": ("pref_beta", "pref_loss", "pref_label_smoothing", "pref_ftx"),
            "orpo": ("pref_beta",),
            "simpo": ("pref_beta", "simpo_gamma", "pref_label_smoothing", "pref_ftx"),
            "kto": ("pref_beta", "kto_desirable_weight", "kto_undesirable_weight")}[p.stage]
    record = {"name": p.stage, **{key: getattr(p, key) for key in keys}, "reference": reference}
    if started_from is not None:
        record["started_from"] = str(started_from)
    return record


def early_stopping(config: RunConfig, log=print) -> list:
    """The early-stopping callback the config asks for (none without ``early_stopping_patience``)."""
    t = config.train
    if t.early_stopping_patience is None:
        return []
    return [EarlyStopping(t.early_stopping_metric, t.early_stopping_patience, t.early_stopping_threshold, log)]


def model_notes(config: RunConfig, model_config) -> list[str]:
    """What the log says of the context and the activations: the context RoPE scaling extended
    (or a max_seq_length beyond the model's, :func:`~chattune.training.start.context_note`), and
    activations offloaded on a machine without a GPU, where they are in CPU memory already."""
    notes = [note for note in [context_note(config, model_config)] if note]
    if config.train.offload_activations and not torch.cuda.is_available():
        notes.append("offload_activations: no GPU here; the activations are in CPU memory already (nothing moves)")
    return notes


def check_machine(config: RunConfig) -> None:
    """Refuse, naming the key and where it was set, what this machine cannot honour:
    fp16 without CUDA (float16 mixed precision on a CPU runs about 12x slower than float32),
    FSDP or DeepSpeed without CUDA, and an output_dir that cannot be a writable folder (an
    existing file, a path under a file, ``/proc/x``), before any model loads."""
    if config.train.fp16 and not torch.cuda.is_available():
        raise ConfigError(f"{source_prefix(config, 'fp16')}fp16: float16 mixed precision needs a CUDA GPU; on "
                          "this CPU it would run about 12x slower than float32. Set fp16=false (or bf16=true)")
    check_sharding_supported(config)
    check_trackers(config, source_prefix(config, "report_to"))
    check_output_dir(config.train.output_dir, f"{source_prefix(config, 'output_dir')}output_dir")


def generation_eval(config: RunConfig, prepared, tokenizer, template: str, log=print):
    """With ``eval_generate``: a function model -> generation metrics on a fixed sample of the
    eval set (None without it, or without eval rows)."""
    if not config.train.eval_generate:
        return None
    if prepared.eval is None or len(prepared.eval) == 0:
        log("eval_generate: no eval rows (set eval_files or eval_fraction); generation is not scored")
        return None
    from chattune.evaluation.evaluate import generation_metrics, sample_rows

    samples = sample_rows(prepared.eval, config.train.eval_generate_samples, config.train.seed)
    if has_images(prepared):
        log("eval_generate: rows with images are left out of the generation sample (it scores text rows)")
    max_new_tokens = config.train.eval_generate_max_new_tokens or config.generate.max_new_tokens
    return lambda model: generation_metrics(model, tokenizer, template, samples, max_new_tokens=max_new_tokens,
                                            batch_size=config.train.per_device_eval_batch_size)


def train(config: RunConfig, *, log=print) -> TrainResult:
    """Run one training job described by ``config``; return where its run folder is.

    Raises ConfigError / DataError / ModelLoadError for bad input, and TrainingError when the
    run diverges or its folder cannot be written (disk full, read-only); a checkpoint saved
    before either stays as it was."""
    if not config.model.model_name_or_path:
        raise ConfigError("model_name_or_path: no base model given")
    method = get_method(config.method.method)
    method.check_supported(config.train.optim)
    check_machine(config)
    output_dir = Path(config.train.output_dir)
    try:
        return _train(config, method, output_dir, log)
    except WRITE_ERRORS as exc:
        error = storage_error(exc, output_dir)
        if error is None:
            raise
        raise error from exc


def vocabulary_record(config: RunConfig, tokenizer, method: Method, resized: dict | None,
                      continued: Path | None) -> dict | None:
    """What the manifest says of a run trained with another tokenizer than its base's: where it
    came from, its hash, the rows the model has and how the new ones were made and trained."""
    path = config.model.tokenizer_name_or_path
    if not path:
        return None
    record = {"tokenizer": str(Path(path).resolve()) if Path(path).exists() else path,
              "tokenizer_sha256": tokenizer_hash(tokenizer), "tokens": len(tokenizer)}
    if resized:
        trained = ("full" if method.name == "full" else
                   "rows" if config.method.new_tokens_train == "rows" else "embeddings")
        record.update({**resized, "trained": trained})
    elif continued is not None:
        previous = read_manifest(continued).vocabulary
        record.update({k: v for k, v in previous.items() if k not in record})
    return record


def vision_record(vision, args) -> dict:
    """The manifest's record of a vision-language run: model type, image token, what trained."""
    return {"model_type": vision.model_type, "image_token": vision.placeholder,
            "projector": "trained" if args.train_projector else "frozen",
            "vision_tower": "trained" if args.train_vision_tower else "frozen"}


def prepare_pretrain(config: RunConfig, tokenizer, world: World, log=print) -> PreparedData:
    """A pre-training run's rows: encoded and cached by one process (as :func:`prepare_once`),
    or, with ``streaming``, read lazily while training (eval_files encoded up front)."""
    if config.data.streaming:
        capacity = config.data.pack_length or config.data.max_seq_length
        prepared = streamed_data(config.data, tokenizer, StreamedBlocks(config.data, tokenizer, capacity))
    else:
        with main_first(world):
            prepared = prepare_pretrain_data(config.data, tokenizer, config.train.seed, log=log)
    log(format_pretrain_audit(prepared.audit))
    return prepared


def prepare_sft(config: RunConfig, tokenizer, template_name: str, world: World, log=print,
                vision=None) -> PreparedData:
    """An SFT run's rows: encoded and cached by one process (:func:`prepare_once`), or, with
    ``streaming``, read, converted and encoded while training (:class:`StreamedRows`; eval_files
    encoded up front). Raises ConfigError for streaming with a vision-language model (rows with
    images are not streamed)."""
    if not config.data.streaming:
        prepared = prepare_once(config, tokenizer, template_name, world, log, vision)
        log(format_audit(prepared.audit))
        return prepared
    if vision is not None:
        raise ConfigError(f"{source_prefix(config, 'streaming')}streaming: rows with images are not streamed, and "
                          f"{config.model.model_name_or_path} is a vision-language model; set streaming=false")
    rows = StreamedRows(ConversationStream(config.data, tokenizer, template_name))
    prepared = streamed_sft_data(config.data, tokenizer, template_name, config.train.seed, rows, log)
    log(format_stream_audit(prepared.audit))
    return prepared


def stream_counts(prepared) -> ConversationStream | None:
    """The stream whose counts a streamed SFT run's audit reports (None for any other data)."""
    return prepared.train.stream if isinstance(prepared.train, StreamedRows) else None


def stream_summary(audit: dict) -> str:
    """One line on what a streamed run read, for the log at its end."""
    stream, files = audit["stream"], audit["files"]
    skipped, duplicated = sum(f["skipped"] for f in files), sum(f["duplicated"] for f in files)
    return (f"data: streamed {stream['rows_read']:,} rows read, {skipped:,} skipped, {duplicated:,} duplicated, "
            f"{audit['train']['rows_dropped']:,} dropped at encoding, {stream['rows_kept']:,} kept for training "
            f"({stream['passes']} passes read to the end); counts in {AUDIT_NAME}")


def prepare_once(config: RunConfig, tokenizer, template_name: str, world: World, log=print,
                 vision=None) -> PreparedData:
    """The encoded data, encoded by one process: rank 0 encodes (or finds the cache), the
    others wait and then read the Arrow cache it wrote (:func:`chattune.training.distributed.main_first`)."""
    with main_first(world):
        prepared = prepare_data(config.data, tokenizer, template_name, config.train.seed, vision=vision)
    if world.distributed:
        encoded = [rank for rank, reused in enumerate(gather_objects(prepared.reused, world)) if not reused]
        readers = world.world_size - len(encoded)
        log(f"data: encoded by rank {encoded[0]}, read from the cache by {readers} processes" if encoded
            else f"data: all {world.world_size} processes read the cache ({prepared.cache_path})")
        if len(encoded) > 1:
            log(f"data: warning: ranks {encoded} each encoded the data (the cache folder is not shared "
                "between machines; set cache_dir to a shared folder)")
    return prepared


def _train(config: RunConfig, method: Method, output_dir: Path, log) -> TrainResult:
    world = init_distributed(config.train.ddp_timeout)
    log = main_only_log(world, log)
    with main_first(world):  # rank 0 alone sets incomplete checkpoints aside
        resume = resume_path(config, output_dir, log)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.train.seed)
    config, continued = start_from_run(config, log)
    stage = config.preference.stage

    tokenizer, base_tokenizer, new_rows = load_tokenizers(config)
    vision = load_vision(config.model.model_name_or_path, config.model.trust_remote_code)
    if vision is not None and (new_rows is not None or stage != "sft"):
        raise ConfigError(f"model_name_or_path: {config.model.model_name_or_path} is a vision-language model; "
                          + ("tokenizer_name_or_path (new tokens) is" if new_rows is not None
                             else f"stage {stage} is") + " not supported with one yet (stage sft is)")
    template_name = resolve_template_name(config.data.template, tokenizer)
    if stage == "pretrain":
        prepared = prepare_pretrain(config, tokenizer, world, log)
        fingerprint = prepared.fingerprint
    elif stage == "sft":
        prepared = prepare_sft(config, tokenizer, template_name, world, log, vision)
        fingerprint = prepared.fingerprint
    elif stage == "grpo":
        prepared = prepare_prompt_data(config.data, tokenizer, template_name, config.rl.max_completion_length,
                                       config.train.seed, log)
        fingerprint = prepared.fingerprint
        log(format_prompt_audit(prepared.audit))
        rewards = RewardSet(build_rewards(config.rl, load_reward_scorer), config.rl.reward_weights)
    else:
        prepared = prepare_preference_data(config.data, tokenizer, template_name, stage, config.train.seed)
        fingerprint = f"{stage}-{data_fingerprint(config.data, template_name, tokenizer, config.train.seed)}"
        prepared.audit["fingerprint"] = prepared.fingerprint = fingerprint
        log(format_preference_audit(prepared.audit))

    # whole on every process, also under FSDP and ZeRO-3: the probes below run on the real weights,
    # and the Trainer shards them when it wraps the model (so the model must fit one device once)
    if stage == "rm":
        check_reward_stage(config, method, continued, new_rows)
    model, resized = load_for_training(config, method, continued, new_rows, vision is not None,
                                       tokenizer.pad_token_id if stage == "rm" else None)
    for note in model_notes(config, model.config):
        log(note)
    vocabulary = vocabulary_record(config, tokenizer, method, resized, continued)
    record = Path(config.model.tokenizer_name_or_path or "") / EXTENSION_NAME
    if vocabulary and record.is_file() and world.is_main:  # the run loads its new rows as they started
        shutil.copyfile(record, output_dir / EXTENSION_NAME)
    if resized:
        log(f"vocabulary: {resized['new_tokens']:,} new tokens from {config.model.tokenizer_name_or_path}: "
            f"{resized['base_rows']:,} -> {resized['rows']:,} embedding rows, each new row the mean of its "
            f"base pieces' rows; trained: {vocabulary['trained']}")
    trainable, total = count_parameters(model)
    log(f"method {method.name}: {trainable:,} trainable of {total:,} parameters ({trainable / total:.3%})")
    reference = None
    if stage == "grpo":
        reference = resolve_grpo_reference(config.rl, config.preference.pref_reference,
                                           method.name in ADAPTER_METHODS, continued is not None,
                                           config.method.lora_init)
    elif stage not in ("sft", "pretrain", "rm"):
        reference = resolve_reference(config.preference, method.name in ADAPTER_METHODS, continued is not None,
                                      config.method.lora_init)

    with ExitStack() as patches:  # undone when training ends, also on an error
        objective = None
        if stage in ("sft", "pretrain"):
            batches, loss = setup_batching_and_loss(config, model, prepared, tokenizer.pad_token_id, patches, log,
                                                    world.world_size, vision)
            loss_mode = loss.mode
        elif stage == "grpo":
            batches, objective = setup_grpo(config, model, prepared, tokenizer, template_name, rewards, patches,
                                            reference, log)
            loss, loss_mode = None, "grpo"
        elif stage == "rm":
            batches, objective = setup_reward(config, model, prepared, tokenizer.pad_token_id, patches, log)
            loss, loss_mode = None, "reward (Bradley-Terry)"
        else:
            batches, objective = setup_preference(config, model, prepared, tokenizer.pad_token_id, patches,
                                                  reference, log)
            loss, loss_mode = None, "preference"
        audit = {**prepared.audit, "batching": {**batches.summary, "loss": loss_mode}}
        if stage == "pretrain" and "train" in batches.summary:  # the blocks rows were packed into
            for split in ("train", "eval"):
                plan = batches.summary.get(split)
                if plan and audit.get(split):
                    audit[split] = {**audit[split], "blocks": plan["bins"], "block_length": plan["bin_length"],
                                    "padding_share": round(1 - plan["fill"], 4)}
        if world.is_main:
            (output_dir / AUDIT_NAME).write_text(json.dumps(audit, indent=2, ensure_ascii=False))
        base = base_model_fingerprint(config.model.model_name_or_path, config.model.trust_remote_code,
                                      base_tokenizer)
        manifest = build_manifest(config, base, template_name, tokenizer, fingerprint,
                                  stage_record(config, reference, continued) if stage != "sft" else None,
                                  vocabulary, vision_record(vision, config.method) if vision is not None else None)
        vocab_size = model.get_input_embeddings().weight.shape[0]
        patches.enter_context(loss.capturing() if loss is not None else objective.capturing())
        if reference == "precompute":
            size = config.train.per_device_eval_batch_size
            batches.train = precompute_reference(objective, model, batches.train, batches.collator, size, log)
            if batches.eval is not None:
                batches.eval = precompute_reference(objective, model, batches.eval, batches.collator, size, log)
        args = training_arguments(config, batches.eval is not None, batches, sharding_arguments(config, model))
        if stage == "grpo":  # the batches hold prompts, not input ids: the objective logs what it samples
            args.include_num_input_tokens_seen = "no"
        stopper = StopOnSignal(log)
        metrics_logger = MetricsLogger(output_dir / METRICS_NAME)
        trackers = tracker_names(config)  # checked by check_machine
        stream = stream_counts(prepared)
        audits = [StreamAudit(output_dir / AUDIT_NAME, audit, stream.audit)] if stream is not None else []
        patches.enter_context(tracker_env(config))
        records = [TrackerRecords(trackers, config.to_flat_dict(), manifest.to_json())] if trackers else []
        trainer = ChattuneTrainer(
            model=model, args=args,
            train_dataset=batches.train, eval_dataset=batches.eval, data_collator=batches.collator,
            processing_class=tokenizer, compute_loss_func=loss, log=log, objective=objective,
            generation_eval=generation_eval(config, prepared, tokenizer, template_name, log) if stage == "sft" else None,
            train_sampler=batches.train_sampler(config.train.seed),
            loraplus_lr_ratio=config.train.loraplus_lr_ratio, offload_activations=config.train.offload_activations,
            callbacks=[metrics_logger, ManifestWriter(manifest, config), *records,
                       CollapseWatch(vocab_size, config.train.learning_rate, log=log),
                       *early_stopping(config, log), ProgressWriter(output_dir), *audits, stopper],
        )
        if stage == "grpo":  # the completions' seeds follow the step (a resumed run samples the same)
            objective.step = lambda: trainer.state.global_step
        # metrics.jsonl's logger first: the trackers' callbacks then get the event with its tokens/s
        trainer.callback_handler.callbacks.remove(metrics_logger)
        trainer.callback_handler.callbacks.insert(0, metrics_logger)
        if not world.distributed:
            patches.callback(stopper.install().restore)
        result = trainer.train(resume_from_checkpoint=resume)
        if audits:
            log(stream_summary(audits[0].current()))
        if stopper.stopped_at is not None:  # checkpointed and stopped on request: not a finished run
            model.eval()
            return TrainResult(output_dir, trainer.state.global_step, result.training_loss, None, prepared, model,
                               stopped=True)
        eval_loss = trainer.final_eval_loss()
    def write_files(folder):
        write_run_files(folder, manifest, config, {
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "eval_loss": eval_loss,
            "trainable_parameters": trainable,
        })
        if vision is not None:  # the run folder loads as the base does: with its processor
            save_processor_files(vision.processor, folder)

    trainer.save_final(output_dir, write_files)
    model.eval()
    return TrainResult(output_dir, trainer.state.global_step, result.training_loss, eval_loss, prepared, model)
