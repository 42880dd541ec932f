"""CPU kernels: a dropout mask with nn.Dropout's distribution, the same gradients as PyTorch's
modules (also under checkpointing), and a swap that holds for a ``with`` block only: the
model is plain peft afterwards (also after an error) and its saved adapter is unchanged."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import load_file

from chattune.training.kernels import GapDropout, RankLinear, dropout_mask, use_cpu_kernels


def lora_model(path, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout,
                                           init_lora_weights=False))


def test_cpu_dropout_mask_has_nn_dropouts_distribution():
    torch.manual_seed(0)
    for p in (0.05, 0.1, 0.5):
        mask = torch.cat([dropout_mask((300, 301), p).flatten() for _ in range(20)])
        values = mask.unique().tolist()
        assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p))
        dropped = (mask == 0).float()
        assert dropped.mean().item() == pytest.approx(p, abs=0.004)
        # independent: two neighbours are dropped together p^2 of the time, and the last element too
        assert (dropped[:-1] * dropped[1:]).mean().item() == pytest.approx(p * p, abs=0.003)
        assert dropped.view(20, -1)[:, -1000:].mean().item() == pytest.approx(p, abs=0.02)


def test_cpu_kernels_give_the_same_gradients_also_under_checkpointing(tiny_models):
    path = tiny_models("glm4")  # built (with its own seeding) before the seeded runs

    def model_and_grads(swap: bool, dropout: float, checkpointing: bool = False):
        model = lora_model(path, dropout)
        with contextlib.ExitStack() as swapped:
            if swap:
                counts = swapped.enter_context(use_cpu_kernels(model))
                assert counts["lora_linear"] > 0
                assert counts["dropout"] == (counts["lora_linear"] // 2 if dropout else 0)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            model.train()
            ids = torch.randint(20, 500, (2, 33), generator=torch.Generator().manual_seed(1))
            torch.manual_seed(5)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            kinds = {type(m) for m in model.modules()}
        return model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, kinds

    plain_model, plain, _ = model_and_grads(False, 0.0)
    fast_model, fast, fast_kinds = model_and_grads(True, 0.0)
    assert plain.keys() == fast.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert plain_model.state_dict().keys() == fast_model.state_dict().keys()
    assert RankLinear in fast_kinds
    # with dropout: checkpointing replays the same masks (the CPU RNG state is restored)
    _, dropped, dropped_kinds = model_and_grads(True, 0.1)
    assert GapDropout in dropped_kinds
    _, recomputed, _ = model_and_grads(True, 0.1, checkpointing=True)
    for name in dropped:
        torch.testing.assert_close(recomputed[name], dropped[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_swap_holds_within_the_block_only(tiny_models):
    model = lora_model(tiny_models("glm4"), 0.1)
    before = [(name, type(m)) for name, m in model.named_modules()]
    modules = dict(model.named_modules())
    with use_cpu_kernels(model) as counts:
        inside = {name: type(m) for name, m in model.named_modules()}
        assert sum(kind is RankLinear for kind in inside.values()) == counts["lora_linear"] > 0
        assert sum(kind is GapDropout for kind in inside.values()) == counts["dropout"] > 0
        assert dict(model.named_modules()) == modules  # the same module objects, their class swapped
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    assert not any(isinstance(m, (RankLinear, GapDropout)) for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"), use_cpu_kernels(model):
        raise RuntimeError("inside")
    assert [(name, type(m)) for name, m in model.named_modules()] == before


def test_the_saved_adapter_is_the_same_inside_and_after_the_block(tiny_models, tmp_path):
    model = lora_model(tiny_models("llama"), 0.1)
    model.save_pretrained(tmp_path / "plain")
    with use_cpu_kernels(model):
        model.save_pretrained(tmp_path / "inside")
    model.save_pretrained(tmp_path / "after")
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert plain and all("lora_" in name for name in plain)
    for folder in ("inside", "after"):
        saved = load_file(str(tmp_path / folder / "adapter_model.safetensors"))
        assert saved.keys() == plain.keys()
        for name, tensor in plain.items():
            assert torch.equal(saved[name], tensor), (folder, name)
        assert (tmp_path / folder / "adapter_config.json").read_text() == \
            (tmp_path / "plain" / "adapter_config.json").read_text()


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3])
def test_lora_add_equals_peft_s_formula_with_the_same_dropped_elements(p, monkeypatch):
    from chattune.training import kernels

    drawn = []
    real_positions = kernels.dropped_positions
    monkeypatch.setattr(kernels, "dropped_positions", lambda n, q: drawn.append(real_positions(n, q)) or drawn[-1])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 24, generator=g, requires_grad=True)
    base = torch.randn(2, 37, 40, generator=g, requires_grad=True)
    a = torch.randn(8, 24, generator=g, requires_grad=True)
    b = torch.randn(40, 8, generator=g, requires_grad=True)
    upstream = torch.randn(2, 37, 40, generator=g)
    torch.manual_seed(0)
    out = kernels.lora_add(base, x, a, b, 2.0, p)
    fused = torch.autograd.grad((out * upstream).sum(), (base, x, a, b))

    mask = torch.ones(x.numel())
    if p:
        mask[drawn[0]] = 0
        assert 0 < len(drawn[0]) < x.numel()
    dense = x * mask.view(x.shape) / (1 - p)
    expected = base + (dense @ a.t() @ b.t()) * 2.0
    reference = torch.autograd.grad((expected * upstream).sum(), (base, x, a, b))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("result", "x", "A", "B"), fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=name)  # values up to ~300


def test_lora_layers_outside_the_plain_cpu_case_keep_peft_s_forward(tiny_models):
    model = lora_model(tiny_models("llama"), 0.1)
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    x = torch.randn(3, layer.in_features)
    with use_cpu_kernels(model) as counts:
        assert counts["lora_layer"] > 0 and type(layer).__name__ == "FusedLoraLinear"
        assert layer._fusable_adapter(x, (), {}) == "default"
        assert layer._fusable_adapter(x.double(), (), {}) is None
        assert layer._fusable_adapter(x, (), {"adapter_names": ["default"] * 3}) is None
        with model.disable_adapter():
            assert layer._fusable_adapter(x, (), {}) is None
        layer.eval()
        torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.lora_B["default"](
            layer.lora_A["default"](x)) * layer.scaling["default"])


def test_lora_add_takes_a_non_contiguous_input():
    from chattune.training import kernels

    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, 2, 37, generator=g).transpose(0, 2).requires_grad_()  # [37, 2, 24], strided
    base = torch.randn(37, 2, 16, generator=g)
    a, b = torch.randn(8, 24, generator=g), torch.randn(16, 8, generator=g)
    torch.manual_seed(1)
    out = kernels.lora_add(base, x, a, b, 0.5, 0.1)
    torch.manual_seed(1)
    same = kernels.lora_add(base, x.detach().contiguous().requires_grad_(), a, b, 0.5, 0.1)
    torch.testing.assert_close(out, same)
    out.sum().backward()
    assert x.grad.shape == x.shape
