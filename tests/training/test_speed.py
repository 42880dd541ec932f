"""Training speed features end to end: packing by default (checked, with a fallback), the
same eval loss with and without packing, each option (bf16, fp16, gradient checkpointing,
torch.compile, padding-free, length-grouped) trains, and the model comes back unpatched.
(The token-weighted eval loss is checked in tests/training/test_trainer.py, the CPU kernels in
tests/training/test_kernels.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import chattune.training.batching
import chattune.training.loss
import chattune.training.recipe
from chattune.demo import demo_records
from chattune.errors import ConfigError
from chattune.training.recipe import train
from tests.training.test_recipe import make_config

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
    assert_unpatched(result.model)


def assert_unpatched(model):
    """The model a run returns has every patch of training undone: its own head forward,
    PyTorch's dropout and linear classes, transformers' SDPA."""
    from chattune.training.kernels import GapDropout, RankLinear

    head = model.get_output_embeddings()
    assert head.forward.__self__ is head and "forward" not in head.__dict__
    assert not any(isinstance(m, (GapDropout, RankLinear)) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


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


@pytest.mark.parametrize("option", [
    {"bf16": "true"},
    pytest.param({"fp16": "true"}, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="fp16 is refused on CPU (tests/training/test_faults.py)")]),
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
    assert_unpatched(result.model)
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
    configured = chattune.training.recipe.training_arguments

    def aot_eager(*args, **kwargs):
        arguments = configured(*args, **kwargs)
        assert arguments.torch_compile and arguments.torch_compile_backend == "inductor"
        arguments.torch_compile_backend = "aot_eager"
        return arguments

    monkeypatch.setattr(chattune.training.recipe, "training_arguments", aot_eager)
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
    monkeypatch.setattr(chattune.training.batching, "check_packed_attention", lambda *a, **k: "rows attend to each other")
    monkeypatch.setattr(chattune.training.loss, "check_head_logits", lambda *a, **k: "logits are soft-capped")
    _, _, batching, log = run(tiny_models, demo_files, tmp_path / "auto", max_steps=1)
    assert batching["mode"] == "group_by_length" and batching["loss"] == "plain"
    assert "rows attend to each other" in log and "soft-capped" in log
    with pytest.raises(ConfigError, match="packing: pack is not possible here: rows attend"):
        run(tiny_models, demo_files, tmp_path / "pack", max_steps=1, packing="pack")
    with pytest.raises(ConfigError, match="loss: chunked is not possible"):
        run(tiny_models, demo_files, tmp_path / "chunked", max_steps=1, packing="pad", loss="chunked")
