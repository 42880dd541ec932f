"""``train --dry-run``: the memory estimate against what one real step holds."""

from __future__ import annotations

import pytest
import torch

from chattune.cli import main
from chattune.config_io import build_config
from chattune.methods import get_method
from chattune.training.memory_plan import BACKENDS, device_plans, estimate, format_devices

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


def tiny_plan(tiny_models, arch: str, method: str, **keys):
    """The one-device plan of a tiny model, and the numel of its largest block, of everything
    outside its blocks and of its embedding, counted on the real (loaded) model."""
    from transformers import AutoModelForCausalLM

    from chattune.methods import block_list

    config = build_config({"model_name_or_path": str(tiny_models(arch)), "method": method,
                           "per_device_train_batch_size": BATCH, "max_seq_length": SEQ, **keys})
    model = get_method(method).apply(AutoModelForCausalLM.from_pretrained(config.model.model_name_or_path),
                                     config.method, False)
    blocks = block_list(model)
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    embedding = max(model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel())
    return estimate(config), block, outside, embedding


@pytest.mark.parametrize("nproc", [1, 2, 4, 8])
def test_device_plans_full_float32(tiny_models, nproc):
    """Full fine-tuning in float32 (4 bytes everywhere), AdamW: exact per-device arithmetic."""
    plan, block, outside, embedding = tiny_plan(tiny_models, "llama", "full")
    p = plan.trainable
    rows = {d.backend: d for d in device_plans(plan, nproc)}
    assert list(rows) == list(BACKENDS)
    ddp, fsdp, zero2, zero3 = rows["ddp"], rows["fsdp"], rows["zero2"], rows["zero3"]
    # DDP: the one-device plan, plus its all-reduce buckets: a second copy of the gradients
    assert (ddp.weights, ddp.optimizer, ddp.activations) == (plan.weights, plan.optimizer, plan.activations)
    assert ddp.gradients == 2 * plan.gradients and ddp.gathered == 0
    # ZeRO-2: weights replicated; gradients 1/N; optimizer = (float32 master + the states) / N
    assert zero2.weights == plan.weights and zero2.gathered == 0
    assert zero2.gradients == pytest.approx(plan.gradients / nproc, rel=1e-12)
    assert zero2.optimizer == pytest.approx((p * 4 + plan.optimizer) / nproc, rel=1e-12)
    assert plan.optimizer == p * 2 * 4  # AdamW's two float32 states: the ZeRO states are that / N
    # FSDP full_shard: all three 1/N; gathered = the root unit + two blocks
    assert fsdp.gathered == (outside + 2 * block) * 4
    assert fsdp.weights == pytest.approx(plan.weights / nproc + fsdp.gathered, rel=1e-12)
    assert fsdp.gradients == pytest.approx(plan.gradients / nproc, rel=1e-12)
    assert fsdp.optimizer == pytest.approx(plan.optimizer / nproc, rel=1e-12)
    # ZeRO-3: all three 1/N; gathered = a block and the larger of a block and the embedding/head
    assert plan.total - 2 * block == outside and outside >= 2 * embedding  # embedding and head
    assert zero3.gathered == (block + max(block, embedding)) * 4
    assert zero3.weights == pytest.approx(plan.weights / nproc + zero3.gathered, rel=1e-12)
    assert zero3.gradients == zero2.gradients and zero3.optimizer == zero2.optimizer
    for d in rows.values():
        assert d.activations == plan.activations  # per device, never sharded
        assert d.total_bytes == d.weights + d.gradients + d.optimizer + d.activations
    if nproc >= 2:
        assert ddp.total_bytes >= zero2.total_bytes >= zero3.total_bytes
        assert ddp.total_bytes >= fsdp.total_bytes


@pytest.mark.parametrize("arch", ["glm4", "llama"])
def test_device_plans_full_bf16(tiny_models, arch):
    """bf16: DeepSpeed holds bf16 weights and gradients and float32 master + states; accelerate
    upcasts FSDP's trainable flat parameters to float32; gathered parameters are bf16."""
    plan, block, outside, _ = tiny_plan(tiny_models, arch, "full", bf16=True)
    p, n = plan.trainable, 4
    assert plan.weights == p * 2 and plan.optimizer == p * 2 * 2  # one device: pure bf16 AdamW
    rows = {d.backend: d for d in device_plans(plan, n)}
    assert rows["zero2"].weights == p * 2
    assert rows["zero2"].gradients == pytest.approx(p * 2 / n, rel=1e-12)
    assert rows["zero2"].optimizer == pytest.approx(p * 12 / n, rel=1e-12)
    assert rows["fsdp"].gathered == (outside + 2 * block) * 2
    assert rows["fsdp"].weights == pytest.approx(p * 4 / n + rows["fsdp"].gathered, rel=1e-12)
    assert rows["fsdp"].optimizer == pytest.approx(p * 8 / n, rel=1e-12)
    assert rows["zero3"].weights == pytest.approx(p * 2 / n + rows["zero3"].gathered, rel=1e-12)
    totals = [rows[b].total_bytes for b in ("ddp", "zero2", "zero3")]
    assert totals == sorted(totals, reverse=True)


def test_device_plans_lora_shard_the_frozen_base(tiny_models):
    """LoRA: ZeRO-2 leaves the (frozen) weights replicated; full_shard and ZeRO-3 shard them."""
    plan, _, _, _ = tiny_plan(tiny_models, "llama", "lora", lora_dropout=0.0)
    rows = {d.backend: d for d in device_plans(plan, 4)}
    assert rows["zero2"].weights == plan.weights
    frozen = plan.weights - plan.trainable * 4  # adapters are float32
    assert rows["zero3"].weights == pytest.approx((frozen + plan.trainable * 4) / 4 + rows["zero3"].gathered)
    assert rows["zero3"].total_bytes < rows["zero2"].total_bytes


def test_device_plans_need_an_estimate_and_a_positive_n(tiny_models):
    plan, _, _, _ = tiny_plan(tiny_models, "llama", "freeze")
    with pytest.raises(ValueError, match="nproc"):
        device_plans(plan, 0)
    text = format_devices(device_plans(plan, 1))
    assert "N = 1" in text and all(label in text for label in BACKENDS.values())


def test_dry_run_nproc_prints_the_table(tiny_models, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_models('glm4')}\nmethod: full\nbf16: true\n")
    assert main(["train", str(config), "--dry-run", "--nproc", "4"]) == 0
    out = capsys.readouterr().out
    assert "method     full:" in out and "per device, N = 4" in out
    rows = [line.split() for line in out.splitlines()]
    for label in BACKENDS.values():
        row = next(r for r in rows if " ".join(r[: len(label.split())]) == label)
        values = [float(v) for v in row[len(label.split()):]]
        assert len(values) == 5 and values[4] == pytest.approx(sum(values[:4]), abs=0.02)


@pytest.mark.parametrize("method", ["lora", "qlora", "ptuning"])
def test_dry_run_nproc_every_method(tiny_models, method, capsys):
    assert main(["train", f"model_name_or_path={tiny_models('glm4')}", f"method={method}", "--dry-run",
                 "--nproc", "2"]) == 0
    assert "ZeRO-3" in capsys.readouterr().out


def test_dry_run_nproc_zero_is_a_config_error(tiny_models, capsys):
    assert main(["train", f"model_name_or_path={tiny_models('llama')}", "--dry-run", "--nproc", "0"]) == 2
    captured = capsys.readouterr()
    assert "--nproc" in captured.err and "per device" not in captured.out



@pytest.mark.parametrize(("model", "message"), [
    ("", "model_name_or_path: no base model given"),
    ("afile", "could not load the config '{t}/afile': it is a file; expected a model folder"),
    ("missing", "could not load the config '{t}/missing': no such folder"),
])
def test_dry_run_without_a_usable_model_is_one_line(model, message, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    path = str(tmp_path / model) if model else ""
    assert main(["train", f"model_name_or_path={path}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("chattune: error: " + message.format(t=tmp_path)), err

def test_overrides_may_follow_the_options(tiny_models, tmp_path, capsys):
    """``chattune train CFG --nproc 2 max_seq_length=64``: the key=value after an option still counts."""
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_models('glm4')}\n")
    assert main(["train", str(config), "--dry-run", "--nproc", "2", "max_seq_length=64"]) == 0
    assert "batch 4 x 64 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", str(config), "--dry-run", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
