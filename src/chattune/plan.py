"""``chattune train --dry-run``: parameters and a memory estimate before anything is loaded.

The model is built on PyTorch's meta device from its config alone (no weights
read), the method is applied, and memory is estimated for weights, gradients,
optimizer state and activations at the configured batch and sequence length.

Activations per token and per block were fitted to what autograd actually saves
(measured by ``tests/test_plan.py``, Llama and GLM-4 blocks with SDPA, fit error under 1%):
see :func:`activation_bytes`. Gradient checkpointing keeps one ``h`` per token per
block plus one block's worth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chattune import chatglm
from chattune.config import RunConfig
from chattune.methods import Method, block_list, count_parameters, get_method
from chattune.model import resolve_dtype

GIB = 1024 ** 3


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

    @property
    def total_bytes(self) -> float:
        """Weights + gradients + optimizer state + activations."""
        return self.weights + self.gradients + self.optimizer + self.activations


def _dims(model_config) -> tuple[int, int, int, int]:
    """(hidden, mlp width, blocks, vocab), also for ChatGLM remote-code configs."""
    c = model_config
    hidden = getattr(c, "hidden_size", None) or c.d_model
    inner = getattr(c, "intermediate_size", None) or getattr(c, "ffn_hidden_size", None) or 4 * hidden
    layers = getattr(c, "num_hidden_layers", None) or c.num_layers
    vocab = getattr(c, "vocab_size", None) or c.padded_vocab_size
    return hidden, inner, layers, vocab


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def meta_model(config: RunConfig):
    """The configured model with the method applied, on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = chatglm.native_config(config.model.model_name_or_path) or AutoConfig.from_pretrained(
        config.model.model_name_or_path, trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    method = get_method(config.method.method)
    return (method.plan_apply or method.apply)(model, config.method, False), model_config


def activation_bytes(model, model_config, tokens: int, element_bytes: int, method: Method,
                     checkpointing: bool) -> float:
    """Estimated bytes autograd keeps for the backward pass of one step.

    Per token, a block whose weights train keeps ``(5.5 + 2.5 n) h + 4 i`` values and a
    frozen block that gradients flow through ``(4 + 1.5 n) h + 4 i``, n being the block's
    norm layers (2 in Llama, 4 in GLM-4); blocks before the first trained one keep
    nothing (with freeze on MLPs only, the first trained block keeps ``(1 + n/2) h + 4 i``
    and later ones ``(4 + n) h + 4 i``). The float32 logits add ``V`` values per token.
    """
    hidden, inner, layers, vocab = _dims(model_config)
    blocks = block_list(model)
    norms = sum(1 for m in blocks[0].modules() if "norm" in type(m).__name__.lower())
    frozen = (4 + 1.5 * norms) * hidden + 4.0 * inner
    trained = (5.5 + 2.5 * norms) * hidden + 4.0 * inner
    if method.activations == "all_blocks":
        per_block = [trained] * layers
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
    return tokens * (kept * element_bytes + vocab * 4)


def estimate(config: RunConfig) -> MemoryPlan:
    """Parameters and memory of the configured run, without loading weights."""
    model, model_config = meta_model(config)
    method = get_method(config.method.method)
    load_dtype = resolve_dtype(config.model.dtype, config.train.fp16, config.train.bf16)
    trainable, total = count_parameters(model)
    weights = 0.0
    for name, param in model.named_parameters():
        if param.requires_grad and not method.trains_base_weights:
            weights += param.numel() * 4  # adapters and freeze-trained tensors stay float32
        elif method.quantized_base and param.ndim == 2 and ".layers." in name and "embed" not in name:
            weights += param.numel() * (0.5 + 0.016 if config.method.quantization_bit == 4 else 1.0 + 0.008)
        else:
            weights += param.numel() * _bytes(load_dtype)
    trained_bytes = _bytes(load_dtype) if method.trains_base_weights else 4
    gradients = trainable * trained_bytes
    optim = config.train.optim
    state = {"sgd": 0, "adafactor": 1}.get(optim, 2)
    state_bytes = 1 if "8bit" in optim else trained_bytes
    optimizer = trainable * state * state_bytes
    mixed = config.train.fp16 or config.train.bf16 or load_dtype != torch.float32
    tokens = config.train.per_device_train_batch_size * config.data.max_seq_length
    activations = activation_bytes(model, model_config, tokens, 2 if mixed else 4, method,
                                   checkpointing=config.train.gradient_checkpointing)
    return MemoryPlan(method.name, trainable, total, weights, gradients, optimizer, activations, tokens)


def format_plan(plan: MemoryPlan, config: RunConfig) -> str:
    """The plan as a table a user reads before renting a GPU."""
    def gib(value: float) -> str:
        return f"{value / GIB:8.2f} GiB"

    return "\n".join([
        f"model      {config.model.model_name_or_path}",
        f"method     {plan.method}: {plan.trainable:,} trainable of {plan.total:,} parameters "
        f"({plan.trainable / max(plan.total, 1):.3%})",
        f"step       batch {config.train.per_device_train_batch_size} x {config.data.max_seq_length} tokens"
        f" = {plan.tokens_per_step} tokens, dtype {resolve_dtype(config.model.dtype, config.train.fp16, config.train.bf16)}"
        f"{', fp16' if config.train.fp16 else ''}{', bf16' if config.train.bf16 else ''}"
        f"{', gradient checkpointing' if config.train.gradient_checkpointing else ''}",
        f"weights    {gib(plan.weights)}",
        f"gradients  {gib(plan.gradients)}",
        f"optimizer  {gib(plan.optimizer)}  ({config.train.optim})",
        f"activations{gib(plan.activations)}",
        f"total      {gib(plan.total_bytes)}  (+ about 0.5-1 GiB CUDA context and allocator slack)",
    ])
