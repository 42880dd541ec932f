"""Stage grpo end to end on a tiny model through ``train()``: it learns what a reward asks, logs
its rewards, KL and completion lengths (train and eval), writes a run folder that loads like any
other, resumes exactly, and a bad reward stops it naming the function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.config_io import load_config
from chattune.errors import ConfigError, TrainingError
from chattune.training.recipe import train

REWARDS = '''
def even(completion_ids, **kwargs):
    """The share of a completion's tokens whose id is even."""
    return [sum(i % 2 == 0 for i in ids) / len(ids) for ids in completion_ids]

def boom(completions, **kwargs):
    raise ValueError("the grader is down")

def nan(completions, **kwargs):
    return [float("nan")] * len(completions)
'''


def make_config(model: Path, data: Path, out: Path, **overrides):
    values = {
        "model_name_or_path": str(model), "train_files": [str(data)], "stage": "grpo", "max_seq_length": 48,
        "num_generations": 4, "max_completion_length": 8, "per_device_train_batch_size": 2, "lora_dropout": 0.0,
        "output_dir": str(out), "max_steps": 4, "save_steps": 2, "logging_steps": 1, "learning_rate": 5e-2,
        "seed": 3, "report_to": ["none"], "lr_scheduler_type": "constant",
    }
    values.update(overrides)
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grpo-data")
    rows = [{"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}
            for a in range(1, 5) for b in range(1, 7)]
    (folder / "sums.json").write_text(json.dumps(rows))
    (folder / "rewards.py").write_text(REWARDS)
    return folder / "sums.json"


def _rewards(prompts: Path, name: str) -> str:
    return f"{prompts.parent / 'rewards.py'}:{name}"


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learned(tiny_models, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "out"
    # 4 prompts x 8 completions a step: with fewer, the climb depends on the CPU's rounding (2 x 4 reached
    # 0.73 on one machine and 1.0 on another); with these, six seeds all reach 1.0 by step 9.
    config = make_config(tiny_models("llama"), prompts, out, method="full", max_steps=12, save_steps=12,
                         per_device_train_batch_size=4, num_generations=8, grpo_beta=0.0, eval_fraction=0.2, eval_steps=12, per_device_eval_batch_size=2,
                         reward_funcs=[_rewards(prompts, "even"), "format"], reward_weights=[1.0, 0.0])
    return train(config, log=lambda *_: None)


def test_grpo_raises_the_reward_it_is_given(learned):
    rewards = [row["rewards/even/mean"] for row in _metrics(learned.output_dir) if "loss" in row]
    assert len(rewards) == 12
    assert sum(rewards[:3]) / 3 < 0.65
    assert sum(rewards[-3:]) / 3 > 0.9  # the model learned to say even token ids


def test_grpo_logs_rewards_kl_lengths_train_and_eval(learned):
    rows = _metrics(learned.output_dir)
    steps = [row for row in rows if "loss" in row]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "clip_ratio", "completion_length",
                "completion_length_min", "completion_length_max", "completions_per_second", "rewards/even/mean",
                "rewards/even/std", "rewards/format/mean", "rewards/format/std"):
        assert all(key in row for row in steps), key
    assert "kl" not in steps[0]  # grpo_beta=0: no reference, no KL term
    assert all(row["clip_ratio"] == 0 for row in steps)  # one update per sampled batch: the ratio is 1
    assert all(1 <= row["completion_length_min"] <= row["completion_length"] <= row["completion_length_max"] <= 8
               for row in steps)
    assert "tokens_per_second" not in steps[0]
    evals = [row for row in rows if "eval_loss" in row]
    assert len(evals) == 1 and "eval_rewards/even/mean" in evals[0] and "eval_reward" in evals[0]


def test_grpo_run_folder_records_the_stage_and_loads_like_any_run(learned):
    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run

    manifest = json.loads((learned.output_dir / "chattune.json").read_text())
    stage = manifest["stage"]
    assert stage["name"] == "grpo" and stage["reference"] is None
    assert stage["num_generations"] == 8 and stage["reward_funcs"][1] == "format"
    audit = json.loads((learned.output_dir / "data_audit.json").read_text())
    assert audit["stage"] == "grpo" and audit["train"]["rows_out"] + audit["eval"]["rows_out"] == 24
    assert audit["files"][0]["read"] == 24 and audit["train"]["with_answer"] == audit["train"]["rows_out"]
    run = load_run(str(learned.output_dir))
    answer = generate(run, [[{"role": "user", "content": "What is 1 + 1?"}]], max_new_tokens=6)[0]
    assert isinstance(answer, str)


def test_grpo_resumes_exactly(tiny_models, prompts, tmp_path):
    model = tiny_models("llama")
    straight = train(make_config(model, prompts, tmp_path / "a", reward_funcs=[_rewards(prompts, "even")]),
                     log=lambda *_: None)
    config = make_config(model, prompts, tmp_path / "b", reward_funcs=[_rewards(prompts, "even")], max_steps=2)
    train(config, log=lambda *_: None)
    resumed = train(make_config(model, prompts, tmp_path / "b", reward_funcs=[_rewards(prompts, "even")],
                                resume_from_checkpoint=True), log=lambda *_: None)
    assert resumed.global_step == straight.global_step == 4
    a = load_file(straight.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    first = [r["reward"] for r in _metrics(straight.output_dir) if "loss" in r]
    second = [r["reward"] for r in _metrics(resumed.output_dir) if "loss" in r]
    assert second == first  # the same completions were sampled at every step
    kl = [r["kl"] for r in _metrics(straight.output_dir) if "loss" in r]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0  # the adapter switched off is the reference


@pytest.mark.parametrize("name,message", [
    ("boom", "step 2: reward function late raised ValueError: the grader is down"),
    ("nan", "step 2: reward function late returned nan for completion 0"),
])
def test_a_bad_reward_stops_training_naming_it_and_keeps_the_checkpoint(tiny_models, prompts, tmp_path, name,
                                                                        message):
    rewards_py = prompts.parent / f"{name}_late.py"
    rewards_py.write_text(REWARDS + f'''
calls = [0]
def late(completions, **kwargs):
    calls[0] += 1
    if calls[0] > 2:
        return {name}(completions, **kwargs)
    return [0.0] * len(completions)
''')
    with pytest.raises(TrainingError, match=message):
        train(make_config(tiny_models("llama"), prompts, tmp_path / "out", reward_funcs=[f"{rewards_py}:late"],
                          max_steps=4, save_steps=2), log=lambda *_: None)
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("overrides,message", [
    ({"num_generations": 1}, "num_generations: must be >= 2"),
    ({"max_completion_length": 48}, "max_completion_length: 48 leaves no room for the prompt"),
    ({"reward_weights": [1.0, 2.0]}, "reward_weights: 2 weights for 1 rewards \\(answer_match\\)"),
    ({"reward_funcs": []}, "reward_funcs: no reward"),
    ({"pref_reference": "precompute"}, "precompute is not possible for stage grpo"),
    ({"format_pattern": "(unclosed"}, "format_pattern: '\\(unclosed' is not a regular expression"),
    ({"reward_funcs": ["nowhere.py:f"]}, "reward_funcs: nowhere.py:f: no file"),
])
def test_impossible_grpo_settings_name_the_key(tiny_models, prompts, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(make_config(tiny_models("llama"), prompts, tmp_path / "out", **overrides), log=lambda *_: None)


def test_the_memory_plan_counts_the_group_and_its_kv_cache(tiny_models, prompts, tmp_path):
    from chattune.training.memory_plan import estimate, format_plan

    config = make_config(tiny_models("llama"), prompts, tmp_path / "out", num_generations=6)
    plan = estimate(config)
    assert plan.sequences_per_row == 6 and plan.tokens_per_step == 2 * 6 * 48
    # two blocks x (keys + values) x 12 completions x 48 tokens x 2 kv heads x head dim 16 x float32
    assert plan.generation == 2 * 2 * 12 * 48 * 2 * 16 * 4
    text = format_plan(plan, config)
    assert "batch 2 x 6 sequences (grpo: sampled completions of each prompt)" in text
    assert "KV cache of 12 completions x 48 tokens" in text
    assert "precompute   not possible: grpo samples its completions while training" in text


def test_a_group_too_large_to_sample_is_refused_before_training(tiny_models, prompts, tmp_path):
    with pytest.raises(ConfigError, match="num_generations: 2 prompts x 100000000 completions .* need a KV cache of "):
        train(make_config(tiny_models("llama"), prompts, tmp_path / "out", num_generations=100_000_000),
              log=lambda *_: None)
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_a_trained_reward_model_is_one_more_reward(tiny_models, prompts, rm_run, tmp_path):
    from chattune.inference.reward import load_reward_model

    config = make_config(tiny_models("llama"), prompts, tmp_path / "out", method="full", grpo_beta=0.0,
                         reward_funcs=["format"], reward_model=str(rm_run.output_dir), reward_weights=[0.0, 1.0],
                         max_steps=12, save_steps=12, per_device_train_batch_size=4, num_generations=8)
    result = train(config, log=lambda *_: None)
    steps = [row for row in _metrics(result.output_dir) if "loss" in row]
    scores = [row["rewards/reward_model/mean"] for row in steps]
    assert all(row["rewards/reward_model/std"] >= 0 for row in steps)
    # the policy learned what the reward model prefers: over 12 seeds the rise was 0.51 to 0.96
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.3
    assert json.loads((result.output_dir / "chattune.json").read_text())["stage"]["reward_model"] == str(
        rm_run.output_dir)
    scorer = load_reward_model(str(rm_run.output_dir))
    convs = [[{"role": "user", "content": "Say something."}, {"role": "assistant", "content": text}]
             for text in ("red cat yes", "red cat no")]
    assert scorer.score(convs)[0] > scorer.score(convs)[1]
