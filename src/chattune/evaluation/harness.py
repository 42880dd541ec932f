"""lm-evaluation-harness tasks on a run, where ``lm_eval`` is installed: ``chattune eval RUN --lm-eval TASKS``.

The run is loaded as chattune loads it for chat and serve (base model, adapter, recorded RoPE
scaling) and handed to the harness as its model object (``lm_eval.models.huggingface.HFLM``
over the loaded model), so the harness scores exactly what chattune serves; ``--compare base``
scores the same tasks with the adapter switched off. Tasks are the harness's own (their data
come from the hub, or its cache offline) or local YAML tasks in ``--lm-eval-include DIR``.
Results go to ``RUN/eval/lm-eval/`` (``eval.json``, which the runs view shows, and the
harness's ``results.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

from chattune.errors import ConfigError


def harness_available() -> bool:
    """Whether lm-evaluation-harness can be imported."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def run_harness(run, adapter: str, tasks: list[str], *, include: str | None = None, n_shot: int | None = None,
                limit: int | None = None, batch_size: int = 8, log_samples: bool = False) -> dict:
    """The harness's results of ``tasks`` on ``run`` with ``adapter`` active (a dict as
    ``lm_eval.simple_evaluate`` returns it)."""
    if not harness_available():
        raise ConfigError("--lm-eval: lm-evaluation-harness is not installed; pip install lm-eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from chattune.evaluation.evaluate import ActiveAdapter

    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise ConfigError(f"--lm-eval: no task {', '.join(unknown)} in lm-eval"
                          + (f" or {include}" if include else "") + " (lm-eval --tasks list shows them)")
    model = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    lm = HFLM(pretrained=model, tokenizer=run.tokenizer, batch_size=batch_size)
    was_training = run.model.training
    run.model.eval()
    try:
        with ActiveAdapter(run, adapter):
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=n_shot, limit=limit,
                                              task_manager=manager, log_samples=log_samples,
                                              bootstrap_iters=0)
    finally:
        run.model.train(was_training)
    if results is None:
        raise ConfigError("--lm-eval: the harness returned no results")
    return results


def harness_metrics(results: dict) -> dict[str, float]:
    """The numeric metrics of each task as ``TASK/METRIC`` (the harness's ``,none`` filter suffix dropped)."""
    metrics = {}
    for task, values in results.get("results", {}).items():
        for name, value in values.items():
            metric = "," in name and "_stderr" not in name  # METRIC,FILTER: others are the task's bookkeeping
            if metric and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{task}/{name.removesuffix(',none')}"] = value
    return metrics


def harness_result(tasks: list[str], results: dict, other: dict | None, other_name: str | None) -> dict:
    """The eval.json of a harness run, with the comparison when there is one."""
    ours = harness_metrics(results)
    result = {"benchmark": "lm-eval", "metrics": ours,
              "data": {"lm_eval_tasks": tasks, "n_shot": results.get("config", {}).get("num_fewshot"),
                       "samples": {task: n.get("effective", n.get("original")) if isinstance(n, dict) else n
                                   for task, n in results.get("n-samples", {}).items()}}}
    if other is not None:
        theirs = harness_metrics(other)
        result["compare"] = {"name": other_name, "metrics": theirs,
                             "better": [k for k in ours if ours[k] > theirs.get(k, ours[k])],
                             "worse": [k for k in ours if ours[k] < theirs.get(k, ours[k])],
                             "same": [k for k in ours if ours[k] == theirs.get(k)]}
    return result


def write_harness(out: Path, result: dict, results: dict) -> None:
    """``eval.json`` and the harness's own ``results.json`` (without per-sample logs)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    kept = {key: value for key, value in results.items() if key != "samples"}
    (out / "results.json").write_text(json.dumps(kept, indent=2, ensure_ascii=False, default=str), encoding="utf-8")


def format_harness(result: dict, name: str) -> str:
    """The metrics as printed, with the comparison's column."""
    other = result.get("compare")
    lines = [f"{'metric':<40} {name:>12}" + (f" {other['name']:>12}" if other else "")]
    for key, value in result["metrics"].items():
        line = f"{key:<40} {value:>12.4f}"
        if other:
            theirs = other["metrics"].get(key)
            line += f" {theirs:>12.4f}" if theirs is not None else f" {'-':>12}"
        lines.append(line)
    return "\n".join(lines)
