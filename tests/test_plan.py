"""``train --dry-run``: the memory estimate against what one real step holds."""

from __future__ import annotations

import pytest
import torch

from chattune.cli import main
from chattune.config_io import build_config
from chattune.methods import get_method
from chattune.plan import estimate

BATCH, SEQ = 2, 96


def measure_training_memory(model, batch: dict, optimizer) -> dict:
    """Bytes actually held in one training step: parameters, gradients, optimizer state,
    and the tensors autograd saved for backward (counted by storage, parameters excluded)."""
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    activations = sum(n for ptr, n in saved.items() if ptr not in param_ptrs)
    loss.backward()
    optimizer.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.ndim > 0)
    return {"weights": params, "gradients": grads, "optimizer": state, "activations": activations}


def measured(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(config.model.model_name_or_path)
    model.config.use_cache = False
    model = get_method(config.method.method).apply(model, config.method, False)
    model.train()
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return measure_training_memory(model, {"input_ids": ids, "labels": ids}, optimizer)


@pytest.mark.parametrize("arch", ["glm4", "llama"])
@pytest.mark.parametrize("method", ["lora", "freeze", "ptuning", "full"])
def test_estimate_matches_one_measured_step(arch, method, tiny_models):
    """Weights, gradients and optimizer state within 1%; activations within 10%
    (per-block coefficients fitted on Llama and GLM-4 blocks); total within 10%."""
    config = build_config({"model_name_or_path": str(tiny_models(arch)), "method": method,
                           "per_device_train_batch_size": BATCH, "max_seq_length": SEQ, "lora_dropout": 0.0})
    plan = estimate(config)
    real = measured(config)
    for part in ("weights", "gradients", "optimizer"):
        assert getattr(plan, part) == pytest.approx(real[part], rel=0.01), part
    assert plan.activations == pytest.approx(real["activations"], rel=0.10)
    assert plan.total_bytes == pytest.approx(sum(real.values()), rel=0.10)


def test_dry_run_prints_the_plan_and_loads_no_weights(tiny_models, tmp_path, capsys):
    model_dir = tmp_path / "config-only"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((tiny_models("llama") / "config.json").read_text())
    assert main(["train", f"model_name_or_path={model_dir}", "method=freeze", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method     freeze:" in out and "trainable of" in out
    for part in ("weights", "gradients", "optimizer", "activations", "total"):
        assert part in out


def test_qlora_dry_run_works_without_cuda(tiny_models, capsys):
    assert main(["train", f"model_name_or_path={tiny_models('llama')}", "method=qlora", "--dry-run"]) == 0
    assert "method     qlora:" in capsys.readouterr().out
