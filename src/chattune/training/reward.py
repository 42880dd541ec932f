"""Reward-model training (``stage: rm``) inside chattune's Trainer: batches of pairs, each
answer's reward from the head, and the Bradley-Terry loss with its logged rewards.

- :class:`RewardCollator`: each pair becomes two sequences (prompt + chosen, prompt +
  rejected), all chosen sequences then all rejected ones, right-padded to the longest (the
  reward is read at each sequence's last real token, :func:`chattune.inference.reward.sequence_rewards`).
- :class:`RewardObjective`: the loss of a batch (:func:`chattune.training.preference_loss.reward_model_losses`)
  and, per mode (train/eval), the rewards kept for logging under the preference stages' names
  (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``), which
  the Trainer reads through the same hooks as :class:`~chattune.training.preference.PreferenceObjective`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from chattune.config import PreferenceArgs
from chattune.inference.reward import padded, sequence_rewards
from chattune.training.preference_loss import reward_model_losses

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
"""What the objective keeps per batch (the same names on every process, so they gather alike)."""


class RewardCollator:
    """Rows of an encoded pair set (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into one
    padded batch: the chosen sequences, then the rejected ones."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    @staticmethod
    def sequences(rows: list[dict]) -> list[list[int]]:
        """The ids of every sequence of ``rows``, in batch order (prompt + answer, as dpo sees them)."""
        return [list(row["prompt_ids"]) + list(row[f"{name}_ids"]) for name in ("chosen", "rejected") for row in rows]

    def __call__(self, rows: list[dict]) -> dict:
        """One batch of ``rows``."""
        input_ids, attention = padded(self.sequences(rows), self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention, "num_sequences": 2 * len(rows)}


class RewardObjective:
    """The reward model's loss, called by the Trainer on each batch; keeps the rewards of the
    batches since they were last logged, per mode (train/eval)."""

    reference = None
    capture = None

    def __init__(self, prefs: PreferenceArgs):
        self.prefs = prefs
        self.kept: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def capturing(self) -> contextlib.AbstractContextManager:
        """Nothing to capture: the head reads the last hidden state itself."""
        return contextlib.nullcontext()

    def rewards(self, model, batch: dict) -> torch.Tensor:
        """The reward of every sequence of ``batch`` under ``model``."""
        device = next(model.parameters()).device
        return sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))

    def __call__(self, model, batch: dict) -> torch.Tensor:
        """The batch's loss (the mean over its pairs); its rewards are kept for logging."""
        rewards = self.rewards(model, batch)
        half = len(rewards) // 2
        result = reward_model_losses(rewards[:half], rewards[half:], center_coef=self.prefs.rm_center_coef)
        kept = self.kept["train" if model.training else "eval"]
        margins = result.chosen_rewards - result.rejected_rewards
        kept["rewards/chosen"] += result.chosen_rewards.tolist()
        kept["rewards/rejected"] += result.rejected_rewards.tolist()
        kept["rewards/accuracies"] += (margins > 0).float().tolist()
        kept["rewards/margins"] += margins.tolist()
        return result.losses.mean()

    def pop_metrics(self, mode: str, gather=None) -> dict[str, float]:
        """The means of what was kept in ``mode`` since the last call (then forgotten), over every
        process where ``gather`` (a list -> every process's lists joined) is given."""
        kept, self.kept[mode] = self.kept[mode], defaultdict(list)
        if gather is not None:
            kept = {name: gather(kept.get(name, [])) for name in REWARD_METRICS}
        return {name: sum(values) / len(values) for name, values in kept.items() if values}
