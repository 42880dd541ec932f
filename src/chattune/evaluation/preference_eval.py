"""``chattune eval RUN --data PAIRS``: how well a run ranks the chosen answer of held-out pairs
above the rejected one.

For each pair the answers' summed log-probabilities are computed under the run and under its
base (one forward pass per batch of pairs, the run's template and tokenizer), giving:

- **reward accuracy**: the share of pairs whose implicit reward (DPO's: beta x the answer's
  log-probability under the run less under the base) is higher for the chosen answer, and the
  mean **reward margin** (chosen less rejected); beta is the run's ``pref_beta``;
- **likelihood accuracy**: the share of pairs whose chosen answer is more likely than the
  rejected one under the model alone (summed, and per token: SimPO's length-normalised reward),
  which also has a meaning for the base model (``--compare base``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chattune.config import DataSource
from chattune.data.encode import PieceEncoder
from chattune.data.formats import read_rows
from chattune.data.pair_encode import encode_split
from chattune.data.pairs import PAIRED, load_preference_records
from chattune.errors import DataError
from chattune.inference.decoding import BASE_ADAPTER
from chattune.training.preference import PreferenceCollator, sequence_log_probs

DEFAULT_BETA = 0.1


def is_pair_file(path: str) -> bool:
    """Whether the first row of a data file is a preference pair (has ``chosen`` and ``rejected``)."""
    for row in read_rows(path):
        return isinstance(row.value, dict) and "chosen" in row.value and "rejected" in row.value
    return False


def encode_pairs(path: str, tokenizer, template: str, max_seq_length: int, limit: int | None = None):
    """The pairs of ``path`` encoded with a run's template: (columns, audit, records kept)."""
    records, summaries = load_preference_records([DataSource(path)], PAIRED, dedup=False)
    if limit is not None:
        records = records[:limit]
    columns, audit = encode_split(records, template, PieceEncoder(tokenizer), max_seq_length, seed=0)
    if not columns["prompt_ids"]:
        raise DataError(f"--data {path}: no pair could be encoded ({summaries[0].to_json()['skipped_reasons']}, "
                        f"{audit['dropped_reasons']})")
    return columns, audit


@torch.no_grad()
def answer_log_probs(model, columns: dict, pad_token_id: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Summed log-probabilities and token counts of every pair's chosen and rejected answer under
    ``model`` as it is (padded batches, no reference)."""
    collator = PreferenceCollator(pad_token_id, packed=False)
    device = next(model.parameters()).device
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    out = {name: [] for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            batch = collator(part)
            outputs = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            use_cache=False)
            sums, tokens = sequence_log_probs(outputs, batch, None)
            half = len(part)
            out["chosen"].append(sums[:half].cpu())
            out["rejected"].append(sums[half:].cpu())
            out["chosen_tokens"].append(tokens[:half].cpu())
            out["rejected_tokens"].append(tokens[half:].cpu())
    finally:
        model.train(was_training)
    return {name: torch.cat(parts).double() for name, parts in out.items()}


def likelihood_figures(logps: dict[str, torch.Tensor]) -> dict[str, float]:
    """Likelihood accuracy (summed and per token) and the mean log-probabilities of a model."""
    chosen_mean = logps["chosen"] / logps["chosen_tokens"].clamp(min=1)
    rejected_mean = logps["rejected"] / logps["rejected_tokens"].clamp(min=1)
    return {
        "likelihood_accuracy": float((logps["chosen"] > logps["rejected"]).double().mean()),
        "per_token_likelihood_accuracy": float((chosen_mean > rejected_mean).double().mean()),
        "logps_chosen": float(logps["chosen"].mean()), "logps_rejected": float(logps["rejected"].mean()),
    }


def reward_figures(run_logps: dict, base_logps: dict, beta: float) -> tuple[dict[str, float], torch.Tensor]:
    """Reward accuracy and mean margin of the run's implicit reward against its base; per-pair margins."""
    chosen = beta * (run_logps["chosen"] - base_logps["chosen"])
    rejected = beta * (run_logps["rejected"] - base_logps["rejected"])
    margins = chosen - rejected
    return {"reward_accuracy": float((margins > 0).double().mean()), "reward_margin": float(margins.mean()),
            "rewards_chosen": float(chosen.mean()), "rewards_rejected": float(rejected.mean())}, margins


def run_beta(manifest) -> float:
    """The run's ``pref_beta`` (from its manifest's stage record), else the default 0.1."""
    stage = getattr(manifest, "stage", None) or {}
    return float(stage.get("pref_beta", DEFAULT_BETA))


def reference_run(run, base_model: str | None = None, force: bool = False, warn=print):
    """(the model to compare a run with, its profile name, what it is): the SFT run a preference
    run started from (its training reference), else the run's base (the adapter switched off, or
    the base loaded alone)."""
    from chattune.evaluation.evaluate import load_compare
    from chattune.inference.runs import LoadOptions, load_run

    manifest = run.profile().manifest
    started = (getattr(manifest, "stage", None) or {}).get("started_from")
    if started:
        other = load_run(started, LoadOptions(force=force), warn=warn)
        return other, other.profile().name, f"the SFT run {started}"
    base_run, name = load_compare(run, "base", base_model=base_model, force=force, warn=warn)
    return base_run, name, "the base"


def evaluate_pairs(run, base_run, base_name: str, what: str, path: str, *, batch_size: int = 8, limit: int | None = None,
                   max_seq_length: int | None = None, log=print) -> tuple[dict, list[dict]]:
    """The preference figures of ``run`` (its default profile) on the pairs of ``path``, and of
    its base (``base_run``'s profile ``base_name``: the adapter switched off, or the base loaded
    alone); the result and one row per pair."""
    from chattune.evaluation.evaluate import ActiveAdapter

    profile = run.profile()
    length = max_seq_length or (profile.manifest.max_seq_length if profile.manifest else run.context_length)
    columns, audit = encode_pairs(path, run.tokenizer, profile.template, length, limit)
    log(f"eval: {audit['rows_out']} pairs of {audit['rows_in']} ({audit['rows_truncated']} truncated, "
        f"{audit['rows_dropped']} dropped), template {profile.template}")
    with ActiveAdapter(run, profile.adapter):
        mine = answer_log_probs(run.model, columns, run.tokenizer.pad_token_id, batch_size)
    base_profile = base_run.profile(base_name)
    with ActiveAdapter(base_run, base_profile.adapter if base_run is not run else BASE_ADAPTER):
        base = answer_log_probs(base_run.model, columns, base_run.tokenizer.pad_token_id, batch_size)
    beta = run_beta(profile.manifest)
    rewards, margins = reward_figures(mine, base, beta)
    result = {
        "data": {"path": str(path), "pairs": audit["rows_out"], "pairs_in": audit["rows_in"],
                 "truncated": audit["rows_truncated"], "dropped": audit["rows_dropped"],
                 "max_seq_length": length, "template": profile.template},
        "beta": beta,
        "reference": what,
        "metrics": {**rewards, **likelihood_figures(mine)},
        "base": likelihood_figures(base),
    }
    rows = [{"index": i, "reward_margin": float(margins[i]), "logps_chosen": float(mine["chosen"][i]),
             "logps_rejected": float(mine["rejected"][i]), "base_logps_chosen": float(base["chosen"][i]),
             "base_logps_rejected": float(base["rejected"][i])} for i in range(len(margins))]
    return result, rows


def format_pairs_result(result: dict, compare: bool) -> str:
    """The figures as a table: the run, and its reference (base or SFT run) beside it with ``compare``."""
    m, b = result["metrics"], result["base"]
    lines = [f"preference eval: {result['data']['pairs']} pairs from {result['data']['path']} "
             f"(beta {result['beta']:g}; rewards against {result['reference']})"]
    header = f"{'':<34} {'run':>10}" + (f" {'reference':>10}" if compare else "")
    lines.append(header)
    rows = [("reward accuracy (chosen > rejected)", m["reward_accuracy"], None),
            ("reward margin (mean)", m["reward_margin"], None),
            ("likelihood accuracy (summed)", m["likelihood_accuracy"], b["likelihood_accuracy"]),
            ("likelihood accuracy (per token)", m["per_token_likelihood_accuracy"], b["per_token_likelihood_accuracy"]),
            ("log-prob chosen (mean)", m["logps_chosen"], b["logps_chosen"]),
            ("log-prob rejected (mean)", m["logps_rejected"], b["logps_rejected"])]
    for name, value, base in rows:
        line = f"{name:<34} {value:>10.4f}"
        if compare:
            line += f" {base:>10.4f}" if base is not None else f" {'-':>10}"
        lines.append(line)
    return "\n".join(lines)


def write_pairs_result(out: Path, result: dict, rows: list[dict]) -> Path:
    """``preference.json`` (the figures) and ``preference_rows.jsonl`` (one line per pair) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "preference_rows.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    (out / "preference.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
