"""Preference training inside chattune's Trainer: batches of pairs, their log-probabilities
in one forward pass, the reference, and the loss with its rewards.

- :class:`PreferenceCollator`: each pair becomes two sequences (prompt + chosen, prompt +
  rejected), a KTO row its sequence and its mismatched (KL) sequence; all of a batch's
  sequences go through the model in one forward, packed into one row without attention across
  sequences where the model keeps packed rows apart (``packing``), else padded.
- :func:`sequence_log_probs`: each sequence's summed log-probability of its answer tokens,
  from the output layer's input chunk by chunk (the chunked loss's capture: no
  ``[tokens, vocabulary]`` logits are kept), or from the logits.
- :class:`PreferenceObjective`: the reference's log-probabilities (the model with its adapter
  switched off, precomputed columns, or a frozen copy), the loss of the stage
  (:mod:`chattune.training.preference_loss`) and the logged rewards.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict

import torch
from torch.utils.checkpoint import checkpoint

from chattune.config import PreferenceArgs
from chattune.data.encode import IGNORE_INDEX
from chattune.errors import ConfigError
from chattune.lora_init import mutates_base
from chattune.training.loss import HeadCapture
from chattune.training.preference_loss import (
    dpo_losses,
    kto_kl,
    kto_losses,
    orpo_losses,
    sft_term,
    simpo_losses,
)

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "kl")
"""What the objective keeps per batch (the same names on every process, so they gather alike)."""
REF_COLUMNS = {"paired": ("ref_chosen_logps", "ref_rejected_logps"), "labelled": ("ref_logps", "ref_kl_logps")}


class PreferenceCollator:
    """Rows of an encoded preference set into one batch of sequences: for pairs all chosen
    sequences then all rejected ones, for labelled rows all answers then all KL sequences.

    ``packed``: every sequence of the batch in one row, ``position_ids`` restarting at 0 per
    sequence, no attention mask (the packed-attention probe checks the model keeps them apart);
    else padded to the longest with an attention mask. ``sequence_index`` names the sequence
    of every token (-1: padding); reference columns, when present, come along."""

    def __init__(self, pad_token_id: int, packed: bool):
        self.pad_token_id = pad_token_id
        self.packed = packed

    @staticmethod
    def sequences(rows: list[dict]) -> list[tuple[list[int], list[int]]]:
        """(ids, labels) of every sequence of ``rows``, in batch order."""
        second = "rejected" if "rejected_ids" in rows[0] else "kl"
        out = []
        for name in ("chosen", second):
            for row in rows:
                prompt = list(row["prompt_ids"])
                out.append((prompt + list(row[f"{name}_ids"]),
                            [IGNORE_INDEX] * len(prompt) + list(row[f"{name}_labels"])))
        return out

    def __call__(self, rows: list[dict]) -> dict:
        """One batch of ``rows``."""
        seqs = self.sequences(rows)
        batch = pack_sequences(seqs) if self.packed else pad_sequences(seqs, self.pad_token_id)
        batch["num_sequences"] = len(seqs)
        if "desirable" in rows[0]:
            batch["desirable"] = torch.tensor([bool(row["desirable"]) for row in rows])
        for name in (*REF_COLUMNS["paired"], *REF_COLUMNS["labelled"]):
            if name in rows[0]:
                batch[name] = torch.tensor([float(row[name]) for row in rows], dtype=torch.float32)
        return batch


def pack_sequences(seqs: list[tuple[list[int], list[int]]]) -> dict:
    """``(ids, labels)`` sequences as one packed row: ``position_ids`` restarting at 0 per
    sequence, each sequence's first token unsupervised, ``sequence_index`` naming each token's
    sequence (the model must keep packed rows apart: the packed-attention probe checks it)."""
    ids, labels, positions, index = [], [], [], []
    for n, (seq_ids, seq_labels) in enumerate(seqs):
        ids += seq_ids
        labels += [IGNORE_INDEX] + seq_labels[1:]
        positions += range(len(seq_ids))
        index += [n] * len(seq_ids)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "sequence_index": torch.tensor([index])}


def pad_sequences(seqs: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    """``(ids, labels)`` sequences as rows right-padded to the longest with ``pad_token_id``,
    an attention mask and ``sequence_index`` (-1 on padding)."""
    longest = max(len(ids) for ids, _ in seqs)
    shape = (len(seqs), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    index = torch.full(shape, -1, dtype=torch.long)
    for n, (seq_ids, seq_labels) in enumerate(seqs):
        input_ids[n, :len(seq_ids)] = torch.tensor(seq_ids)
        labels[n, :len(seq_ids)] = torch.tensor(seq_labels)
        attention[n, :len(seq_ids)] = 1
        index[n, :len(seq_ids)] = n
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "sequence_index": index}


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict, device) -> dict:
    """The tensors of ``batch`` the model takes, on ``device``, without a KV cache."""
    inputs = {k: batch[k].to(device) for k in MODEL_KEYS if k in batch}
    inputs["use_cache"] = False
    return inputs


def _chunk_log_probs(head_forward, hidden: torch.Tensor, targets: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    logits = head_forward(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def token_log_probs(hidden: torch.Tensor, head_forward, targets: torch.Tensor, chunk_size: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each target under ``head_forward(hidden)`` (its logits divided by
    ``temperature``), ``chunk_size`` tokens of logits at a time (recomputed in the backward pass,
    never all kept)."""
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_log_probs, head_forward, h, t, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_log_probs(head_forward, h, t, temperature))
    return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)


def supervised_log_probs(outputs, batch: dict, capture: HeadCapture | None, chunk_size: int = 1024,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of every supervised token, in order; the sequence it belongs to), from
    the captured hidden states (``capture``) or from ``outputs.logits``."""
    labels, index = batch["labels"], batch["sequence_index"]
    targets = labels[..., 1:]
    supervised = targets != IGNORE_INDEX
    owner = index[..., 1:][supervised]
    if capture is not None:
        hidden = capture.take()
        hidden = hidden[..., :-1, :][supervised.to(hidden.device)]
        per_token = token_log_probs(hidden, capture.original, targets[supervised].to(hidden.device), chunk_size,
                                    temperature)
    else:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        picked = logits[..., :-1, :][supervised.to(logits.device)]
        per_token = token_log_probs(picked, lambda x: x, targets[supervised].to(picked.device), chunk_size,
                                    temperature)
    return per_token, owner.to(per_token.device)


def sequence_log_probs(outputs, batch: dict, capture: HeadCapture | None,
                       chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's supervised tokens, their count), from the
    captured hidden states (``capture``) or from ``outputs.logits``."""
    count = batch["num_sequences"]
    per_token, owner = supervised_log_probs(outputs, batch, capture, chunk_size)
    sums = torch.zeros(count, dtype=per_token.dtype, device=per_token.device).index_add(0, owner, per_token)
    tokens = torch.bincount(owner, minlength=count).to(per_token.dtype)
    return sums, tokens


def _unwrapped(model):
    return getattr(model, "module", model)


def resolve_reference(prefs: PreferenceArgs, is_peft: bool, continued: bool,
                      lora_init: str = "default") -> str | None:
    """The reference a run uses: None for orpo/simpo (no reference); ``auto``: the adapter
    switched off for a new adapter (peft methods) that starts as the base, else precomputed
    log-probabilities. ``adapter_off`` without such an adapter is a ConfigError (a ``lora_init``
    that changes the base weights leaves only their residual with the adapter off)."""
    if prefs.stage not in ("dpo", "kto"):
        return None
    wanted = prefs.pref_reference
    residual = mutates_base(lora_init)
    if wanted == "auto":
        return "adapter_off" if is_peft and not continued and not residual else "precompute"
    if wanted == "adapter_off" and residual and is_peft and not continued:
        raise ConfigError(f"pref_reference: adapter_off is not possible with lora_init={lora_init}: the adapter "
                          "starts with the base weights' principal part, so switching it off gives their residual, "
                          "not the base; use precompute or copy")
    if wanted == "adapter_off" and (not is_peft or continued):
        why = ("the run continues an adapter, so switching it off would give the base, not the model it starts from"
               if is_peft else "the method trains the model's own weights (no adapter to switch off)")
        raise ConfigError(f"pref_reference: adapter_off is not possible: {why}; use precompute or copy")
    return wanted


class PreferenceObjective:
    """The loss of a preference stage, called by the Trainer on each batch; keeps the rewards
    and log-probabilities of the batches since they were last logged, per mode (train/eval)."""

    def __init__(self, prefs: PreferenceArgs, reference: str | None, capture: HeadCapture | None,
                 chunk_size: int = 1024, ref_model=None):
        self.prefs = prefs
        self.reference = reference
        self.capture = capture
        self.chunk_size = chunk_size
        self.ref_model = ref_model
        self.kept: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    @property
    def paired(self) -> bool:
        """Whether the stage trains on pairs (else on labelled rows: kto)."""
        return self.prefs.stage != "kto"

    def capturing(self) -> contextlib.AbstractContextManager:
        """The context to compute the loss in: the output layer's capture when chunked."""
        return self.capture if self.capture is not None else contextlib.nullcontext()

    def log_probs(self, model, batch: dict, capture: HeadCapture | None = None):
        """(summed answer log-probabilities, answer tokens) of every sequence of ``batch`` under ``model``."""
        device = next(model.parameters()).device
        outputs = model(**model_inputs(batch, device))
        return sequence_log_probs(outputs, batch, capture, self.chunk_size)

    @torch.no_grad()
    def reference_log_probs(self, model, batch: dict) -> torch.Tensor:
        """The reference's summed answer log-probabilities of every sequence of ``batch``."""
        names = REF_COLUMNS["paired" if self.paired else "labelled"]
        if self.reference == "precompute":
            if names[0] not in batch:
                raise RuntimeError("pref_reference=precompute: the batch has no precomputed reference columns")
            return torch.cat([batch[names[0]], batch[names[1]]])
        if self.reference == "copy":
            return self.log_probs(self.ref_model, batch)[0]
        with _unwrapped(model).disable_adapter():
            return self.log_probs(model, batch, self.capture)[0]

    def __call__(self, model, batch: dict) -> torch.Tensor:
        """The batch's loss (the mean over its pairs or rows); its rewards are kept for logging."""
        logps, tokens = self.log_probs(model, batch, self.capture)
        ref = self.reference_log_probs(model, batch).to(logps.device) if self.reference else None
        half = len(logps) // 2
        p = self.prefs
        mode = "train" if model.training else "eval"
        if p.stage == "kto":
            kl = kto_kl(logps[half:].detach(), ref[half:])
            result = kto_losses(logps[:half], ref[:half], batch["desirable"].to(logps.device), kl, beta=p.pref_beta,
                                desirable_weight=p.kto_desirable_weight, undesirable_weight=p.kto_undesirable_weight)
            self.kept[mode]["kl"].append(float(kl))
        else:
            chosen, rejected = logps[:half], logps[half:]
            chosen_tokens, rejected_tokens = tokens[:half], tokens[half:]
            if p.stage == "dpo":
                result = dpo_losses(chosen, rejected, ref[:half], ref[half:], beta=p.pref_beta, loss_type=p.pref_loss,
                                    label_smoothing=p.pref_label_smoothing, chosen_tokens=chosen_tokens,
                                    rejected_tokens=rejected_tokens)
            elif p.stage == "simpo":
                result = simpo_losses(chosen, rejected, chosen_tokens, rejected_tokens, beta=p.pref_beta,
                                      gamma=p.simpo_gamma, label_smoothing=p.pref_label_smoothing)
            else:
                result = orpo_losses(chosen, rejected, chosen_tokens, rejected_tokens, beta=p.pref_beta)
            if p.pref_ftx and p.stage != "orpo":
                result.losses = result.losses + p.pref_ftx * sft_term(chosen, chosen_tokens)
            self._keep_pairs(mode, result, chosen.detach(), rejected.detach())
        if p.stage == "kto":
            self._keep_labelled(mode, result, logps[:half].detach(), batch["desirable"])
        return result.losses.mean()

    def _keep_pairs(self, mode: str, result, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        kept = self.kept[mode]
        margins = result.chosen_rewards - result.rejected_rewards
        kept["rewards/chosen"] += result.chosen_rewards.tolist()
        kept["rewards/rejected"] += result.rejected_rewards.tolist()
        kept["rewards/accuracies"] += (margins > 0).float().tolist()
        kept["rewards/margins"] += margins.tolist()
        kept["logps/chosen"] += chosen.tolist()
        kept["logps/rejected"] += rejected.tolist()

    def _keep_labelled(self, mode: str, result, logps: torch.Tensor, desirable: torch.Tensor) -> None:
        kept = self.kept[mode]
        desirable = desirable.bool().to(logps.device)
        kept["rewards/chosen"] += result.chosen_rewards.tolist()
        kept["rewards/rejected"] += result.rejected_rewards.tolist()
        kept["logps/chosen"] += logps[desirable].tolist()
        kept["logps/rejected"] += logps[~desirable].tolist()

    def pop_metrics(self, mode: str, gather=None) -> dict[str, float]:
        """The means of what was kept in ``mode`` since the last call (then forgotten), over every
        process where ``gather`` (a list -> every process's lists joined) is given; for KTO the
        margin is the mean desirable reward less the mean undesirable one."""
        kept, self.kept[mode] = self.kept[mode], defaultdict(list)
        if gather is not None:
            kept = {name: gather(kept.get(name, [])) for name in METRIC_NAMES}
        metrics = {name: sum(values) / len(values) for name, values in kept.items() if values}
        if self.prefs.stage == "kto" and "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics


@torch.no_grad()
def precompute_reference(objective: PreferenceObjective, model, dataset, collator: PreferenceCollator,
                         batch_size: int, log=print):
    """``dataset`` with the reference columns (``ref_chosen_logps``/``ref_rejected_logps``, or
    ``ref_logps``/``ref_kl_logps``) computed in one pass of ``model`` as it is now (in eval mode,
    without dropout): the reference of a run that has no second copy of the model."""
    names = REF_COLUMNS["paired" if objective.paired else "labelled"]
    was_training = model.training
    model.eval()
    firsts, seconds = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            logps = objective.log_probs(model, collator(rows), objective.capture)[0].float().cpu()
            firsts += logps[:len(rows)].tolist()
            seconds += logps[len(rows):].tolist()
    finally:
        model.train(was_training)
    log(f"reference: log-probabilities of {len(dataset)} rows precomputed")
    return dataset.add_column(names[0], firsts).add_column(names[1], seconds)


def frozen_copy(model):
    """A frozen copy of ``model`` in eval mode: the reference of ``pref_reference=copy``."""
    ref = copy.deepcopy(model)
    ref.eval()
    for parameter in ref.parameters():
        parameter.requires_grad_(False)
    return ref
