"""GRPO's numbers against TRL's: the loss of a batch (the same model, completions, advantages and
reference log-probabilities through TRL's ``GRPOTrainer._compute_loss``), its gradient, and the
group-normalised advantages."""

from __future__ import annotations

import pytest
import torch

from chattune.config import RlArgs
from chattune.errors import ConfigError
from chattune.training.grpo import (
    completion_seed,
    group_advantages,
    grpo_loss,
    resolve_grpo_reference,
)
from chattune.training.preference import pad_sequences, supervised_log_probs

PROMPT_LENGTH = 5
COMPLETIONS = [[11, 12, 13, 14], [21, 22], [31, 32, 33], [41]]


def _trl_trainer(model, tokenizer, tmp_path, **settings):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def constant(completions, **kwargs):
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", num_generations=4,
                      per_device_train_batch_size=4, max_completion_length=6, logging_steps=1, bf16=False, **settings)
    trainer = GRPOTrainer(model=model, reward_funcs=constant, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": ["hello"] * 4}))
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _trl_inputs(prompt: list[int], pad: int, advantages, ref):
    width = max(map(len, COMPLETIONS))
    completion = torch.full((4, width), pad)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, ids in enumerate(COMPLETIONS):
        completion[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return {"prompt_ids": torch.tensor([prompt] * 4), "prompt_mask": torch.ones((4, len(prompt)), dtype=torch.long),
            "completion_ids": completion, "completion_mask": mask, "advantages": advantages,
            "ref_per_token_logps": ref, "old_per_token_logps": None, "num_items_in_batch": mask.sum()}


@pytest.mark.parametrize("loss_type,beta,temperature", [("grpo", 0.04, 1.0), ("bnpo", 0.1, 0.7),
                                                        ("dr_grpo", 0.0, 1.0), ("bnpo", 0.0, 1.3)])
def test_loss_and_gradient_equal_trls(tiny_models, tmp_path, loss_type, beta, temperature):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = _trl_trainer(model, tokenizer, tmp_path, loss_type=loss_type, beta=beta, temperature=temperature,
                           epsilon=0.2, epsilon_high=0.28)
    model = trainer.model
    prompt = list(range(3, 3 + PROMPT_LENGTH))
    advantages = torch.tensor([1.2, -0.4, 0.3, -1.1])
    torch.manual_seed(0)
    width = max(map(len, COMPLETIONS))
    ref = -3.0 + 0.5 * torch.rand((4, width))
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, _trl_inputs(prompt, tokenizer.pad_token_id, advantages, ref))
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.zero_grad()
    batch = pad_sequences([(prompt + ids, [-100] * len(prompt) + ids) for ids in COMPLETIONS], tokenizer.pad_token_id)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logps, owner = supervised_log_probs(outputs, batch, None, temperature=temperature)
    flat_ref = torch.cat([ref[i, :len(ids)] for i, ids in enumerate(COMPLETIONS)])
    ours = grpo_loss(logps, logps.detach(), flat_ref, advantages, owner, 4, beta=beta, epsilon_low=0.2,
                     epsilon_high=0.28, loss_type=loss_type, max_completion_length=6)
    ours.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert float(ours.loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-7)
    assert len(grads) == len(trl_grads)
    for mine, theirs in zip(grads, trl_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_off_policy_ratio_is_clipped_as_trl_clips_it():
    logps = torch.tensor([-1.0, -1.0, -2.0, -2.0], requires_grad=True)
    old = torch.tensor([-1.5, -0.5, -2.5, -1.5])  # ratios e^0.5 (above), e^-0.5 (below), e^0.5, e^-0.5
    advantages = torch.tensor([1.0, -1.0])
    owner = torch.tensor([0, 0, 1, 1])
    result = grpo_loss(logps, old, None, advantages, owner, 2, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                       loss_type="bnpo", max_completion_length=4)
    ratio = torch.exp(logps.detach() - old)
    expected = -torch.min(ratio * advantages[owner], ratio.clamp(0.8, 1.2) * advantages[owner]).mean()
    assert float(result.loss) == pytest.approx(float(expected))
    # clipped (TRL's clip_ratio): token 0 (ratio 1.65 > 1.2 with A > 0) and token 3 (0.61 < 0.8 with A < 0);
    # tokens 1 and 2 are outside the range on the side the min leaves unclipped
    assert result.clip_ratio == pytest.approx(0.5)
    assert result.kl is None


def test_advantages_equal_trls_formula():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    rewards = torch.tensor([[1.0, 0.5], [0.0, 0.5], [1.0, float("nan")], [0.0, 0.0],
                            [0.3, 1.0], [0.3, 1.0], [0.3, 1.0], [0.3, 1.0]])
    weights = torch.tensor([1.0, 0.5])
    advantages, total, zero_std = group_advantages(rewards, weights, group=4)
    summed = (rewards * weights).nansum(dim=1)
    mean = summed.view(-1, 4).mean(dim=1).repeat_interleave(4)
    std = trl_utils.nanstd(summed.view(-1, 4), dim=1).repeat_interleave(4)
    torch.testing.assert_close(advantages, (summed - mean) / (std + 1e-4))
    torch.testing.assert_close(total, summed)
    assert zero_std.tolist() == [False] * 4 + [True] * 4  # a group whose completions all scored alike teaches nothing
    assert advantages[4:].abs().max() == 0
    batch, _, _ = group_advantages(rewards, weights, group=4, scale="batch")
    torch.testing.assert_close(batch, (summed - mean) / (trl_utils.nanstd(summed) + 1e-4))
    unscaled, _, _ = group_advantages(rewards, weights, group=4, scale="none")
    torch.testing.assert_close(unscaled, summed - mean)


def test_a_completion_no_reward_scored_gets_no_advantage():
    rewards = torch.tensor([[1.0], [float("nan")], [0.0], [0.5]])
    advantages, total, _ = group_advantages(rewards, torch.tensor([1.0]), group=4)
    assert advantages[1] == 0 and torch.isnan(total[1])
    assert advantages[0] > 0 > advantages[2]


def test_completion_seeds_depend_on_run_step_row_and_place():
    seeds = {completion_seed(3, step, source, g, mode) for step in (0, 1) for source in ("a.json:1", "a.json:2")
             for g in range(4) for mode in ("train", "eval")}
    assert len(seeds) == 32
    assert completion_seed(3, 5, "a.json:1", 2, "train") == completion_seed(3, 5, "a.json:1", 2, "train")
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_reference_follows_the_method():
    rl = RlArgs()
    assert resolve_grpo_reference(rl, "auto", True, False, "default") == "adapter_off"
    assert resolve_grpo_reference(rl, "auto", False, False, "default") == "copy"
    assert resolve_grpo_reference(rl, "auto", True, False, "pissa") == "copy"
    assert resolve_grpo_reference(RlArgs(grpo_beta=0.0), "auto", True, False, "default") is None
    with pytest.raises(ConfigError, match="precompute is not possible for stage grpo"):
        resolve_grpo_reference(rl, "precompute", True, False, "default")
    with pytest.raises(ConfigError, match="adapter_off is not possible"):
        resolve_grpo_reference(rl, "adapter_off", False, False, "default")
