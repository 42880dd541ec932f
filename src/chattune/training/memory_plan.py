"""``chattune train --dry-run``: parameters and a memory estimate before anything is loaded.

The model is built on PyTorch's meta device from its config alone (no weights
read), the method is applied, and memory is estimated for weights, gradients,
optimizer state and activations at the configured batch and sequence length.

Activations per token and per block were fitted to what autograd actually saves
(measured by ``tests/training/test_memory_plan.py``, Llama and GLM-4 blocks with SDPA, fit error under 1%):
see :func:`activation_bytes`. Gradient checkpointing keeps one ``h`` per token per
block plus one block's worth; offloading (``offload_activations``) moves all but one block's
worth to CPU memory. The sequence length planned for is ``max_seq_length``, also where RoPE
scaling (``rope_scaling``) extends the model's context to allow it (said in the plan).

On N devices (``--dry-run --nproc N``) :func:`device_plans` splits the same plan per device
for DDP, FSDP full_shard, DeepSpeed ZeRO-2 and ZeRO-3 (formulas in its docstring).

A preference stage (``stage=dpo|orpo|simpo|kto``) puts two sequences of up to
``max_seq_length`` tokens through the model per row (a pair's chosen and rejected answers; a
KTO answer and its mismatched KL answer), so a step's activations are twice an SFT step's. A
dpo or kto stage also has a reference model (:func:`reference_plan`): ``adapter_off`` and
``precompute`` hold nothing more, ``copy`` holds a second copy of the model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chattune.config import RunConfig
from chattune.errors import ChattuneError, ConfigError
from chattune.lora_init import mutates_base
from chattune.methods import Method, block_list, count_parameters, get_method
from chattune.model import apply_rope_scaling, load_error, native_config, resolve_dtype, text_config
from chattune.training.grpo import resolve_grpo_reference
from chattune.training.preference import resolve_reference
from chattune.training.start import (
    ADAPTER_METHODS,
    context_note,
    load_tokenizers,
    new_token_settings,
    start_from_run,
)
from chattune.vision.methods import apply_vision_method
from chattune.vision.processor import is_vision_config, vision_parts

GIB = 1024 ** 3


@dataclass
class ShardSizes:
    """What splitting a run over several devices needs from the meta model, beyond the
    one-device plan (bytes unless said otherwise)."""

    frozen_weights: float
    """Frozen parameters as the one-device plan holds them (the rest of its weights train)."""
    trained_bytes: int
    """Bytes of each trainable parameter, its gradient and each optimizer state on one device."""
    half: bool
    """fp16 or bf16 training (the precision FSDP and DeepSpeed re-arrange, see device_plans)."""
    states: int
    """Optimizer states per trainable parameter: AdamW 2, Adafactor 1, SGD 0."""
    eight_bit: bool
    """An 8-bit optimizer: one byte per state."""
    block: float
    """The largest transformer block, in the dtype it is gathered in (fp16/bf16 when training
    in half precision, else the load dtype; quantized layers as stored)."""
    outside: float
    """Every parameter outside the blocks (embeddings, final norm, head, a prefix encoder),
    gathered like ``block``: FSDP's root unit."""
    largest_outside: float
    """The largest single module outside the blocks (the embedding or the head)."""


REFERENCE_OPTIONS = ("adapter_off", "precompute", "copy")
"""The reference models of a dpo or kto stage (``pref_reference``), in the order the plan lists them."""
SEQUENCES_PER_ROW = {"pretrain": 1, "sft": 1, "dpo": 2, "orpo": 2, "simpo": 2, "kto": 2, "rm": 2}
"""Sequences one row puts through the model: a pair's chosen and rejected answers, or a KTO
answer and its KL answer (each up to ``max_seq_length`` tokens)."""


@dataclass
class ReferencePlan:
    """The reference model options of a dpo or kto stage and the one the run uses."""

    extra: dict[str, float | None]
    """Bytes each option adds, by name (:data:`REFERENCE_OPTIONS`); None where it is not
    possible (``adapter_off`` without a new adapter to switch off)."""
    used: str
    """The option the run uses (``pref_reference``, ``auto`` resolved as the run resolves it)."""
    not_possible: str = ""
    """Why ``adapter_off`` is not possible, where it is not."""

    @property
    def used_bytes(self) -> float:
        """Bytes the option the run uses adds."""
        return self.extra[self.used] or 0.0


@dataclass
class MemoryPlan:
    """What a training run will hold in memory (bytes)."""

    method: str
    trainable: int
    total: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    tokens_per_step: int
    sizes: ShardSizes | None = None
    """What :func:`device_plans` needs from the model (filled by :func:`estimate`)."""
    stage: str = "sft"
    sequences_per_row: int = 1
    """Sequences one row puts through the model (2 for a preference stage)."""
    reference: ReferencePlan | None = None
    """A dpo or kto stage's reference options; None for sft, orpo and simpo."""
    started_from: str | None = None
    """The run folder whose LoRA adapter trains further, when the run starts from one."""
    offloaded: float = 0.0
    """Activations kept in CPU memory instead (``offload_activations``; not in the total)."""
    context: str | None = None
    """What max_seq_length means for the model's context, where it says something
    (:func:`chattune.training.start.context_note`): extended by RoPE scaling, or beyond the model's."""
    generation: float = 0.0
    """stage grpo: the KV cache of a step's completions, sampled before the forward pass (the larger
    of it and the activations is held at once; the total counts the larger)."""

    @property
    def reference_bytes(self) -> float:
        """What the reference model the run uses adds (a frozen copy; else 0)."""
        return self.reference.used_bytes if self.reference else 0.0

    @property
    def total_bytes(self) -> float:
        """Weights + gradients + optimizer state + activations (or a grpo step's KV cache, when
        larger: the completions are sampled before the forward pass) + the reference the run uses."""
        return (self.weights + self.gradients + self.optimizer + max(self.activations, self.generation)
                + self.reference_bytes)


def _dims(model_config) -> tuple[int, int, int, int]:
    """(hidden, mlp width, blocks, vocab), also for ChatGLM remote-code configs (a
    vision-language model's: its language model's)."""
    c = text_config(model_config)
    hidden = getattr(c, "hidden_size", None) or c.d_model
    inner = getattr(c, "intermediate_size", None) or getattr(c, "ffn_hidden_size", None) or 4 * hidden
    layers = getattr(c, "num_hidden_layers", None) or c.num_layers
    vocab = getattr(c, "vocab_size", None) or c.padded_vocab_size
    return hidden, inner, layers, vocab


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def meta_model(config: RunConfig):
    """The configured model with the method applied, on the meta device (no weights read), with
    the rows of an extended tokenizer's new tokens and the settings that train them, and its
    config (RoPE scaled by ``rope_scaling``).

    Raises ConfigError without a model and ModelLoadError when its config cannot be read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path = config.model.model_name_or_path
    if not path:
        raise ConfigError("model_name_or_path: no base model given; set it to a model folder")
    try:
        model_config = native_config(path) or AutoConfig.from_pretrained(
            path, trust_remote_code=config.model.trust_remote_code)
    except ChattuneError:
        raise
    except Exception as exc:  # from_pretrained raises OSError, ValueError, ...
        raise load_error(path, exc, "config") from exc
    apply_rope_scaling(model_config, config.model.rope_scaling)
    new_rows = load_tokenizers(config)[2] if config.model.tokenizer_name_or_path else None
    vision = is_vision_config(model_config)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
        if new_rows is not None and max(new_rows.ids) >= model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(max(new_rows.ids) + 1, mean_resizing=False)
    method = get_method(config.method.method)
    settings = new_token_settings(config, method, new_rows)
    if vision:
        return apply_vision_method(method, model, settings, vision_parts(model), False), model_config
    return (method.plan_apply or method.apply)(model, settings, False), model_config


def activation_bytes(model, model_config, tokens: int, element_bytes: int, method: Method,
                     checkpointing: bool, offload: bool = False) -> tuple[float, float]:
    """Estimated bytes autograd keeps for the backward pass of one step: on the device, and in
    CPU memory with ``offload`` (``offload_activations``).

    Per token, a block whose weights train keeps ``(5.5 + 2.5 n) h + 4 i`` values and a
    frozen block that gradients flow through ``(4 + 1.5 n) h + 4 i``, n being the block's
    norm layers (2 in Llama, 4 in GLM-4); blocks before the first trained one keep
    nothing (with freeze on MLPs only, the first trained block keeps ``(1 + n/2) h + 4 i``
    and later ones ``(4 + n) h + 4 i``). The float32 logits add ``V`` values per token.
    With ``offload`` every saved value moves to CPU memory but one block's worth (the block the
    backward pass works on, recomputed under checkpointing) and the logits.
    """
    hidden, inner, layers, vocab = _dims(model_config)
    blocks = block_list(model)
    norms = sum(1 for m in blocks[0].modules() if "norm" in type(m).__name__.lower())
    frozen = (4 + 1.5 * norms) * hidden + 4.0 * inner
    trained = (5.5 + 2.5 * norms) * hidden + 4.0 * inner
    if method.activations == "all_blocks":
        per_block = [trained] * layers
    elif method.activations == "trained_blocks" and not any(p.requires_grad for p in blocks.parameters()):
        per_block = [frozen] * layers  # (a VLM's projector trains: gradients flow through every block to it)
    elif method.activations == "trained_blocks":
        first = min(i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters()))
        if all(p.requires_grad for p in blocks[first].parameters()):
            head, rest = trained, trained
        else:  # e.g. only the MLPs train: the first trained block keeps its MLP's inputs only
            head = (1 + 0.5 * norms) * hidden + 4.0 * inner
            rest = (4 + norms) * hidden + 4.0 * inner
        per_block = [0.0] * first + [head] + [rest] * (layers - first - 1)
    else:  # lora, qlora, ptuning: gradients flow through every block to adapters or the prefix
        per_block = [frozen] * layers
    if checkpointing:
        kept = sum(hidden for b in per_block if b) + max(per_block)
    else:
        kept = sum(per_block)
    moved = kept - max(per_block) if offload else 0.0
    return tokens * ((kept - moved) * element_bytes + vocab * 4), tokens * moved * element_bytes


def _held_bytes(name: str, param, method: Method, config: RunConfig, load_dtype: torch.dtype,
                half_bytes: int | None = None) -> float:
    """Bytes of one parameter as the model holds it; ``half_bytes``: as gathered in that
    many bytes per value instead, quantized layers excepted."""
    quantized = method.quantized_base and param.ndim == 2 and ".layers." in name and "embed" not in name
    if quantized and not param.requires_grad:
        return param.numel() * (0.5 + 0.016 if config.method.quantization_bit == 4 else 1.0 + 0.008)
    if half_bytes is not None:
        return param.numel() * half_bytes
    if param.requires_grad and not method.trains_base_weights:
        return param.numel() * 4  # new adapters (LoRA, a P-Tuning prefix) are float32
    return param.numel() * _bytes(load_dtype)


def _shard_sizes(model, method: Method, config: RunConfig, load_dtype: torch.dtype,
                 trained_bytes: int, states: int) -> ShardSizes:
    """The sizes :func:`device_plans` needs, from the meta model."""
    half = config.train.fp16 or config.train.bf16
    gathered = 2 if half else _bytes(load_dtype)
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = sum(_held_bytes(n, p, method, config, load_dtype)
                 for n, p in model.named_parameters() if not p.requires_grad)
    blocks = block_list(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    block = max(sum(_held_bytes(names[id(p)], p, method, config, load_dtype, gathered)
                    for p in b.parameters()) for b in blocks)
    outside = sum(_held_bytes(n, p, method, config, load_dtype, gathered)
                  for n, p in model.named_parameters() if id(p) not in in_blocks)
    largest = max((sum(_held_bytes(names[id(p)], p, method, config, load_dtype, gathered)
                       for p in m.parameters(recurse=False))
                   for m in model.modules() if not any(id(p) in in_blocks for p in m.parameters())),
                  default=0.0)
    return ShardSizes(frozen, trained_bytes, half, states, "8bit" in config.train.optim, block,
                      outside, largest)


def reference_plan(config: RunConfig, weights: float, continued: bool) -> ReferencePlan | None:
    """The reference options of a dpo or kto stage (None for the others: no reference model):
    ``adapter_off`` adds nothing (not possible without a new adapter: full, freeze, or an
    adapter that a run continues), ``precompute`` adds nothing (one forward pass over the data
    before training), ``copy`` adds ``weights``, the model's weights as held (the load dtype,
    new adapters float32, a quantized base as stored), which is what a deep copy of it holds. The
    option used is the run's (raises the run's ConfigError where ``pref_reference`` cannot be)."""
    prefs = config.preference
    adapter = config.method.method in ADAPTER_METHODS
    if prefs.stage == "grpo":
        used = resolve_grpo_reference(config.rl, prefs.pref_reference, adapter, continued, config.method.lora_init)
    else:
        used = resolve_reference(prefs, adapter, continued, config.method.lora_init)
    if used is None:
        return None
    why = ""
    if not adapter:
        why = "the method trains the model's own weights (no adapter to switch off)"
    elif continued:
        why = "the run continues an adapter (switched off it gives the base)"
    elif mutates_base(config.method.lora_init):
        why = f"lora_init={config.method.lora_init} moves the base weights' principal part into the adapter"
    extra = {"adapter_off": None if why else 0.0, "precompute": None if prefs.stage == "grpo" else 0.0,
             "copy": float(weights)}
    return ReferencePlan(extra, used, why)


def estimate(config: RunConfig) -> MemoryPlan:
    """Parameters and memory of the configured run, without loading weights; a run that starts
    from a LoRA run folder is planned on that run's base with its adapter's settings."""
    config, continued = start_from_run(config, log=lambda *_: None)
    model, model_config = meta_model(config)
    method = get_method(config.method.method)
    load_dtype = resolve_dtype(config.model.dtype, config.train.fp16, config.train.bf16)
    trainable, total = count_parameters(model)
    weights = sum(_held_bytes(name, param, method, config, load_dtype)
                  for name, param in model.named_parameters())
    trained_bytes = _bytes(load_dtype) if method.trains_base_weights else 4
    gradients = trainable * trained_bytes
    optim = config.train.optim
    state = {"sgd": 0, "adafactor": 1, "adagrad": 1, "rmsprop": 1, "lomo": 0, "adalomo": 0}.get(optim, 2)
    state_bytes = 1 if "8bit" in optim else trained_bytes
    optimizer = trainable * state * state_bytes
    mixed = config.train.fp16 or config.train.bf16 or load_dtype != torch.float32
    stage = config.preference.stage
    sequences = config.rl.num_generations if stage == "grpo" else SEQUENCES_PER_ROW[stage]
    tokens = config.train.per_device_train_batch_size * sequences * config.data.max_seq_length
    activations, offloaded = activation_bytes(model, model_config, tokens, 2 if mixed else 4, method,
                                              checkpointing=config.train.gradient_checkpointing,
                                              offload=config.train.offload_activations)
    sizes = _shard_sizes(model, method, config, load_dtype, trained_bytes, state)
    generation = kv_cache_bytes(model_config, config.train.per_device_train_batch_size * sequences,
                                config.data.max_seq_length, 2 if mixed else 4) if stage == "grpo" else 0.0
    return MemoryPlan(method.name, trainable, total, weights, gradients, optimizer, activations, tokens,
                      sizes, stage, sequences, reference_plan(config, weights, continued is not None),
                      str(continued) if continued else None, offloaded, context_note(config, model_config),
                      generation)


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now: a CUDA device's free memory, or the machine's available
    memory for a CPU (None where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_sampling_memory(config: RunConfig, model_config, device: torch.device, log=print) -> float:
    """Refuse a grpo step whose completions' KV cache cannot fit in the memory ``device`` has
    free (a ConfigError naming the keys that size it); return its bytes, said in the log."""
    rows = config.train.per_device_train_batch_size * config.rl.num_generations
    element = 2 if (config.train.bf16 or config.train.fp16) else 4
    needed = kv_cache_bytes(model_config, rows, config.data.max_seq_length, element)
    free = available_memory(device)
    log(f"grpo: sampling holds a KV cache of {needed / GIB:.2f} GiB ({rows} completions x {config.data.max_seq_length} "
        f"tokens)" + (f"; {free / GIB:.1f} GiB free on {device.type}" if free is not None else ""))
    if free is not None and needed > free:
        raise ConfigError(f"num_generations: {config.train.per_device_train_batch_size} prompts x "
                          f"{config.rl.num_generations} completions x max_seq_length {config.data.max_seq_length} "
                          f"need a KV cache of {needed / GIB:.1f} GiB to sample, more than the {free / GIB:.1f} GiB "
                          f"free on {device.type}; lower num_generations, per_device_train_batch_size or "
                          "max_completion_length/max_seq_length (chattune train --dry-run plans it)")
    return needed


def kv_cache_bytes(model_config, rows: int, length: int, element: int) -> float:
    """The keys and values a decoder caches for ``rows`` sequences of ``length`` tokens: two
    ``[rows, kv heads, length, head dim]`` tensors per block."""
    c = text_config(model_config)
    hidden, _, layers, _ = _dims(model_config)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "num_heads", None) or 1
    kv_heads = getattr(c, "num_key_value_heads", None) or getattr(c, "multi_query_group_num", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return float(2 * layers * rows * kv_heads * length * head_dim * element)


def _gib(value: float) -> str:
    """Bytes as the plan's tables show them."""
    return f"{value / GIB:8.2f} GiB"


SEQUENCE_PAIRS = {"kto": "answer + KL answer", "grpo": "sampled completions of each prompt"}
"""What a preference row's two sequences are (else a pair's chosen + rejected answers)."""


def _step_line(plan: MemoryPlan, config: RunConfig) -> str:
    """The step: batch, sequences per row (a preference stage's two), tokens, dtype."""
    train = config.train
    rows = f"batch {train.per_device_train_batch_size}"
    if plan.sequences_per_row > 1:
        what = SEQUENCE_PAIRS.get(plan.stage, "chosen + rejected")
        rows += f" x {plan.sequences_per_row} sequences ({plan.stage}: {what})"
    return (f"step       {rows} x {config.data.max_seq_length} tokens = {plan.tokens_per_step} tokens, "
            f"dtype {resolve_dtype(config.model.dtype, train.fp16, train.bf16)}"
            f"{', fp16' if train.fp16 else ''}{', bf16' if train.bf16 else ''}"
            f"{_checkpointing(train)}")


def _checkpointing(train) -> str:
    """The step line's words for gradient checkpointing and activation offloading."""
    words = ""
    if train.gradient_checkpointing:
        words += f", gradient checkpointing ({'reentrant' if train.gradient_checkpointing_reentrant else 'non-reentrant'})"
    return words + (", activations offloaded to CPU" if train.offload_activations else "")


def _held_as(plan: MemoryPlan, config: RunConfig) -> str:
    """How the model's weights are held: the load dtype (or the quantized base), adapters float32."""
    if get_method(plan.method).quantized_base:
        base = f"{config.method.quantization_bit}-bit base"
    else:
        base = str(resolve_dtype(config.model.dtype, config.train.fp16, config.train.bf16)).removeprefix("torch.")
    return base + (", adapters float32" if plan.method in ADAPTER_METHODS else "")


def _reference_lines(plan: MemoryPlan, config: RunConfig) -> list[str]:
    """A preference stage's reference: for dpo and kto each option with what it adds, the one
    the run uses marked ``*`` (and counted in the total); orpo and simpo have none."""
    if plan.stage in ("sft", "pretrain"):
        return []
    ref = plan.reference
    if ref is None:
        return [f"reference  none: {plan.stage} has no reference model"]
    notes = {"adapter_off": "the model with its new adapter switched off",
             "precompute": "one forward pass over the data before training",
             "copy": f"a frozen copy of the model's weights ({_held_as(plan, config)})"}
    lines = [f"reference  {_gib(ref.used_bytes)}  ({plan.stage}: pref_reference={config.preference.pref_reference}"
             f" -> {ref.used}; * = this run's)"]
    for name in REFERENCE_OPTIONS:
        mark = "*" if name == ref.used else " "
        extra = ref.extra[name]
        why = ("grpo samples its completions while training" if name == "precompute" and plan.stage == "grpo"
               else ref.not_possible)
        detail = f"not possible: {why}" if extra is None else f"+{_gib(extra).strip()}  {notes[name]}"
        lines.append(f"         {mark} {name:<13}{detail}")
    return lines


def _generation_lines(plan: MemoryPlan, config: RunConfig) -> list[str]:
    """stage grpo: the KV cache its sampling holds, and which of it and the activations the total counts."""
    if plan.stage != "grpo":
        return []
    rl, rows = config.rl, config.train.per_device_train_batch_size * plan.sequences_per_row
    larger = "the KV cache" if plan.generation > plan.activations else "the activations"
    return [f"sampling   {_gib(plan.generation)}  (KV cache of {rows} completions x {config.data.max_seq_length} "
            f"tokens: prompt + max_completion_length {rl.max_completion_length}; held before the forward pass, "
            f"the total counts {larger})"]


def format_plan(plan: MemoryPlan, config: RunConfig) -> str:
    """The plan as a table a user reads before renting a GPU."""
    started = [f"start      from the run {plan.started_from}: its adapter trains further (planned on its base)"
               ] if plan.started_from else []
    return "\n".join([
        f"model      {config.model.model_name_or_path}",
        *started,
        f"method     {plan.method}: {plan.trainable:,} trainable of {plan.total:,} parameters "
        f"({plan.trainable / max(plan.total, 1):.3%})",
        _step_line(plan, config),
        *([plan.context] if plan.context else []),
        f"weights    {_gib(plan.weights)}",
        f"gradients  {_gib(plan.gradients)}",
        f"optimizer  {_gib(plan.optimizer)}  ({config.train.optim})",
        f"activations{_gib(plan.activations)}"
        + (f"  (+{_gib(plan.offloaded).strip()} offloaded to CPU memory)" if plan.offloaded else ""),
        *_generation_lines(plan, config),
        *_reference_lines(plan, config),
        f"total      {_gib(plan.total_bytes)}  (+ about 0.5-1 GiB CUDA context and allocator slack)",
    ])


BACKENDS = {"ddp": "DDP", "fsdp": "FSDP full_shard", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
"""The ways of training on several devices the N-device plan covers, and their table labels."""


@dataclass
class DevicePlan:
    """What one of N devices holds under one backend (bytes)."""

    backend: str
    """A key of :data:`BACKENDS`."""
    nproc: int
    weights: float
    """Including ``gathered``."""
    gathered: float
    """Full parameters gathered from the shards at a time (FSDP and ZeRO-3; else 0)."""
    gradients: float
    optimizer: float
    activations: float
    reference: float = 0.0
    """A frozen reference copy, whole on each device (included in ``weights``; else 0)."""

    @property
    def total_bytes(self) -> float:
        """Weights + gradients + optimizer state + activations on this device."""
        return self.weights + self.gradients + self.optimizer + self.activations


def device_plans(plan: MemoryPlan, nproc: int) -> list[DevicePlan]:
    """The per-device memory of ``plan`` trained on ``nproc`` devices, one entry per backend.

    With P trainable parameters, b bytes each on one device (float32 for adapters, the load
    dtype for freeze and full fine-tuning), W the one-device weights
    (F of them frozen), G and O its gradients and optimizer state, s optimizer states per
    parameter, B the largest block and R everything outside the blocks (embeddings, final
    norm, head), both as gathered (fp16/bf16 when training in half precision), M the largest
    module outside the blocks, and N devices:

    - DDP: ``W``, ``2 G``, ``O``. Everything is replicated; the second copy of the gradients
      is DDP's all-reduce buckets (the Trainer keeps ``gradient_as_bucket_view`` off, so they
      sit beside ``.grad``): it is counted.
    - FSDP full_shard: ``(F + P f) / N + R + 2 B``, ``P f / N``, ``P s f / N`` (1 byte a
      state for 8-bit optimizers), with f = 4 under fp16/bf16 (accelerate upcasts trainable
      flat parameters to float32 whenever mixed precision is on), else b. The root unit R
      stays gathered from the forward through the backward (torch does not reshard the root
      after its forward); each block is gathered while it runs, with the next one prefetched.
    - ZeRO-2: ``F + P h``, ``P h / N``, ``P (4 + 4 s) / N``, with h = 2 under fp16/bf16
      (DeepSpeed casts the model to the half dtype), else b. DeepSpeed keeps a float32 master
      copy of every trainable parameter in its optimizer partition, even in float32 runs, and
      the states are float32 (1 byte with 8-bit optimizers): the optimizer column is not O / N.
    - ZeRO-3: ``(F + P h) / N + B + max(B, M)``, ``P h / N``, ``P (4 + 4 s) / N``: each
      module is gathered as it runs with the next one prefetched, the largest moment being two
      blocks or, around the head, a block and the head.

    Activations are per device and not sharded: the one-device figure (batch x sequence
    tokens each) on every backend. A preference run's frozen reference copy
    (``pref_reference=copy``) is made before the model is wrapped, so it is whole on every
    device: added to each backend's weights. Not counted: the transient unsharded gradient of the block
    being reduced (FSDP, ZeRO-3), DeepSpeed's reduce and prefetch buckets and the small
    parameters ZeRO-3 keeps unpartitioned (under ``stage3_param_persistence_threshold``),
    the float32 copy of a gradient partition during ZeRO's optimizer step (after activations
    are freed), and the communication buffers of each backend. With N = 1 the gathered terms
    stay in the table, though torch runs FSDP on one device as NO_SHARD; the QLoRA base is
    counted as stored, as on one device.

    What sharding buys depends on what trains. For full fine-tuning, ZeRO-2 divides the
    gradients and optimizer state (most of the memory) and ZeRO-3 / full_shard the weights
    too. For LoRA (and QLoRA, P-Tuning) the trainable part, its gradients and optimizer state
    are tiny: ZeRO-2 buys next to nothing (weights stay replicated), while full_shard and
    ZeRO-3 shard the frozen base weights, leaving about W / N plus the gathered blocks; the
    activations, the same on every backend, then dominate.
    """
    if nproc < 1:
        raise ValueError(f"nproc: expected >= 1, got {nproc}")
    sizes = plan.sizes
    if sizes is None:
        raise ValueError("device_plans needs a plan made by estimate() (its sizes are missing)")
    n, p = nproc, plan.trainable
    frozen = sizes.frozen_weights
    f = 4 if sizes.half else sizes.trained_bytes
    h = 2 if sizes.half else sizes.trained_bytes
    state_bytes = 1 if sizes.eight_bit else 4
    zero_optimizer = p * (4 + sizes.states * state_bytes) / n
    fsdp_gathered = sizes.outside + 2 * sizes.block
    zero3_gathered = sizes.block + max(sizes.block, sizes.largest_outside)
    acts, ref = plan.activations, plan.reference_bytes
    return [
        DevicePlan("ddp", n, plan.weights + ref, 0.0, 2 * plan.gradients, plan.optimizer, acts, ref),
        DevicePlan("fsdp", n, (frozen + p * f) / n + fsdp_gathered + ref, fsdp_gathered, p * f / n,
                   p * sizes.states * (1 if sizes.eight_bit else f) / n, acts, ref),
        DevicePlan("zero2", n, frozen + p * h + ref, 0.0, p * h / n, zero_optimizer, acts, ref),
        DevicePlan("zero3", n, (frozen + p * h) / n + zero3_gathered + ref, zero3_gathered, p * h / n,
                   zero_optimizer, acts, ref),
    ]


def format_devices(devices: list[DevicePlan]) -> str:
    """The N-device plans as a table, one row per backend, and what the columns include."""
    n = devices[0].nproc
    largest = max(d.total_bytes for d in devices)
    unit, scale = ("GiB", GIB) if largest >= GIB else ("MiB", 1024 ** 2)
    columns = ("weights", "gradients", "optimizer", "activations", "total")
    lines = [f"{f'per device, N = {n} ({unit})':<24}" + "".join(f"{c:>12}" for c in columns)]
    for d in devices:
        values = (d.weights, d.gradients, d.optimizer, d.activations, d.total_bytes)
        lines.append(f"{BACKENDS[d.backend]:<24}" + "".join(f"{v / scale:12.2f}" for v in values))
    gathered = {d.backend: d.gathered / scale for d in devices}
    lines += [
        "DDP gradients include its all-reduce buckets (a second copy of the trainable gradients).",
        f"FSDP and ZeRO-3 weights include the parameters gathered at a time: {gathered['fsdp']:.2f}"
        f" and {gathered['zero3']:.2f} {unit}.",
        "ZeRO optimizer: float32 master weights + float32 states; under fp16/bf16 FSDP trains"
        " float32 weights.",
    ]
    if devices[0].reference:
        lines.append(f"Weights include the frozen reference copy, whole on every device: "
                     f"{devices[0].reference / scale:.2f} {unit}.")
    return "\n".join(lines)
