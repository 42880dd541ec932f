"""Gradient checkpointing's reentrant / non-reentrant choice and activation offloading: each reaches
the model and the step, and none changes the losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import chattune.training.trainer as trainer_module
from chattune.config_io import build_config, load_config
from chattune.errors import ConfigError
from chattune.training.memory_plan import estimate, format_plan
from chattune.training.recipe import train
from chattune.training.trainer import training_arguments

OPTIONS = {
    "plain": [],
    "checkpointing": ["gradient_checkpointing=true"],
    "reentrant": ["gradient_checkpointing=true", "gradient_checkpointing_reentrant=true"],
    "offload": ["offload_activations=true"],
    "checkpointing+offload": ["gradient_checkpointing=true", "offload_activations=true"],
}


class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu, counting the tensors it packs."""

    packed = 0

    def __init__(self, pin_memory: bool = False, device_type: str = "cuda"):
        super().__init__(pin_memory, device_type)
        pack = self.pack_hook

        def counted(tensor):
            CountingSaveOnCpu.packed += 1
            return pack(tensor)

        self.pack_hook = counted


def run(model: Path, data: Path, out: Path, extra: list[str], log=lambda *_: None):
    config = load_config(None, [f"model_name_or_path={model}", f"train_files=[{data}]", "max_seq_length=64",
                                "max_steps=3", "save_steps=10", "logging_steps=1", "learning_rate=1e-2",
                                "per_device_train_batch_size=4", "lora_dropout=0.0", "seed=3",
                                f"output_dir={out}", "report_to=[none]", *extra])
    result = train(config, log=log)
    losses = [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    return result, losses


def checkpoint_functions(model) -> list:
    return [layer._gradient_checkpointing_func for layer in model.get_base_model().model.layers
            if layer.gradient_checkpointing]


def test_each_option_reaches_the_model_and_keeps_the_losses(tiny_models, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    losses = {}
    for name, extra in OPTIONS.items():
        CountingSaveOnCpu.packed = 0
        lines: list[str] = []
        result, losses[name] = run(tiny_models("llama"), data_file, tmp_path / name, extra, lines.append)
        functions = checkpoint_functions(result.model)
        if "checkpointing" in name or name == "reentrant":
            assert len(functions) == 2  # both blocks, with the checkpoint as torch is told to run it
            assert {f.keywords["use_reentrant"] for f in functions} == {name == "reentrant"}
        else:
            assert functions == []
        assert (CountingSaveOnCpu.packed > 0) == ("offload" in name)  # every step's saved tensors went through it
        offload_note = "offload_activations: no GPU here; the activations are in CPU memory already (nothing moves)"
        assert (offload_note in lines) == ("offload" in name and not torch.cuda.is_available())
    assert len(losses["plain"]) == 3
    for name, values in losses.items():  # step 1: the forward; steps 2-3: after updates from the gradients
        assert values == pytest.approx(losses["plain"], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_the_trainer_is_told_which_checkpoint_to_use(reentrant):
    config = build_config({"gradient_checkpointing": True, "gradient_checkpointing_reentrant": reentrant,
                           "report_to": ["none"]})
    args = training_arguments(config, has_eval=False)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
    assert kwargs == {"use_reentrant": reentrant}


def test_reentrant_without_checkpointing_is_refused():
    with pytest.raises(ConfigError, match="gradient_checkpointing_reentrant: .* set gradient_checkpointing=true"):
        build_config({"gradient_checkpointing_reentrant": True})


def test_offloading_is_the_identity_context_when_off():
    with trainer_module.offloaded_activations(False):
        x = torch.ones(3, requires_grad=True)
        assert (x * x).grad_fn._saved_self is x  # saved as it is, no hook


def test_the_plan_moves_offloaded_activations_to_cpu_memory(tiny_models):
    def plan(**keys):
        config = build_config({"model_name_or_path": str(tiny_models("llama")), "max_seq_length": 256, **keys})
        return config, estimate(config)

    _, kept = plan(gradient_checkpointing=True)
    config, moved = plan(gradient_checkpointing=True, offload_activations=True)
    assert moved.activations < kept.activations
    assert moved.activations + moved.offloaded == pytest.approx(kept.activations)
    text = format_plan(moved, config)
    assert "gradient checkpointing (non-reentrant), activations offloaded to CPU" in text
    line = next(line for line in text.splitlines() if line.startswith("activations"))
    assert line.endswith(" offloaded to CPU memory)")
