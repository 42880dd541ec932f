"""CPU kernels for LoRA training: the same results as PyTorch's modules, faster on CPU.

- :class:`GapDropout`: LoRA's dropout (p = 0.05 usually) draws the positions of the dropped
  elements as geometric gaps, p x as many random numbers as one Bernoulli draw per
  element, with exactly the same distribution: 3x faster than ``nn.Dropout`` on CPU.
- :class:`RankLinear`: LoRA's rank-r projections compute every product of the forward and
  backward pass the way round CPU BLAS is fast at: ``[out, N] x [N, r]`` (the gradient
  of ``lora_B``) runs 5-8x slower than its transpose.

:func:`use_cpu_kernels` swaps them into a model for the time of a ``with`` block (training)
and back: parameters, state dict and saved adapters are unchanged. On other devices both
are PyTorch's own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


def dropout_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CPU dropout mask: 0 where an element is dropped (each independently with probability
    ``p``), ``1 / (1 - p)`` elsewhere.

    For small ``p`` the dropped positions are drawn as the gaps between them (iid geometric:
    exactly the same distribution as one Bernoulli draw per element), about p x the random
    numbers: 3x faster than ``bernoulli_`` at p = 0.05, LoRA's usual dropout."""
    scale = 1.0 / (1.0 - p)
    if p > 0.25:
        return (torch.rand(shape) >= p).to(dtype).mul_(scale)
    n = math.prod(shape)
    batch = int(n * p + 6 * math.sqrt(n * p) + 16)
    positions = torch.empty(batch, dtype=torch.float64).geometric_(p).cumsum_(0).sub_(1)
    while positions[-1] < n - 1:  # rare: draw on until the last element is decided
        more = torch.empty(batch, dtype=torch.float64).geometric_(p).cumsum_(0).add_(positions[-1])
        positions = torch.cat([positions, more])
    mask = torch.full(shape, scale, dtype=dtype)
    mask.view(-1)[positions[positions < n].long()] = 0
    return mask


class GapDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from :func:`dropout_mask` (same distribution,
    fewer random numbers); on other devices it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop and rescale (training only)."""
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * dropout_mask(tuple(x.shape), self.p, x.dtype)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, computed as ``(b.T @ a.T).T`` when the product is tall and rank-narrow:
    CPU BLAS runs a [4096, N] x [N, 8] product 5-8 times slower than its transpose."""
    if b.shape[1] <= 16 and a.shape[0] > 4 * b.shape[1]:
        return (b.t() @ a.t()).t()
    return a @ b


class _RankLinearFunction(torch.autograd.Function):
    """``x @ weight.T`` and its gradients, each product oriented by :func:`_matmul`."""

    @staticmethod
    def forward(ctx, x, weight):
        """``x @ weight.T``, keeping both for the backward pass."""
        ctx.save_for_backward(x, weight)
        flat = x.reshape(-1, x.shape[-1])
        return _matmul(flat, weight.t()).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        """Gradients of ``x`` and ``weight``, each product oriented by :func:`_matmul`."""
        x, weight = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(flat_grad, weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _matmul(flat_grad.t(), x.reshape(-1, x.shape[-1])).contiguous()
        return grad_x, grad_weight


class RankLinear(torch.nn.Linear):
    """LoRA's rank-r projections (``lora_A``, ``lora_B``) on CPU in float32: the same product
    as nn.Linear, with no matmul of the step oriented the slow way (see :func:`_matmul`);
    anything else (a bias, another device, autocast) is nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T``."""
        if (self.bias is not None or x.device.type != "cpu" or x.dtype != self.weight.dtype
                or torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        return _RankLinearFunction.apply(x, self.weight)


@contextlib.contextmanager
def use_cpu_kernels(model) -> Iterator[dict[str, int]]:
    """For training on CPU, within the block: every ``nn.Dropout`` is a :class:`GapDropout`
    and every LoRA rank-r ``nn.Linear`` a :class:`RankLinear` (the same module objects, their
    class swapped: parameters, state dict, hooks and results unchanged, faster). Yields how
    many modules of each kind were changed; on leaving the block every one is given its
    class back, so the model is plain PyTorch / peft again."""
    swapped: list[tuple[torch.nn.Module, type]] = []
    counts = {"dropout": 0, "lora_linear": 0}
    try:
        for parent_name, parent in list(model.named_modules()):
            for child in parent.children():
                if type(child) is torch.nn.Dropout and child.p > 0:
                    swapped.append((child, type(child)))
                    child.__class__ = GapDropout
                    counts["dropout"] += 1
                elif type(child) is torch.nn.Linear and parent_name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
                    swapped.append((child, type(child)))
                    child.__class__ = RankLinear
                    counts["lora_linear"] += 1
        yield counts
    finally:
        for module, original in reversed(swapped):
            module.__class__ = original
