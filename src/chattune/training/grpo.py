"""GRPO inside chattune's Trainer: each batch of prompts becomes groups of sampled completions,
scored, and the clipped objective with its KL term.

One training step (:class:`GrpoObjective`, called by the Trainer as a preference stage's loss is):

1. **Sample.** Each prompt gets ``num_generations`` completions from chattune's own decoder
   (:func:`chattune.inference.decoding.decode_batch`: one KV cache, every completion of the
   batch decoded together), the model in eval mode, each completion with a seed of its own made
   from the run's seed, the step and the row, so a resumed run samples what the uninterrupted
   one did.
2. **Score.** The rewards (:mod:`chattune.training.rewards`), checked, weighted and summed;
   the advantage of a completion is its reward less its group's mean, divided by the group's
   (or the batch's) standard deviation + 1e-4, as TRL computes it (:func:`group_advantages`).
3. **Loss.** Every completion token's log-probability under the model (one forward pass, the
   batch's sequences packed into one row where the model keeps packed rows apart; logits chunked
   as the SFT loss chunks them) and under the reference (the adapter switched off, or a frozen
   copy); the loss is TRL's (:func:`grpo_loss`): ``-min(r A, clip(r, 1-eps, 1+eps_high) A)``
   with ``r`` the probability ratio to the policy that sampled, plus ``beta`` x the k3 estimate
   of the KL divergence to the reference (weighted by ``r``, TRL's bias correction), reduced
   as ``grpo_loss`` says.

The completions are sampled by the model being trained (one optimizer step per generated
batch), so ``r`` is 1 in value and the clip fraction 0: the gradient is the policy gradient.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from chattune.config import RlArgs
from chattune.data.encode import IGNORE_INDEX
from chattune.errors import ConfigError, TrainingError
from chattune.lora_init import mutates_base
from chattune.training.loss import HeadCapture
from chattune.training.preference import (
    model_inputs,
    pack_sequences,
    pad_sequences,
    supervised_log_probs,
)

METRIC_NAMES = ("reward", "reward_std", "frac_reward_zero_std", "kl", "clip_ratio", "completion_length",
                "completion_length_min", "completion_length_max", "completions_per_second")
"""What the objective logs besides each reward's ``rewards/NAME/mean`` and ``rewards/NAME/std``."""


def resolve_grpo_reference(rl: RlArgs, wanted: str, is_peft: bool, continued: bool, lora_init: str) -> str | None:
    """The reference of a grpo run: None without a KL term (``grpo_beta`` 0); else the new adapter
    switched off (``adapter_off``) where the model starts as the base, or a frozen ``copy``.
    ``pref_reference=precompute`` is a ConfigError (the completions are sampled while training)."""
    if rl.grpo_beta == 0:
        return None
    if wanted == "precompute":
        raise ConfigError("pref_reference: precompute is not possible for stage grpo (its completions are sampled "
                          "while training); use adapter_off or copy, or grpo_beta=0 for no reference")
    off_possible = is_peft and not continued and not mutates_base(lora_init)
    if wanted == "adapter_off" and not off_possible:
        raise ConfigError("pref_reference: adapter_off is not possible here (no new adapter that starts as the "
                          "base: a full or freeze method, a continued adapter, or a lora_init that moves the base "
                          "weights); use copy")
    if wanted == "auto":
        return "adapter_off" if off_possible else "copy"
    return wanted


def group_advantages(rewards: torch.Tensor, weights: torch.Tensor, group: int,
                     scale: str = "group") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, summed rewards, zero-std flags) of ``rewards`` (``[completions, functions]``,
    NaN where a function did not apply; completions grouped by prompt, ``group`` each): the
    weighted sum over functions, less the group's mean, divided by the group's (``group``) or
    batch's (``batch``) standard deviation + 1e-4, or not divided (``none``). A completion no
    function scored gets advantage 0. TRL's ``sum_then_normalize``, to its numbers."""
    unscorable = torch.isnan(rewards).all(dim=1)
    total = (rewards * weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
    total[unscorable] = torch.nan
    grouped = total.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale == "batch":
        std = _nanstd(total).expand_as(total)
    else:
        std = _nanstd(grouped, dim=1).repeat_interleave(group)
    advantages = total - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), total, torch.isclose(std, torch.zeros_like(std))


def _nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The standard deviation ignoring NaN, with Bessel's correction (as ``torch.std``)."""
    mean = torch.nanmean(values, dim=dim, keepdim=dim is not None)
    count = (~torch.isnan(values)).sum(dim=dim)
    variance = torch.nansum((values - mean) ** 2, dim=dim) / (count - 1).clamp(min=1)
    return variance.sqrt()


@dataclass
class GrpoLoss:
    """The loss of a batch and what is logged of it (means over completion tokens)."""

    loss: torch.Tensor
    kl: float | None
    clip_ratio: float


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, owner: torch.Tensor, count: int, *, beta: float, epsilon_low: float,
              epsilon_high: float, loss_type: str, max_completion_length: int) -> GrpoLoss:
    """TRL's GRPO loss over completion tokens given flat (``logps``: each completion token's
    log-probability under the model, ``old_logps`` under the policy that sampled, ``ref_logps``
    under the reference; ``owner``: the completion of each token, ``count`` completions,
    ``advantages`` one per completion): the clipped surrogate, plus ``beta`` x the k3 KL estimate
    weighted by the ratio, reduced by ``loss_type`` (``grpo``: per completion then mean; ``bnpo``:
    over all tokens; ``dr_grpo``: sum / (count x max_completion_length))."""
    advantage = advantages.to(logps.dtype)[owner]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantage, clipped * advantage)
    kl = None
    if beta != 0.0:
        delta = ref_logps - logps
        per_token_kl = (torch.exp(delta) - delta - 1) * ratio
        per_token = per_token + beta * per_token_kl
        kl = float(per_token_kl.detach().mean()) if per_token_kl.numel() else 0.0
    tokens = torch.bincount(owner, minlength=count).to(per_token.dtype)
    if loss_type == "grpo":
        sums = torch.zeros(count, dtype=per_token.dtype, device=per_token.device).index_add(0, owner, per_token)
        loss = (sums / tokens.clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / tokens.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (count * max_completion_length)
    else:
        raise ValueError(f"grpo_loss: unknown loss {loss_type!r}")
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (advantage < 0)
        high = (ratio > 1 + epsilon_high) & (advantage > 0)
        clip_ratio = float((low | high).float().mean()) if ratio.numel() else 0.0
    return GrpoLoss(loss, kl, clip_ratio)


def completion_seed(seed: int, step: int, source: str, index: int, mode: str) -> int:
    """The sampling seed of one completion: the same run, step, row and place in its group always
    sample the same completion (what makes a resumed run equal the uninterrupted one)."""
    digest = hashlib.sha256(f"{seed}:{mode}:{step}:{source}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PromptCollator:
    """Rows of an encoded prompt set into one batch: the rows themselves (``rows``); the
    completions are sampled from them by the objective."""

    def __call__(self, rows: list[dict]) -> dict:
        """One batch of ``rows``."""
        return {"rows": [dict(row) for row in rows]}


@dataclass
class Rollout:
    """A batch's sampled completions: each prompt's ``num_generations`` completions together, in
    the batch's prompt order; per completion its prompt's ids and messages and the reference answer."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    prompts: list[list[dict]]
    answers: list[str | None]
    seconds: float


class GrpoObjective:
    """The loss of stage grpo, called by the Trainer on each batch of prompts; keeps the rewards,
    KL, clip fraction and completion lengths of the batches since they were last logged.

    ``run_factory()`` gives the in-memory run to sample with (built once the model is in place);
    ``rewards``: a :class:`~chattune.training.rewards.RewardSet`; ``step()``: the Trainer's
    global step (for the completions' seeds)."""

    def __init__(self, rl: RlArgs, rewards, reference: str | None, capture: HeadCapture | None, *,
                 packed: bool, pad_token_id: int, seed: int, run_factory, step=lambda: 0,
                 chunk_size: int = 1024, ref_model=None):
        self.rl = rl
        self.rewards = rewards
        self.reference = reference
        self.capture = capture
        self.packed = packed
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.run_factory = run_factory
        self.step = step
        self.chunk_size = chunk_size
        self.ref_model = ref_model
        self._run = None
        self.kept: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def capturing(self) -> contextlib.AbstractContextManager:
        """The context to compute the loss in: the output layer's capture when chunked."""
        return self.capture if self.capture is not None else contextlib.nullcontext()

    # --- sampling ----------------------------------------------------------------------------

    def sample(self, model, rows: list[dict], mode: str) -> Rollout:
        """``num_generations`` completions of every row's prompt, from ``model`` in eval mode."""
        from chattune.inference.generate import decode, sequence
        from chattune.inference.sampling import SamplingParams

        if self._run is None:
            self._run = self.run_factory()
        run = self._run
        served = run.profile()
        step = self.step()
        seqs, prompts, answers, prompt_ids = [], [], [], []
        for row in rows:
            messages = json.loads(row["prompt"])
            for g in range(self.rl.num_generations):
                params = SamplingParams(max_tokens=self.rl.max_completion_length,
                                        temperature=self.rl.grpo_temperature, top_p=self.rl.grpo_top_p,
                                        seed=completion_seed(self.seed, step, row["source"], g, mode))
                seqs.append(sequence(run, served, list(row["prompt_ids"]), params))
                prompts.append(messages)
                answers.append(row["answer"])
                prompt_ids.append(list(row["prompt_ids"]))
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        try:
            pause = self.capture.paused() if self.capture is not None else contextlib.nullcontext()
            with pause:
                decode(run, seqs)
        finally:
            model.train(was_training)
        failed = [seq.error for seq in seqs if seq.error]
        if failed:
            raise TrainingError(f"step {step}: sampling a completion failed: {failed[0]}")
        return Rollout(prompt_ids, [list(seq.generated) for seq in seqs], [seq.text.text for seq in seqs],
                       prompts, answers, time.perf_counter() - started)

    # --- log-probabilities -------------------------------------------------------------------

    def batch(self, rollout: Rollout) -> dict:
        """The model inputs of every prompt + completion, completion tokens labelled."""
        seqs = [(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
                for prompt, completion in zip(rollout.prompt_ids, rollout.completion_ids, strict=True)]
        batch = pack_sequences(seqs) if self.packed else pad_sequences(seqs, self.pad_token_id)
        batch["num_sequences"] = len(seqs)
        return batch

    def token_log_probs(self, model, batch: dict, capture: HeadCapture | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of each completion token under ``model``, at the sampling
        temperature; the completion each token belongs to)."""
        device = next(model.parameters()).device
        outputs = model(**model_inputs(batch, device))
        return supervised_log_probs(outputs, batch, capture, self.chunk_size, self.rl.grpo_temperature)

    @torch.no_grad()
    def reference_log_probs(self, model, batch: dict) -> torch.Tensor:
        """Each completion token's log-probability under the reference."""
        if self.reference == "copy":
            return self.token_log_probs(self.ref_model, batch, None)[0]
        with getattr(model, "module", model).disable_adapter():
            return self.token_log_probs(model, batch, self.capture)[0]

    # --- the step ----------------------------------------------------------------------------

    def __call__(self, model, batch: dict) -> torch.Tensor:
        """The loss of a batch of prompts (sampling, scoring and the clipped objective)."""
        mode = "train" if model.training else "eval"
        rollout = self.sample(model, batch["rows"], mode)
        scores = self.rewards.score(self.step(), prompts=rollout.prompts, completions=rollout.texts,
                                    completion_ids=rollout.completion_ids, answer=rollout.answers)
        advantages, total, zero_std = group_advantages(scores, self.rewards.weights, self.rl.num_generations,
                                                       self.rl.scale_rewards)
        inputs = self.batch(rollout)
        logps, owner = self.token_log_probs(model, inputs, self.capture)
        ref = self.reference_log_probs(model, inputs).to(logps.device) if self.reference else None
        epsilon_high = self.rl.grpo_epsilon_high if self.rl.grpo_epsilon_high is not None else self.rl.grpo_epsilon
        result = grpo_loss(logps, logps.detach(), ref, advantages.to(logps.device), owner.to(logps.device),
                           len(rollout.completion_ids), beta=self.rl.grpo_beta, epsilon_low=self.rl.grpo_epsilon,
                           epsilon_high=epsilon_high, loss_type=self.rl.grpo_loss,
                           max_completion_length=self.rl.max_completion_length)
        self._keep(mode, scores, total, zero_std, result, rollout)
        return result.loss

    def _keep(self, mode: str, scores, total, zero_std, result: GrpoLoss, rollout: Rollout) -> None:
        kept = self.kept[mode]
        for i, name in enumerate(self.rewards.names):
            column = scores[:, i]
            column = column[~torch.isnan(column)]
            if column.numel():
                kept[f"rewards/{name}/mean"].append(float(column.mean()))
                kept[f"rewards/{name}/std"].append(float(column.std()) if column.numel() > 1 else 0.0)
        scored = total[~torch.isnan(total)]
        if scored.numel():
            kept["reward"].append(float(scored.mean()))
            kept["reward_std"].append(float(scored.std()) if scored.numel() > 1 else 0.0)
        kept["frac_reward_zero_std"].append(float(zero_std.float().mean()))
        if result.kl is not None:
            kept["kl"].append(result.kl)
        kept["clip_ratio"].append(result.clip_ratio)
        lengths = [len(ids) for ids in rollout.completion_ids]
        kept["completion_length"].append(sum(lengths) / len(lengths))
        kept["completion_length_min"].append(min(lengths))
        kept["completion_length_max"].append(max(lengths))
        if rollout.seconds > 0:
            kept["completions_per_second"].append(len(lengths) / rollout.seconds)

    def metric_names(self) -> list[str]:
        """Every name the objective logs (the same on every process, so they gather alike)."""
        per_reward = [f"rewards/{name}/{what}" for name in self.rewards.names for what in ("mean", "std")]
        return [*METRIC_NAMES, *per_reward]

    def pop_metrics(self, mode: str, gather=None) -> dict[str, float]:
        """The means of what was kept in ``mode`` since the last call (then forgotten); the
        smallest and largest completion lengths are the extremes, not means."""
        kept, self.kept[mode] = self.kept[mode], defaultdict(list)
        if gather is not None:
            kept = {name: gather(kept.get(name, [])) for name in self.metric_names()}
        metrics = {name: sum(values) / len(values) for name, values in kept.items() if values}
        if kept.get("completion_length_min"):
            metrics["completion_length_min"] = float(min(kept["completion_length_min"]))
        if kept.get("completion_length_max"):
            metrics["completion_length_max"] = float(max(kept["completion_length_max"]))
        return metrics
