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


def preference_config(tiny_models, method: str, **keys):
    """A tiny Llama run of ``method`` (a preference stage with ``stage=...`` among ``keys``)."""
    return build_config({"model_name_or_path": str(tiny_models("llama")), "method": method,
                         "per_device_train_batch_size": BATCH, "max_seq_length": SEQ, **keys})


@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "kto"])
def test_a_preference_step_carries_two_sequences_per_row(tiny_models, stage):
    """Chosen + rejected (kto: the answer + its KL answer), each up to max_seq_length: twice
    the activation tokens of the same SFT step; weights, gradients and optimizer unchanged."""
    sft = estimate(preference_config(tiny_models, "lora"))
    plan = estimate(preference_config(tiny_models, "lora", stage=stage))
    assert (sft.sequences_per_row, plan.sequences_per_row) == (1, 2)
    assert plan.tokens_per_step == 2 * sft.tokens_per_step == 2 * BATCH * SEQ
    assert plan.activations == 2 * sft.activations  # the per-token bytes are linear in the tokens
    assert (plan.weights, plan.gradients, plan.optimizer) == (sft.weights, sft.gradients, sft.optimizer)
    assert sft.reference is None and plan.stage == stage


@pytest.mark.parametrize(("method", "stage", "wanted", "used", "adapter_off"), [
    ("lora", "dpo", "auto", "adapter_off", True),
    ("ptuning", "kto", "auto", "adapter_off", True),
    ("lora", "dpo", "copy", "copy", True),
    ("full", "dpo", "auto", "precompute", False),
    ("freeze", "kto", "copy", "copy", False),
    ("full", "kto", "precompute", "precompute", False),
])
def test_reference_options_and_the_one_the_run_uses(tiny_models, method, stage, wanted, used, adapter_off):
    """adapter_off and precompute add nothing; copy adds the model's weights as held (a deep
    copy of the model); only the option used counts in the total."""
    plan = estimate(preference_config(tiny_models, method, stage=stage, pref_reference=wanted))
    ref = plan.reference
    assert ref.used == used
    assert ref.extra == {"adapter_off": 0.0 if adapter_off else None, "precompute": 0.0, "copy": plan.weights}
    assert plan.reference_bytes == (plan.weights if used == "copy" else 0.0)
    assert plan.total_bytes == (plan.weights + plan.gradients + plan.optimizer + plan.activations
                                + plan.reference_bytes)


@pytest.mark.parametrize(("method", "dtype_keys"), [("full", {}), ("lora", {"bf16": True}),
                                                    ("freeze", {"bf16": True}), ("ptuning", {"bf16": True})])
def test_the_copy_is_the_bytes_of_a_real_frozen_copy(tiny_models, method, dtype_keys):
    """Exact bytes: what ``pref_reference=copy`` adds equals the parameters of the frozen copy
    training makes (the load dtype, freeze's trained tensors too; new adapters float32)."""
    from chattune.training.preference import frozen_copy
    from chattune.training.recipe import load_for_training

    config = preference_config(tiny_models, method, stage="dpo", pref_reference="copy", **dtype_keys)
    plan = estimate(config)
    copy = frozen_copy(load_for_training(config, get_method(method))[0])
    held = sum(p.numel() * p.element_size() for p in copy.parameters())
    assert plan.reference.extra["copy"] == held == plan.reference_bytes
    if method == "full":
        assert held == plan.total * 4  # float32, every parameter
    if method == "lora":
        assert held == (plan.total - plan.trainable) * 2 + plan.trainable * 4  # bf16 base, float32 adapters


def test_freeze_in_bf16_trains_its_tensors_in_bf16(tiny_models):
    """Freeze trains base tensors as loaded: in a bf16 run their weights, gradients and AdamW
    states are bf16 (not float32, as adapters are): exact bytes against one real step."""
    from chattune.training.recipe import load_for_training

    config = preference_config(tiny_models, "freeze", bf16=True)
    plan = estimate(config)
    model, _ = load_for_training(config, get_method("freeze"))
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    real = measure_training_memory(model, {"input_ids": ids, "labels": ids}, optimizer)
    assert (plan.weights, plan.gradients, plan.optimizer) == (real["weights"], real["gradients"], real["optimizer"])


@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_orpo_and_simpo_have_no_reference(tiny_models, stage):
    plan = estimate(preference_config(tiny_models, "full", stage=stage, pref_reference="copy"))
    assert plan.reference is None and plan.reference_bytes == 0.0


def test_adapter_off_without_an_adapter_is_the_runs_config_error(tiny_models):
    from chattune.errors import ConfigError

    with pytest.raises(ConfigError, match="pref_reference: adapter_off is not possible"):
        estimate(preference_config(tiny_models, "full", stage="dpo", pref_reference="adapter_off"))


def _dry_run(capsys, *keys) -> list[str]:
    assert main(["train", *keys, f"per_device_train_batch_size={BATCH}", f"max_seq_length={SEQ}", "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_prints_the_reference_options_and_marks_the_one_used(tiny_models, capsys):
    from chattune.training.memory_plan import _gib

    model = f"model_name_or_path={tiny_models('llama')}"
    plan = estimate(preference_config(tiny_models, "full", stage="dpo", pref_reference="copy"))
    lines = _dry_run(capsys, model, "method=full", "stage=dpo", "pref_reference=copy")
    assert f"step       batch {BATCH} x 2 sequences (dpo: chosen + rejected) x {SEQ} tokens = {2 * BATCH * SEQ} " \
           "tokens, dtype torch.float32" in lines
    start = lines.index(f"reference  {_gib(plan.weights)}  (dpo: pref_reference=copy -> copy; * = this run's)")
    assert lines[start + 1:start + 5] == [
        "           adapter_off  not possible: the method trains the model's own weights (no adapter to switch off)",
        "           precompute   +0.00 GiB  one forward pass over the data before training",
        f"         * copy         +{_gib(plan.weights).strip()}  a frozen copy of the model's weights (float32)",
        f"total      {_gib(plan.total_bytes)}  (+ about 0.5-1 GiB CUDA context and allocator slack)"]

    lines = _dry_run(capsys, model, "method=lora", "stage=kto", "bf16=true")
    start = lines.index("reference      0.00 GiB  (kto: pref_reference=auto -> adapter_off; * = this run's)")
    assert lines[start + 1][:30] == "         * adapter_off  +0.00 "
    assert lines[start + 3].endswith("a frozen copy of the model's weights (bfloat16, adapters float32)")
    assert any(line.startswith(f"step       batch {BATCH} x 2 sequences (kto: answer + KL answer)") for line in lines)

    lines = _dry_run(capsys, model, "stage=orpo")
    assert "reference  none: orpo has no reference model" in lines
    assert not any("sequences" in line or "reference" in line for line in _dry_run(capsys, model))  # sft


def test_dry_run_of_a_run_started_from_a_lora_run(tiny_models, data_file, tmp_path, capsys):
    """From a LoRA run folder the plan is the run's base with its adapter; the adapter trains
    further, so switching it off is no reference: auto is precompute."""
    from chattune.training.recipe import train
    from tests.training.test_recipe import make_config

    run = train(make_config(tiny_models("llama"), data_file, tmp_path / "sft", max_steps=1, save_steps=1,
                            eval_fraction=0.0, report_to=["none"], lora_rank=4), log=lambda *_: None).output_dir
    lines = _dry_run(capsys, f"model_name_or_path={run}", "stage=dpo")
    assert f"start      from the run {run}: its adapter trains further (planned on its base)" in lines
    assert "reference      0.00 GiB  (dpo: pref_reference=auto -> precompute; * = this run's)" in lines
    assert ("           adapter_off  not possible: the run continues an adapter (switched off it gives the base)"
            in lines)
    fresh = estimate(preference_config(tiny_models, "lora", stage="dpo", lora_rank=4))
    assert f"method     lora: {fresh.trainable:,} trainable of {fresh.total:,} parameters " \
           f"({fresh.trainable / fresh.total:.3%})" in lines  # the run's rank 4 adapter on its base
    assert main(["train", f"model_name_or_path={run}", "stage=dpo", "pref_reference=adapter_off", "--dry-run"]) == 2
    assert "adapter_off is not possible: the run continues an adapter" in capsys.readouterr().err


def test_device_plans_hold_a_reference_copy_whole_on_every_device(tiny_models):
    plan = estimate(preference_config(tiny_models, "full", stage="dpo", pref_reference="copy"))
    sft = estimate(preference_config(tiny_models, "full", stage="dpo", pref_reference="precompute"))
    for with_copy, without in zip(device_plans(plan, 4), device_plans(sft, 4), strict=True):
        assert with_copy.weights == without.weights + plan.weights and with_copy.reference == plan.weights
    assert "Weights include the frozen reference copy" in format_devices(device_plans(plan, 4))
    assert "reference copy" not in format_devices(device_plans(sft, 4))
