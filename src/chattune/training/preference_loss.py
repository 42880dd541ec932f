"""The preference losses, on per-answer log-probabilities: DPO (sigmoid, IPO, hinge), ORPO,
SimPO and KTO, each with the rewards it logs, and a reward model's Bradley-Terry loss.

Inputs are 1-D tensors, one value per pair (or labelled row): ``*_logps`` the summed
log-probability of an answer's tokens under the model, ``ref_*`` under the reference,
``*_tokens`` the answer's token count. Each function returns per-row losses (the loss is their
mean) and per-row rewards for chosen and rejected answers (detached). The formulas follow TRL
(DPOTrainer, CPOTrainer for SimPO, ORPOTrainer, KTOTrainer); tests check them against TRL's own
code on the same log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLosses:
    """Per-row losses and the rewards logged beside them (chosen/rejected; KTO: one per row,
    split by label)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with a share ``label_smoothing`` of the pairs taken as flipped."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> PreferenceLosses:
    """DPO on the margin of the two log-ratios (model over reference). ``sigmoid``: DPO
    (conservative with ``label_smoothing``); ``hinge``: SLiC's; ``ipo``: IPO's squared loss on the
    per-token log-ratios (TRL normalises by the answer's tokens, as IPO's authors do)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * margin, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"pref_loss: expected sigmoid, ipo or hinge, got {loss_type!r}")
    return PreferenceLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
                 rejected_tokens: torch.Tensor, *, beta: float, gamma: float,
                 label_smoothing: float = 0.0) -> PreferenceLosses:
    """SimPO: the margin of the length-normalised log-probabilities (mean over the answer's
    tokens), less the target margin ``gamma / beta``, through a sigmoid; no reference."""
    chosen_mean = chosen_logps / chosen_tokens.clamp(min=1)
    rejected_mean = rejected_logps / rejected_tokens.clamp(min=1)
    logits = (chosen_mean - rejected_mean) - gamma / beta
    losses = _smoothed_sigmoid(beta * logits, label_smoothing)
    return PreferenceLosses(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, computed stably."""
    return torch.where(x > -0.693147, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sft_term(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-row shares of the chosen answers' token-mean loss over the batch (their mean is the
    sum of the token losses over the sum of the tokens), as ORPO's SFT term and ``pref_ftx`` use it."""
    return -chosen_logps * (len(chosen_logps) / chosen_tokens.sum().clamp(min=1))


def orpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor, *, beta: float) -> PreferenceLosses:
    """ORPO: the chosen answers' token-mean loss over the batch (its SFT term) less ``beta`` times
    the log sigmoid of the log odds ratio of each pair's mean token log-probabilities; no reference."""
    chosen_mean = (chosen_logps / chosen_tokens.clamp(min=1)).float()
    rejected_mean = (rejected_logps / rejected_tokens.clamp(min=1)).float()
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    losses = sft_term(chosen_logps.float(), chosen_tokens) - beta * F.logsigmoid(log_odds)
    return PreferenceLosses(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
               beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PreferenceLosses:
    """KTO: a desirable answer's loss is 1 - sigmoid(beta (log-ratio - KL)), an undesirable one's
    1 - sigmoid(beta (KL - log-ratio)), each weighted; ``kl`` is the batch's (detached,
    clamped at 0) estimate from mismatched answers. Rewards: beta x log-ratio, split by label."""
    ratio = logps - ref_logps
    desirable = desirable.bool()
    chosen_losses = 1 - torch.sigmoid(beta * (ratio[desirable] - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - ratio[~desirable]))
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    rewards = beta * ratio.detach()
    return PreferenceLosses(losses, rewards[desirable], rewards[~desirable])


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's KL estimate: the mean log-ratio of the mismatched answers, detached, at least 0."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def reward_model_losses(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                        center_coef: float = 0.0) -> PreferenceLosses:
    """A reward model's Bradley-Terry loss: -log sigmoid(r_chosen - r_rejected) per pair, and with
    ``center_coef`` the centring term coef x mean((r_chosen + r_rejected)^2) added to each pair's
    loss (their mean is TRL RewardTrainer's loss with ``center_rewards_coefficient``). The rewards
    are the reward head's scalars (no reference, no beta)."""
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    if center_coef:
        losses = losses + center_coef * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return PreferenceLosses(losses, chosen_rewards.detach(), rejected_rewards.detach())
