"""The training loss: token-weighted causal-LM cross-entropy, plain or chunked.

``plain`` takes the model's full ``[tokens, vocabulary]`` logits, as transformers does.
``chunked`` never builds them: while training, the output layer hands its input (the
last hidden states) to :class:`HeadCapture` and returns an empty placeholder, and the
loss runs the output layer over the supervised positions only, ``chunk_size`` tokens
at a time. For a plain ``nn.Linear`` head, :class:`LinearCrossEntropy` computes each
chunk's gradient in the forward pass (no logits are kept, nothing is recomputed); any
other head (peft-wrapped, say) runs per chunk under activation checkpointing. With a
130k vocabulary and 8k tokens a step, the float32 logits alone are 4 GiB; chunked
holds ``chunk_size`` x vocabulary of them at a time.

Both return the sum over supervised tokens divided by ``num_items_in_batch`` (the
supervised tokens of the whole accumulated batch, as transformers' Trainer counts
them), so the loss is a token-weighted mean however rows are batched or packed.
In evaluation (no gradients) :class:`CausalLMLoss` also keeps the running sum and
count, from which the trainer reports the token-weighted eval loss. ``chattune eval`` (and the
demo) score references with the same loss (:meth:`CausalLMLoss.batch_sum` on batches of
:class:`chattune.training.collate.PadCollator`, chunked where :func:`auto_loss` finds it exact).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chattune.data.encode import IGNORE_INDEX
from chattune.errors import ConfigError

if TYPE_CHECKING:
    from chattune.config import RunConfig


class LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, by chunks of
    rows; the gradients are computed chunk by chunk in the forward pass and kept (they are
    the size of ``hidden`` and ``weight``), so no ``[rows, vocabulary]`` tensor outlives a chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        """The summed loss; the gradients, computed chunk by chunk, are kept for backward."""
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            log_probs = torch.log_softmax(F.linear(h, weight, bias).float(), dim=-1)
            total -= log_probs.gather(1, t[:, None]).sum()
            if need_hidden or need_weight or need_bias:
                grad = log_probs.exp_()  # softmax, in place
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                compute = grad.to(torch.get_autocast_dtype(h.device.type)
                                  if torch.is_autocast_enabled(h.device.type) else h.dtype)
                if need_hidden:
                    grad_hidden[start:start + chunk_size] = compute @ weight.to(compute.dtype)
                if need_weight:
                    grad_weight += (compute.t() @ h.to(compute.dtype)).float()
                if need_bias:
                    grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        """The kept gradients, scaled by the upstream gradient."""
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output.float()
        out_hidden = (grad_hidden * scale.to(grad_hidden.dtype)) if grad_hidden is not None else None
        out_weight = (grad_weight * scale).to(weight_dtype) if grad_weight is not None else None
        out_bias = (grad_bias * scale).to(bias_dtype) if grad_bias is not None else None
        return out_hidden, out_weight, out_bias, None, None


def _head_chunk_loss(head_forward, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_forward(hidden).float(), targets, reduction="sum")


def chunked_head_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                      chunk_size: int = 1024, head_forward=None) -> torch.Tensor:
    """Sum of cross-entropy of ``head(hidden)`` against ``targets`` (``[n, hidden]``, ``[n]``,
    every target valid), ``chunk_size`` rows of logits at a time.

    ``head_forward`` is the head's own forward when it is temporarily replaced (see
    :class:`HeadCapture`); a plain ``nn.Linear`` head uses :class:`LinearCrossEntropy` when
    gradients are wanted (without, evaluation, only the loss is computed).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if type(head) is torch.nn.Linear and torch.is_grad_enabled():
        weight = head.weight
        hidden = hidden.to(weight.device)
        return LinearCrossEntropy.apply(hidden, weight, head.bias, targets.to(weight.device), chunk_size)
    forward = head_forward or head.forward
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_chunk_loss, forward, h, t, use_reentrant=False)
        else:
            total = total + _head_chunk_loss(forward, h, t)
    return total


class HeadCapture:
    """Within a ``with`` block, the model's output layer keeps its input and returns an empty
    ``[..., 0]`` placeholder instead of the logits; :meth:`take` hands the input over. On
    leaving the block the layer has its own forward back."""

    def __init__(self, head: torch.nn.Module):
        self.head = head
        self.hidden: torch.Tensor | None = None
        self.original = head.forward
        self._had_own_forward = "forward" in head.__dict__

    def _forward(self, hidden, *args, **kwargs):
        self.hidden = hidden
        return hidden[..., :0]  # empty, yet on the graph (DDP looks for its outputs there)

    def __enter__(self) -> HeadCapture:
        self.head.forward = self._forward  # this module instance only
        return self

    def __exit__(self, *exc) -> None:
        if self._had_own_forward:
            self.head.forward = self.original
        else:
            self.head.__dict__.pop("forward", None)
        self.hidden = None

    @contextlib.contextmanager
    def paused(self):
        """Within the block the layer computes its logits again (generation during training)."""
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()

    def take(self) -> torch.Tensor:
        """The hidden states of the last forward pass (once)."""
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("chunked loss: the model's output layer was not called in this forward pass")
        return hidden


def output_layer(model) -> torch.nn.Module | None:
    """The model's output (LM head) layer, also through peft wrappers; None if unknown."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if getter is not None else None
    except (AttributeError, NotImplementedError):
        head = None
    return head if isinstance(head, torch.nn.Module) else None


@torch.no_grad()
def check_head_logits(model, head: torch.nn.Module, vocab_size: int) -> str | None:
    """None if the model's logits are exactly its output layer applied to the layer's input,
    token for token (so the chunked loss computes the same thing); else why not.

    Catches heads whose logits are post-processed (soft-capping, scaling) or laid out
    differently (sequence-first remote code).
    """
    seen: dict[str, Any] = {}

    def hook(module, args, output):
        seen["input"], seen["output"] = args[0], output

    parameter = next(model.parameters())
    ids = torch.randint(min(16, vocab_size - 1), vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    handle = head.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids.to(parameter.device), use_cache=False).logits
    finally:
        handle.remove()
        model.train(was_training)
    if "input" not in seen:
        return "the model's forward does not call its output layer"
    if seen["input"].shape[:-1] != logits.shape[:-1] or seen["output"].shape != logits.shape:
        return (f"the output layer sees hidden states of shape {tuple(seen['input'].shape)} but the model "
                f"returns logits of shape {tuple(logits.shape)}")
    if not torch.equal(seen["output"], logits):
        return "the model post-processes its output layer's logits (e.g. soft-capping or scaling)"
    return None


class CausalLMLoss:
    """``compute_loss_func`` for transformers' Trainer: next-token cross-entropy, summed over
    supervised tokens and divided by ``num_items_in_batch``.

    ``capture`` set means chunked: the hidden states come from the capture, not the logits.
    """

    def __init__(self, capture: HeadCapture | None = None, chunk_size: int = 1024):
        self.capture = capture
        self.chunk_size = chunk_size
        self.eval_sum = 0.0
        self.eval_count = 0

    @property
    def mode(self) -> str:
        """``chunked`` or ``plain``."""
        return "chunked" if self.capture is not None else "plain"

    def capturing(self) -> contextlib.AbstractContextManager:
        """The context to compute this loss in: the head capture when chunked, else nothing."""
        return self.capture if self.capture is not None else contextlib.nullcontext()

    def loss_sum(self, outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the token losses, number of supervised tokens) of one batch."""
        targets = labels[..., 1:]
        supervised = targets != IGNORE_INDEX
        if self.capture is not None:
            hidden = self.capture.take()
            hidden = hidden[..., :-1, :][supervised.to(hidden.device)]
            total = chunked_head_loss(hidden, self.capture.head, targets[supervised].to(hidden.device),
                                      self.chunk_size, self.capture.original)
        else:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            logits = logits[..., :-1, :][supervised.to(logits.device)]
            total = F.cross_entropy(logits.float(), targets[supervised].to(logits.device), reduction="sum")
        return total, supervised.sum()

    def batch_sum(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`loss_sum` of ``model`` on a collated batch (:mod:`chattune.training.collate`; its
        labels are kept from the model, the forward runs without a KV cache): how a reference is
        scored outside the Trainer, exactly as training scores it."""
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
        inputs.setdefault("use_cache", False)
        with self.capturing():
            return self.loss_sum(model(**inputs), batch["labels"])

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        total, count = self.loss_sum(outputs, labels)
        if not torch.is_grad_enabled():
            self.eval_sum += float(total)
            self.eval_count += int(count)
        if num_items_in_batch is None:
            num_items_in_batch = count.clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def reset_eval(self) -> None:
        """Forget the evaluation sums (at the start of an evaluation)."""
        self.eval_sum, self.eval_count = 0.0, 0


def auto_loss(model, vocab_size: int, chunk_size: int = 1024) -> tuple[CausalLMLoss, str | None]:
    """Chunked where the model's logits are exactly its output layer applied to the last hidden
    states (checked on a probe), with None; else plain, with the reason chunked is not possible."""
    head = output_layer(model)
    reason = "the model has no output layer chattune can find" if head is None else \
        check_head_logits(model, head, vocab_size)
    if reason is None:
        return CausalLMLoss(HeadCapture(head), chunk_size), None
    return CausalLMLoss(), reason


def resolve_loss(config: RunConfig, model, vocab_size: int, log=print) -> CausalLMLoss:
    """The loss function: ``auto`` is chunked where the model's logits are exactly its output
    layer applied to the last hidden states (checked on a probe), else plain."""
    wanted = config.train.loss
    if wanted == "plain":
        return CausalLMLoss()
    loss, reason = auto_loss(model, vocab_size, config.train.loss_chunk_size)
    if reason is None:
        return loss
    if wanted == "auto":
        log(f"loss: plain ({reason})")
        return loss
    raise ConfigError(f"loss: chunked is not possible for this model: {reason}. Use loss=plain.")
