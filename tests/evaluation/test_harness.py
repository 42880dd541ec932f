"""lm-evaluation-harness tasks on a run (where lm_eval is installed): the harness scores the run as
chattune loads it, and the base with --compare base; checked against the harness on the run's
merged export and on the bare base model, loaded by the harness itself."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from chattune.cli import main

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional (pip install lm-eval)")

TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("harness")
    rows = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), str(i)], "answer": 0}
            for i in range(6)]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_choice.yaml").write_text(TASK.format(data=root / "data.jsonl"))
    return root


@pytest.fixture(scope="module")
def run(tiny_models, data_file, tmp_path_factory) -> Path:
    from chattune.config_io import build_config
    from chattune.training.recipe import train

    out = tmp_path_factory.mktemp("harness-run") / "run"
    train(build_config({"model_name_or_path": str(tiny_models("llama")), "train_files": [str(data_file)],
                        "output_dir": str(out), "max_steps": 6, "learning_rate": 1e-2, "save_steps": 100,
                        "max_seq_length": 64, "report_to": ["none"], "lora_target": "all-linear"}),
          log=lambda *_: None)
    return out


def loglikelihoods(results: dict) -> list[float]:
    return [float(resp[0]) for sample in results["samples"]["tiny_choice"] for resp in sample["filtered_resps"]]


def test_the_harness_scores_the_run_as_loaded_and_its_base_with_the_adapter_off(run, task_dir, tiny_models, tmp_path):
    from lm_eval.tasks import TaskManager

    from chattune.evaluation.harness import run_harness
    from chattune.inference.decoding import BASE_ADAPTER
    from chattune.inference.runs import LoadOptions, load_run

    loaded = load_run(str(run), LoadOptions())
    include = str(task_dir / "tasks")
    ours = run_harness(loaded, loaded.profile().adapter, ["tiny_choice"], include=include, log_samples=True)
    base = run_harness(loaded, BASE_ADAPTER, ["tiny_choice"], include=include, log_samples=True)
    assert loglikelihoods(ours) != pytest.approx(loglikelihoods(base), abs=1e-4)  # the adapter is on, then off
    code, _, err = cli("export", run, "--out", tmp_path / "merged")
    assert code == 0, err
    manager = TaskManager(include_path=include)
    merged = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'merged'},dtype=float32",
                                     tasks=["tiny_choice"], task_manager=manager, log_samples=True, bootstrap_iters=0,
                                     device="cpu")
    plain = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_models('llama')},dtype=float32",
                                    tasks=["tiny_choice"], task_manager=manager, log_samples=True, bootstrap_iters=0,
                                     device="cpu")
    assert loglikelihoods(ours) == pytest.approx(loglikelihoods(merged), abs=1e-3)
    assert loglikelihoods(base) == pytest.approx(loglikelihoods(plain), abs=1e-3)


def test_chattune_eval_lm_eval_writes_the_metrics_beside_the_base(run, task_dir):
    code, out, err = cli("eval", run, "--lm-eval", "tiny_choice", "--lm-eval-include", task_dir / "tasks",
                         "--compare", "base")
    assert code == 0, err
    result = json.loads((run / "eval" / "lm-eval" / "eval.json").read_text())
    assert set(result["metrics"]) == {"tiny_choice/acc"} and 0 <= result["metrics"]["tiny_choice/acc"] <= 1
    assert result["compare"]["name"] == "base" and "tiny_choice/acc" in result["compare"]["metrics"]
    assert result["data"]["samples"] == {"tiny_choice": 6}
    assert "tiny_choice/acc" in out and (run / "eval" / "lm-eval" / "results.json").is_file()
    code, _, err = cli("eval", run, "--lm-eval", "no_such_task", "--lm-eval-include", task_dir / "tasks")
    assert code == 2 and "--lm-eval: no task no_such_task" in err
