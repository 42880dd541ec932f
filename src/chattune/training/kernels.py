"""CPU kernels for LoRA training: the same results as PyTorch's modules, faster on CPU.

- :class:`GapDropout`: LoRA's dropout (p = 0.05 usually) draws the positions of the dropped
  elements as geometric gaps, p x as many random numbers as one Bernoulli draw per
  element, with exactly the same distribution: 3x faster than ``nn.Dropout`` on CPU.
- :class:`RankLinear`: LoRA's rank-r projections compute every product of the forward and
  backward pass the way round CPU BLAS is fast at: ``[out, N] x [N, r]`` (the gradient
  of ``lora_B``) runs 5-8x slower than its transpose.
- :func:`lora_add`: a plain LoRA layer's update (dropout, ``lora_A``, ``lora_B``, scaling and
  the sum with the base layer's output) in one autograd node, with the dropped elements as
  positions: no mask and no dropped copy of the input are made or kept, and the scaling
  and sum ride in the GEMM. peft's LoRA ``Linear`` uses it on CPU in float32.

:func:`use_cpu_kernels` swaps them into a model for the time of a ``with`` block (training)
and back: parameters, state dict and saved adapters are unchanged. On other devices all
are PyTorch's and peft's own.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator

import torch


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """Which of ``n`` elements a dropout of ``p`` drops (each independently with probability
    ``p``), as sorted flat indices, drawn on the CPU's generator.

    The positions are drawn as the gaps between them (iid geometric: exactly the same
    distribution as one Bernoulli draw per element), about p x the random numbers."""
    batch = int(n * p + 6 * math.sqrt(n * p) + 16)
    positions = torch.empty(batch, dtype=torch.float64).geometric_(p).cumsum_(0).sub_(1)
    while positions[-1] < n - 1:  # rare: draw on until the last element is decided
        more = torch.empty(batch, dtype=torch.float64).geometric_(p).cumsum_(0).add_(positions[-1])
        positions = torch.cat([positions, more])
    return positions[positions < n].long()


def dropout_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CPU dropout mask: 0 where an element is dropped (each independently with probability
    ``p``), ``1 / (1 - p)`` elsewhere; for small ``p`` from :func:`dropped_positions`, 3x faster
    than ``bernoulli_`` at p = 0.05, LoRA's usual dropout."""
    scale = 1.0 / (1.0 - p)
    if p > 0.25:
        return (torch.rand(shape) >= p).to(dtype).mul_(scale)
    mask = torch.full(shape, scale, dtype=dtype)
    mask.view(-1)[dropped_positions(math.prod(shape), p)] = 0
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


def _dropped_elements(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The elements of ``x`` [N, in] at the sorted flat ``positions``, as a sparse CSR matrix of
    x's shape: the part of ``x`` a dropout takes away."""
    rows, cols = positions // x.shape[1], positions % x.shape[1]
    crow = torch.zeros(x.shape[0] + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(rows, minlength=x.shape[0]), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is exact
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, x.reshape(-1)[positions], x.shape)


class _LoraAddFunction(torch.autograd.Function):
    """``result + scaling * dropout(x) @ A.T @ B.T`` with the dropped elements given as flat
    positions of ``x``: no mask, no dropped copy of ``x``, no ``[tokens, out]`` scaling pass.

    ``dropout(x) @ A.T`` is ``keep * (x @ A.T)`` less the dropped elements' terms (a sparse
    correction, p of the products); the scaling and the sum ride in one ``addmm``. Only
    ``x`` (which the base layer keeps anyway), the rank-r product and the positions are kept."""

    @staticmethod
    def forward(ctx, result, x, weight_a, weight_b, scaling, keep, positions):
        """The layer's output, for flat ``result`` [N, out] and ``x`` [N, in]."""
        hidden = _matmul(x, weight_a.t()).contiguous()
        if len(positions):
            hidden -= _dropped_elements(x, positions) @ weight_a.t()
        hidden.mul_(keep)
        ctx.save_for_backward(x, weight_a, weight_b, hidden, positions)
        ctx.factors = (scaling, keep)
        return torch.addmm(result, hidden, weight_b.t(), alpha=scaling)

    @staticmethod
    def backward(ctx, grad):
        """Gradients of ``result``, ``x``, ``weight_a`` and ``weight_b``."""
        x, weight_a, weight_b, hidden, positions = ctx.saved_tensors
        scaling, keep = ctx.factors
        need_result, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = _matmul(hidden.t(), grad).t().mul_(scaling).contiguous()
        if need_x or need_a:
            grad_hidden = _matmul(grad, weight_b).mul_(scaling * keep)  # of keep * dropout-free product
            if need_x:
                grad_x = _matmul(grad_hidden, weight_a)
                grad_x.view(-1).index_fill_(0, positions, 0)
            if need_a:
                kept = x
                if len(positions):  # a zeroed copy is cheaper here than the sparse product's transpose
                    kept = x.clone()
                    kept.view(-1).index_fill_(0, positions, 0)
                grad_a = _matmul(grad_hidden.t(), kept)
        return grad if need_result else None, grad_x, grad_a, grad_b, None, None, None


def lora_add(result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
             scaling: float, p: float) -> torch.Tensor:
    """``result + scaling * lora_B(lora_A(dropout(x)))`` (dropout ``p``, 0 to leave ``x`` whole),
    as peft's LoRA layer computes it, in one autograd node: :class:`_LoraAddFunction`."""
    flat_x = x.reshape(-1, x.shape[-1]).contiguous()  # positions index its row-major elements
    flat_result = result.reshape(-1, result.shape[-1])
    positions = dropped_positions(flat_x.numel(), p) if p > 0 else torch.empty(0, dtype=torch.long)
    out = _LoraAddFunction.apply(flat_result, flat_x, weight_a, weight_b, float(scaling), 1.0 / (1.0 - p), positions)
    return out.reshape(result.shape)


@functools.cache
def _fused_lora_class() -> type:
    """peft's LoRA ``Linear`` with a forward that adds plain LoRA by :func:`lora_add` (CPU,
    float32, one active adapter, no variant such as DoRA, no biases); peft's own forward otherwise."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        """peft's LoRA ``Linear``; the plain-LoRA case on CPU in float32 by :func:`lora_add`."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            """The base layer's output plus the active adapter's update."""
            adapter = self._fusable_adapter(x, args, kwargs)
            if adapter is None:
                return super().forward(x, *args, **kwargs)
            dropout = self.lora_dropout[adapter]
            p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
            result = self.base_layer(x)
            return lora_add(result, x, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                            self.scaling[adapter], p)

        def _fusable_adapter(self, x, args, kwargs) -> str | None:
            if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                return None
            adapter = self.active_adapters[0]
            if adapter not in self.lora_A or adapter in self.lora_variant or self.lora_bias.get(adapter):
                return None
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            dropout = self.lora_dropout[adapter]
            if (x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or lora_a.bias is not None
                    or lora_b.bias is not None or type(self.base_layer) is not torch.nn.Linear
                    or not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity))):
                return None
            if not (x.dtype == lora_a.weight.dtype == lora_b.weight.dtype == self.base_layer.weight.dtype
                    == torch.float32):
                return None
            return adapter

    return FusedLoraLinear


@contextlib.contextmanager
def use_cpu_kernels(model) -> Iterator[dict[str, int]]:
    """For training on CPU, within the block: every peft LoRA ``Linear`` adds its update by
    :func:`lora_add`, every ``nn.Dropout`` is a :class:`GapDropout`
    and every LoRA rank-r ``nn.Linear`` a :class:`RankLinear` (the same module objects, their
    class swapped: parameters, state dict, hooks and results unchanged, faster). Yields how
    many modules of each kind were changed; on leaving the block every one is given its
    class back, so the model is plain PyTorch / peft again."""
    swapped: list[tuple[torch.nn.Module, type]] = []
    counts = {"dropout": 0, "lora_linear": 0, "lora_layer": 0}
    fused = _fused_lora_class() if _has_peft_lora(model) else None
    try:
        for parent_name, parent in list(model.named_modules()):
            for child in parent.children():
                if fused is not None and type(child) is fused.__base__:
                    swapped.append((child, type(child)))
                    child.__class__ = fused
                    counts["lora_layer"] += 1
                elif type(child) is torch.nn.Dropout and child.p > 0:
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


def _has_peft_lora(model) -> bool:
    return any(type(m).__module__ == "peft.tuners.lora.layer" for m in model.modules())
