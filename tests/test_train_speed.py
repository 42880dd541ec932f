"""Training speed features end to end: packing by default (checked, with a fallback), the
same eval loss with and without packing, a token-weighted eval loss however rows are
batched, and each option (bf16, fp16, gradient checkpointing, torch.compile, padding-free,
length-grouped) trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chattune import train as train_module
from chattune.config import ConfigError
from chattune.demo import demo_records
from chattune.train import train
from tests.test_train import make_config

PACK_VS_PAD_TOLERANCE = 0.02  # relative difference of the final eval loss, packed vs padded


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> tuple[Path, Path]:
    taught, held_out = demo_records()
    root = tmp_path_factory.mktemp("speed-data")
    (root / "train.json").write_text(json.dumps(taught, ensure_ascii=False))
    (root / "eval.json").write_text(json.dumps(held_out, ensure_ascii=False))
    return root / "train.json", root / "eval.json"


def run(tiny_models, demo_files, out: Path, arch="llama", **overrides):
    train_file, eval_file = demo_files
    values = {"eval_fraction": 0.0, "report_to": ["none"], "max_steps": 4, "save_steps": 100,
              "logging_steps": 1, **overrides}
    config = make_config(tiny_models(arch), train_file, out, **values)
    if "eval_files" not in overrides:
        config.data.eval_files = []
    logged: list[str] = []
    result = train(config, log=logged.append)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    batching = json.loads((out / "data_audit.json").read_text())["batching"]
    return result, [r["loss"] for r in rows if "loss" in r], batching, "\n".join(logged)


def test_default_packs_checks_and_chunks(tiny_models, demo_files, tmp_path):
    result, losses, batching, log = run(tiny_models, demo_files, tmp_path / "out", arch="glm4")
    assert batching["mode"] == "pack" and batching["loss"] == "chunked"
    plan = batching["train"]
    assert plan["fill"] > 0.9 and plan["rows"] == 37 and plan["pack_length"] == 96
    assert plan["steps"] == 10  # 37 rows, 4 a step, as unpacked
    assert "packing: 37 rows into" in log
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    assert result.model.get_output_embeddings().forward.__self__ is result.model.get_output_embeddings()


def test_packed_and_padded_training_end_at_the_same_eval_loss(tiny_models, demo_files, tmp_path):
    """Same data, seed and schedule: the held-out eval loss falls from ln(vocabulary) (6.8) to
    about 4.6 either way, and the two end within PACK_VS_PAD_TOLERANCE (observed: under 0.6%,
    as much as changing the seed moves either)."""
    import math

    _, eval_file = demo_files
    common = {"method": "full", "max_steps": 40, "eval_steps": 40, "learning_rate": 2e-3,
              "eval_files": [str(eval_file)]}
    packed, _, pack_batching, _ = run(tiny_models, demo_files, tmp_path / "pack", packing="pack", **common)
    padded, _, pad_batching, _ = run(tiny_models, demo_files, tmp_path / "pad", packing="pad", **common)
    assert pack_batching["mode"] == "pack" and pad_batching["mode"] == "pad"
    assert packed.global_step == padded.global_step == 40
    untrained = math.log(packed.model.config.vocab_size)
    assert packed.eval_loss < untrained - 1.5 and padded.eval_loss < untrained - 1.5
    assert abs(packed.eval_loss - padded.eval_loss) / padded.eval_loss < PACK_VS_PAD_TOLERANCE, \
        (packed.eval_loss, padded.eval_loss)


def test_eval_loss_is_token_weighted_whatever_the_batching(tiny_models, demo_files, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chattune.data.encode import IGNORE_INDEX
    from chattune.data.prepare import prepare_data
    from chattune.loss import CausalLMLoss, HeadCapture, output_layer
    from chattune.model import load_tokenizer
    from chattune.train import ChattuneTrainer, build_batches, training_arguments

    train_file, eval_file = demo_files
    model_path = tiny_models("glm4")
    config = make_config(model_path, train_file, tmp_path / "eval", eval_fraction=0.0,
                         eval_files=[str(eval_file)], per_device_eval_batch_size=3, report_to=["none"])
    tokenizer = load_tokenizer(str(model_path))
    prepared = prepare_data(config.data, tokenizer, "tokenizer", 7)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for row in prepared.eval:
            logits = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
            labels = torch.tensor(row["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits[:-1], labels, ignore_index=IGNORE_INDEX,
                                                       reduction="sum").item()
            count += (labels != IGNORE_INDEX).sum().item()
    expected = total / count
    got = {}
    for mode in ("pack", "padding_free", "group_by_length", "pad"):
        for chunked in (False, True):
            batches = build_batches(mode, prepared, config, tokenizer.pad_token_id, flatten=False)
            capture = HeadCapture(output_layer(model)) if chunked else None
            trainer = ChattuneTrainer(model=model, args=training_arguments(config, True, batches),
                                      eval_dataset=batches.eval, data_collator=batches.collator,
                                      compute_loss_func=CausalLMLoss(capture, 7))
            if capture:
                capture.install()
            try:
                got[mode, chunked] = trainer.evaluate()["eval_loss"]
            finally:
                if capture:
                    capture.remove()
    for key, value in got.items():
        assert value == pytest.approx(expected, rel=1e-5), (key, got, expected)


@pytest.mark.parametrize("option", [
    {"bf16": "true"},
    {"fp16": "true"},
    {"gradient_checkpointing": "true"},
    {"packing": "padding_free"},
    {"packing": "group_by_length"},
    {"loss": "plain", "gradient_accumulation_steps": 2},
])
def test_each_option_trains(option, tiny_models, demo_files, tmp_path):
    result, losses, batching, _ = run(tiny_models, demo_files, tmp_path / "out", max_steps=6,
                                      learning_rate=5e-3, **option)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[3:]) < losses[0]
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    if "packing" in option:
        assert batching["mode"] == option["packing"]
    base = result.model.get_base_model()
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers 4
        checkpointing = base.is_gradient_checkpointing
    assert checkpointing == ("gradient_checkpointing" in option)
    frozen = next(p for name, p in base.named_parameters() if "lora_" not in name and "layers" in name)
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}
    assert frozen.dtype == next((expected[k] for k in option if k in expected), torch.float32)


def test_torch_compile_trains(tiny_models, demo_files, tmp_path, monkeypatch):
    # aot_eager: dynamo + AOTAutograd as inductor sees them, without a minute of C++ codegen
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "aot_eager")
    result, losses, batching, _ = run(tiny_models, demo_files, tmp_path / "out", torch_compile="true",
                                      max_steps=4, learning_rate=5e-3)
    assert batching["mode"] == "pack" and len(losses) == 4
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.slow
def test_torch_compile_with_inductor_trains(tiny_models, demo_files, tmp_path):
    _, losses, _, _ = run(tiny_models, demo_files, tmp_path / "out", torch_compile="true", max_steps=4,
                          learning_rate=5e-3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_ptuning_falls_back_to_length_grouping(tiny_models, demo_files, tmp_path):
    _, losses, batching, log = run(tiny_models, demo_files, tmp_path / "out", method="ptuning", max_steps=2)
    assert batching["mode"] == "group_by_length" and "KV prefix" in log
    train_file, _ = demo_files
    with pytest.raises(ConfigError, match="packing: pack is not possible with method=ptuning"):
        make_config(tiny_models("llama"), train_file, tmp_path / "x", method="ptuning", packing="pack")


def test_a_model_that_mixes_packed_rows_is_never_packed(tiny_models, demo_files, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "check_packed_attention", lambda *a, **k: "rows attend to each other")
    monkeypatch.setattr(train_module, "check_head_logits", lambda *a, **k: "logits are soft-capped")
    _, _, batching, log = run(tiny_models, demo_files, tmp_path / "auto", max_steps=1)
    assert batching["mode"] == "group_by_length" and batching["loss"] == "plain"
    assert "rows attend to each other" in log and "soft-capped" in log
    with pytest.raises(ConfigError, match="packing: pack is not possible here: rows attend"):
        run(tiny_models, demo_files, tmp_path / "pack", max_steps=1, packing="pack")
    with pytest.raises(ConfigError, match="loss: chunked is not possible"):
        run(tiny_models, demo_files, tmp_path / "chunked", max_steps=1, packing="pad", loss="chunked")


def test_cpu_dropout_mask_has_nn_dropouts_distribution():
    from chattune.kernels import dropout_mask

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
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chattune.kernels import GapDropout, RankLinear, use_cpu_kernels

    path = tiny_models("glm4")  # built (with its own seeding) before the seeded runs

    def model_and_grads(swap: bool, dropout: float, checkpointing: bool = False):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout,
                                                init_lora_weights=False))
        if swap:
            counts = use_cpu_kernels(model)
            assert counts["lora_linear"] > 0 and counts["dropout"] == (counts["lora_linear"] // 2 if dropout else 0)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        ids = torch.randint(20, 500, (2, 33), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain_model, plain = model_and_grads(False, 0.0)
    fast_model, fast = model_and_grads(True, 0.0)
    assert plain.keys() == fast.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert plain_model.state_dict().keys() == fast_model.state_dict().keys()
    assert any(isinstance(m, RankLinear) for m in fast_model.modules())
    # with dropout: checkpointing replays the same masks (the CPU RNG state is restored)
    dropped_model, dropped = model_and_grads(True, 0.1)
    assert any(isinstance(m, GapDropout) for m in dropped_model.modules())
    _, recomputed = model_and_grads(True, 0.1, checkpointing=True)
    for name in dropped:
        torch.testing.assert_close(recomputed[name], dropped[name], rtol=1e-4, atol=1e-6, msg=name)
