"""Reward models (``stage: rm``) end to end on a tiny model: the Bradley-Terry loss as TRL
computes it, rewards logged, the run folder's manifest, audit and head, exact resume, the
freeze and full methods, and what the stage refuses."""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from chattune.errors import ConfigError
from chattune.training.preference_loss import reward_model_losses
from chattune.training.recipe import train
from tests.conftest import reward_config

QUIET = {"log": lambda *_: None}


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _trl_loss(chosen: torch.Tensor, rejected: torch.Tensor, coef: float | None) -> torch.Tensor:
    """TRL RewardTrainer.compute_loss run on rewards given as the model's logits."""
    from trl import RewardTrainer

    logits = torch.cat([chosen, rejected])[:, None]
    accelerator = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=accelerator,
                           args=SimpleNamespace(center_rewards_coefficient=coef), _total_train_tokens=0,
                           _tp_size=1, _metrics={"eval": defaultdict(list), "train": defaultdict(list)})
    inputs = {"input_ids": torch.zeros((len(logits), 1), dtype=torch.long),
              "attention_mask": torch.ones((len(logits), 1), dtype=torch.long)}
    return RewardTrainer.compute_loss(fake, lambda **_: SimpleNamespace(logits=logits), inputs)


@pytest.mark.parametrize("coef", [None, 0.01, 0.5])
def test_loss_is_trls_reward_trainer_loss(coef):
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=generator) * 3, torch.randn(6, generator=generator) * 3
    ours = reward_model_losses(chosen, rejected, center_coef=coef or 0.0)
    assert float(ours.losses.mean()) == pytest.approx(float(_trl_loss(chosen, rejected, coef)), rel=1e-6)
    plain = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    centre = (coef or 0.0) * torch.mean((chosen + rejected) ** 2)
    assert float(ours.losses.mean()) == pytest.approx(float(plain + centre), rel=1e-6)
    torch.testing.assert_close(ours.chosen_rewards, chosen)


def test_rm_logs_rewards_and_learns_the_pairs(rm_run):
    rows = _metrics(rm_run.output_dir)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 8
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert all(key in r and math.isfinite(r[key]) for r in steps), key
    for r in steps:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-4)
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and all("eval_rewards/accuracies" in r and "eval_rewards/margins" in r for r in evals)
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_loss"] < math.log(2)


def test_rm_run_folder_records_the_stage_and_saves_the_head(rm_run):
    folder = rm_run.output_dir
    manifest = json.loads((folder / "chattune.json").read_text())
    assert manifest["stage"] == {"name": "rm", "rm_center_coef": 0.0, "reference": None, "head": "score", "seed": 3}
    audit = json.loads((folder / "data_audit.json").read_text())
    assert audit["stage"] == "rm" and audit["kind"] == "paired" and audit["train"]["rows_out"] == 36
    assert audit["eval"]["rows_out"] == 12 and audit["batching"]["loss"] == "reward (Bradley-Terry)"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    weights = load_file(folder / "adapter_model.safetensors")
    head = [k for k in weights if ".score." in k or k.endswith("score.weight")]
    assert head and weights[head[0]].shape == (1, 64)
    assert any("lora_A" in k for k in weights)
    assert (folder / "checkpoint-4").is_dir() and (folder / "checkpoint-8").is_dir()


def test_resume_gives_the_uninterrupted_head_and_adapter(tiny_models, reward_pairs, rm_run, tmp_path):
    copy = tmp_path / "resumed"
    copy.mkdir()
    shutil.copytree(rm_run.output_dir / "checkpoint-4", copy / "checkpoint-4")
    train(reward_config(tiny_models("llama"), reward_pairs["train"], copy, resume_from_checkpoint="true"), **QUIET)
    resumed = load_file(copy / "adapter_model.safetensors")
    whole = load_file(rm_run.output_dir / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method,extra", [("freeze", {"freeze_trainable_layers": 1}), ("full", {})])
def test_freeze_and_full_train_the_head_and_load_back(tiny_models, reward_pairs, tmp_path, method, extra):
    from chattune.inference.reward import load_reward_model

    result = train(reward_config(tiny_models("llama"), reward_pairs["train"], tmp_path / method, method=method,
                                 max_steps=2, save_steps=2, eval_fraction=0.0, learning_rate=1e-3, **extra), **QUIET)
    folder = result.output_dir
    if method == "freeze":
        trained = json.loads((folder / "freeze_config.json").read_text())["trained_tensors"]
        assert "score.weight" in trained
    else:
        assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    scorer = load_reward_model(folder)
    assert scorer.name == method
    conv = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "cat dog yes"}]
    ids = scorer.encode(conv)
    with torch.no_grad():
        from chattune.inference.reward import sequence_rewards

        result.model.eval()
        expected = sequence_rewards(result.model, torch.tensor([ids]), torch.ones((1, len(ids)), dtype=torch.long))
    assert scorer.score([conv]) == pytest.approx(expected.tolist(), abs=1e-5)


def test_center_coef_is_recorded_in_the_manifest(tiny_models, reward_pairs, tmp_path):
    result = train(reward_config(tiny_models("llama"), reward_pairs["train"], tmp_path / "c", rm_center_coef=0.5,
                                 max_steps=2, save_steps=2, eval_fraction=0.0), **QUIET)
    assert json.loads((result.output_dir / "chattune.json").read_text())["stage"]["rm_center_coef"] == 0.5


@pytest.mark.parametrize("overrides,match", [
    ({"rm_center_coef": -1}, "rm_center_coef: must be a finite number >= 0"),
    ({"method": "ptuning"}, "stage: rm trains a reward head"),
])
def test_refusals_name_the_key(tiny_models, reward_pairs, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        train(reward_config(tiny_models("llama"), reward_pairs["train"], tmp_path / "x", **overrides), **QUIET)


def test_rm_cannot_continue_a_lora_run(tiny_models, reward_pairs, data_file, tmp_path):
    sft = train(reward_config(tiny_models("llama"), data_file, tmp_path / "sft", stage="sft", max_steps=1,
                              save_steps=1, eval_fraction=0.0), **QUIET)
    with pytest.raises(ConfigError, match="merge it first"):
        train(reward_config(str(sft.output_dir), reward_pairs["train"], tmp_path / "rm"), **QUIET)
