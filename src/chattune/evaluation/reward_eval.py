"""``chattune eval RM_RUN --data PAIRS``: how often a reward model scores the chosen answer of
held-out pairs above the rejected one.

Each answer is rendered with the run's template after its prompt, as training rendered it, and
scored by the reward head (:class:`chattune.inference.reward.RewardScorer`):

- **pair accuracy**: the share of pairs with r(chosen) > r(rejected);
- **reward margin**: the mean of r(chosen) - r(rejected), with the mean rewards of each side.

With ``--compare base`` the same figures of the run's starting point sit beside them: the base
model with a new head drawn from the run's seed (untrained, so about 50% on pairs it has no
reason to rank; a random head can still be lucky on pairs that differ in one fixed way).
"""

from __future__ import annotations

from chattune.evaluation.preference_eval import encode_pairs
from chattune.inference.reward import RewardScorer


def pair_rewards(scorer: RewardScorer, columns: dict, batch_size: int | None = None) -> tuple[list[float], list[float]]:
    """(rewards of the chosen answers, rewards of the rejected ones) of encoded pairs under ``scorer``."""
    chosen = [list(p) + list(a) for p, a in zip(columns["prompt_ids"], columns["chosen_ids"], strict=True)]
    rejected = [list(p) + list(a) for p, a in zip(columns["prompt_ids"], columns["rejected_ids"], strict=True)]
    return scorer.score_ids(chosen, batch_size), scorer.score_ids(rejected, batch_size)


def reward_pair_figures(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Pair accuracy (share with chosen > rejected), mean margin and mean rewards."""
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = len(margins)
    return {"pair_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n,
            "rewards_chosen": sum(chosen) / n, "rewards_rejected": sum(rejected) / n}


def evaluate_reward_pairs(scorer: RewardScorer, path: str, base: RewardScorer | None = None, *,
                          batch_size: int | None = None, limit: int | None = None,
                          log=print) -> tuple[dict, list[dict]]:
    """The reward model's figures on the pairs of ``path`` (and, given ``base``, the untrained
    head's); the result and one row per pair. DataError when no pair of the file can be encoded."""
    columns, audit = encode_pairs(path, scorer.tokenizer, scorer.template, scorer.max_seq_length, limit)
    log(f"eval: {audit['rows_out']} pairs of {audit['rows_in']} ({audit['rows_truncated']} truncated, "
        f"{audit['rows_dropped']} dropped), template {scorer.template}")
    chosen, rejected = pair_rewards(scorer, columns, batch_size)
    result = {
        "data": {"path": str(path), "pairs": audit["rows_out"], "pairs_in": audit["rows_in"],
                 "truncated": audit["rows_truncated"], "dropped": audit["rows_dropped"],
                 "max_seq_length": scorer.max_seq_length, "template": scorer.template},
        "stage": "rm",
        "metrics": reward_pair_figures(chosen, rejected),
        "base": None,
    }
    rows = [{"index": i, "reward_chosen": c, "reward_rejected": r, "reward_margin": c - r}
            for i, (c, r) in enumerate(zip(chosen, rejected, strict=True))]
    if base is not None:
        base_chosen, base_rejected = pair_rewards(base, columns, batch_size)
        result["base"] = reward_pair_figures(base_chosen, base_rejected)
        result["reference"] = "the base model with an untrained head (the run's seed)"
        for row, c, r in zip(rows, base_chosen, base_rejected, strict=True):
            row.update({"base_reward_chosen": c, "base_reward_rejected": r})
    return result, rows


def format_reward_result(result: dict) -> str:
    """The figures as a table: the run, and the untrained head beside it when compared."""
    m, b = result["metrics"], result["base"]
    lines = [f"reward model eval: {result['data']['pairs']} pairs from {result['data']['path']}"]
    lines.append(f"{'':<34} {'run':>10}" + (f" {'untrained':>10}" if b else ""))
    for key, name in (("pair_accuracy", "pair accuracy (chosen > rejected)"), ("reward_margin", "reward margin (mean)"),
                      ("rewards_chosen", "reward chosen (mean)"), ("rewards_rejected", "reward rejected (mean)")):
        lines.append(f"{name:<34} {m[key]:>10.4f}" + (f" {b[key]:>10.4f}" if b else ""))
    return "\n".join(lines)
