"""The usual trainer flags, wired to transformers and peft: LoRA+ (the B matrices' learning rate in
their own optimizer group) and NEFTune (noise on the training embeddings only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.config_io import load_config
from chattune.errors import ConfigError
from chattune.training.recipe import train


def make_config(model: Path, data: Path, out: Path, **overrides):
    values = {"model_name_or_path": str(model), "train_files": [str(data)], "max_seq_length": 64, "lora_rank": 4,
              "lora_dropout": 0.0, "output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 1,
              "save_steps": 100, "logging_steps": 1, "learning_rate": 1e-3, "seed": 5, "report_to": ["none"]}
    values.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()])


def _quiet(*_):
    pass


def _largest(folder: Path, part: str) -> float:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return max(float(t.abs().max()) for name, t in tensors.items() if part in name)


def test_loraplus_moves_the_b_matrices_at_the_ratio(tiny_models, data_file, tmp_path):
    # B starts at zero and Adam's first step moves every element with a gradient by the learning rate
    plain = train(make_config(tiny_models("llama"), data_file, tmp_path / "plain"), log=_quiet)
    plus = train(make_config(tiny_models("llama"), data_file, tmp_path / "plus", loraplus_lr_ratio=16), log=_quiet)
    assert _largest(plain.output_dir, "lora_B") == pytest.approx(1e-3, rel=0.01)
    assert _largest(plus.output_dir, "lora_B") == pytest.approx(16e-3, rel=0.01)


def test_loraplus_needs_lora(tiny_models, data_file, tmp_path):
    with pytest.raises(ConfigError, match="loraplus_lr_ratio: .*method=freeze"):
        make_config(tiny_models("llama"), data_file, tmp_path / "f", method="freeze", loraplus_lr_ratio=16)


def test_neftune_noises_training_only(tiny_models, data_file, tmp_path):
    plain = train(make_config(tiny_models("llama"), data_file, tmp_path / "plain", eval_fraction=0.2, eval_steps=1),
                  log=_quiet)
    noisy = train(make_config(tiny_models("llama"), data_file, tmp_path / "noisy", eval_fraction=0.2, eval_steps=1,
                              neftune_noise_alpha=50), log=_quiet)
    a = load_file(str(plain.output_dir / "adapter_model.safetensors"))
    b = load_file(str(noisy.output_dir / "adapter_model.safetensors"))
    assert any(not torch.equal(a[name], b[name]) for name in a)  # the noise changed the gradients
    # after training no hook is left: the model's embeddings are deterministic in train mode too
    model = noisy.model.train()
    ids = torch.tensor([[3, 4, 5, 6]])
    embedding = model.get_input_embeddings()
    assert torch.equal(embedding(ids), embedding(ids))
    assert not embedding._forward_hooks


@pytest.mark.parametrize("key", ["neftune_noise_alpha", "loraplus_lr_ratio"])
def test_the_flags_refuse_values_that_are_not_positive(tiny_models, data_file, tmp_path, key):
    with pytest.raises(ConfigError, match=f"{key}: must be a finite number > 0"):
        make_config(tiny_models("llama"), data_file, tmp_path / "x", **{key: 0})


def test_early_stopping_stops_after_patience_evaluations_without_gain(tiny_models, data_file, tmp_path):
    lines = []
    # no evaluation can gain 10 nats: the first sets the best, the next two do not improve on it
    result = train(make_config(tiny_models("llama"), data_file, tmp_path / "early", max_steps=20, eval_fraction=0.2,
                               eval_steps=1, save_steps=2, early_stopping_patience=2, early_stopping_threshold=10),
                   log=lines.append)
    assert result.global_step == 3
    assert any(line.startswith("early stopping at step 3: eval_loss") for line in lines)
    assert (result.output_dir / "checkpoint-2").is_dir()  # checkpoints written before stay


def test_early_stopping_watches_a_higher_is_better_metric():
    from types import SimpleNamespace

    from chattune.training.callbacks import EarlyStopping

    watch = EarlyStopping("eval_rouge-l", patience=1, log=lambda _: None)
    control = SimpleNamespace(should_training_stop=False)
    for value in (10.0, 12.0, 13.0):
        watch.on_evaluate(None, SimpleNamespace(global_step=1), control, metrics={"eval_rouge-l": value})
        assert not control.should_training_stop
    watch.on_evaluate(None, SimpleNamespace(global_step=4), control, metrics={"eval_rouge-l": 12.5})
    assert control.should_training_stop


def test_early_stopping_needs_eval_data(tiny_models, data_file, tmp_path):
    with pytest.raises(ConfigError, match="early_stopping_patience: needs eval data"):
        make_config(tiny_models("llama"), data_file, tmp_path / "e", early_stopping_patience=2)


@pytest.mark.parametrize("optim, kind", [("rmsprop", "RMSprop"), ("adagrad", "Adagrad")])
def test_more_of_transformers_optimizers_train(tiny_models, data_file, tmp_path, optim, kind):
    result = train(make_config(tiny_models("llama"), data_file, tmp_path / optim, optim=optim), log=_quiet)
    args = torch.load(result.output_dir / "training_args.bin", weights_only=False)
    assert args.optim == optim and result.global_step == 1
    assert _largest(result.output_dir, "lora_B") > 0  # it stepped
    from transformers import Trainer

    assert Trainer.get_optimizer_cls_and_kwargs(args)[0].__name__ == kind


def test_an_optimizer_whose_package_is_missing_is_refused_before_the_model_loads(tiny_models, data_file, tmp_path,
                                                                                monkeypatch):
    import importlib.util

    import chattune.training.recipe as recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "galore_torch" else real(name, *a))
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    config = make_config(tiny_models("llama"), data_file, tmp_path / "g", optim="galore_adamw",
                         optim_target_modules=["attn", "mlp"])
    with pytest.raises(ConfigError, match=r"optim: galore_adamw needs the galore-torch package.*pip install galore-torch"):
        train(config, log=_quiet)


def test_galore_and_apollo_need_their_target_modules(tiny_models, data_file, tmp_path):
    with pytest.raises(ConfigError, match="optim_target_modules: apollo_adamw projects"):
        make_config(tiny_models("llama"), data_file, tmp_path / "a", optim="apollo_adamw")
