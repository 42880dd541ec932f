"""Run folders as the web page sees them: found, summarized, metrics read as they grow."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from chattune.serve.run_info import (
    RunEntry,
    find_runs,
    metrics_since,
    run_detail,
    run_id,
    run_state,
    run_summary,
)

MANIFEST = {"base_model": {"path": "/models/tiny", "model_type": "glm4"},
            "method": {"name": "lora", "lora_rank": 8, "use_dora": False, "lora_target": None},
            "template": {"name": "chatglm3"}, "data_fingerprint": "ab12", "global_step": 40,
            "train_loss": 1.5, "eval_loss": None, "max_seq_length": 96, "trainable_parameters": 15360}


def finished_run(folder: Path, manifest: dict = MANIFEST) -> Path:
    folder.mkdir(parents=True)
    (folder / "chattune.json").write_text(json.dumps(manifest))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    return folder


def test_finds_served_runs_and_runs_under_a_folder_but_not_their_checkpoints(tmp_path):
    served = finished_run(tmp_path / "served")
    nested = finished_run(tmp_path / "runs" / "project" / "lora-1")
    finished_run(nested / "checkpoint-20")
    training = tmp_path / "runs" / "live"
    training.mkdir(parents=True)
    (training / "data_audit.json").write_text("{}")
    (tmp_path / "runs" / "not-a-run").mkdir()
    found = find_runs({"a": served, "a-again": served, "base": None}, tmp_path / "runs")
    assert [e.path for e in found.values()] == [served, training, nested]
    assert found[run_id(served)].served_as == ["a", "a-again"]
    assert found[run_id(nested)].served_as == []


def test_a_runs_dir_that_is_itself_a_run_is_listed(tmp_path):
    run = finished_run(tmp_path / "run")
    assert [e.path for e in find_runs({}, run).values()] == [run]
    assert find_runs({}, tmp_path / "missing") == {}


def test_summary_of_a_finished_run(tmp_path):
    run = finished_run(tmp_path / "r")
    summary = run_summary(RunEntry(run_id(run), run, ["a"]))
    assert summary["state"] == "finished" and summary["served_as"] == ["a"] and summary["name"] == "r"
    assert summary["manifest"] == {
        "from_checkpoint": False, "base_model": "/models/tiny", "model_type": "glm4", "method": "lora",
        "method_settings": {"lora_rank": 8}, "template": "chatglm3", "data_fingerprint": "ab12",
        "max_seq_length": 96, "global_step": 40, "train_loss": 1.5, "eval_loss": None,
        "trainable_parameters": 15360, "chattune_version": None, "stage": None}


def test_summary_of_a_preference_run_has_its_stage(tmp_path):
    stage = {"name": "dpo", "pref_beta": 0.1, "pref_loss": "sigmoid", "pref_label_smoothing": 0.0,
             "pref_ftx": 0.0, "reference": "adapter_off"}
    run = finished_run(tmp_path / "dpo", {**MANIFEST, "stage": stage})
    assert run_summary(RunEntry(run_id(run), run))["manifest"]["stage"] == stage
    assert run_detail(RunEntry(run_id(run), run))["manifest"]["stage"] == stage
    odd = finished_run(tmp_path / "odd", {**MANIFEST, "stage": "dpo"})  # not an object: not shown as a stage
    assert run_summary(RunEntry(run_id(odd), odd))["manifest"]["stage"] is None


def test_a_run_still_training_shows_its_latest_checkpoints_manifest(tmp_path):
    run = tmp_path / "r"
    finished_run(run / "checkpoint-5", {**MANIFEST, "global_step": 5})
    finished_run(run / "checkpoint-10", {**MANIFEST, "global_step": 10})
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    summary = run_summary(RunEntry(run_id(run), run))
    assert summary["state"] == "training"
    assert summary["manifest"]["global_step"] == 10 and summary["manifest"]["from_checkpoint"] is True
    old = time.time() - 3600
    os.utime(run / "metrics.jsonl", (old, old))
    assert run_state(run) == "incomplete"  # stopped or crashed: no final manifest, nothing written lately


def test_detail_has_the_audit_and_evaluations(tmp_path):
    run = finished_run(tmp_path / "r")
    (run / "data_audit.json").write_text(json.dumps({"rows": 10, "supervised_tokens": 120}))
    (run / "eval" / "dev").mkdir(parents=True)
    (run / "eval" / "dev" / "eval.json").write_text(json.dumps({
        "metrics": {"rouge-l": 40.0}, "data": {"rows": 5},
        "compare": {"name": "base", "metrics": {"rouge-l": 10.0}, "better": {"rouge-l": 4}, "worse": {"rouge-l": 0},
                    "same": {"rouge-l": 1}, "changed_most": [{"index": 0}]}}))
    (run / "eval" / "broken").mkdir()
    (run / "eval" / "broken" / "eval.json").write_text("{not json")
    detail = run_detail(RunEntry(run_id(run), run))
    assert detail["audit"] == {"rows": 10, "supervised_tokens": 120}
    broken, dev = detail["evaluations"]
    assert broken["name"] == "broken" and "not readable JSON" in broken["error"]
    assert dev == {"name": "dev", "metrics": {"rouge-l": 40.0}, "data": {"rows": 5},
                   "compare": {"name": "base", "metrics": {"rouge-l": 10.0}, "better": {"rouge-l": 4},
                               "worse": {"rouge-l": 0}, "same": {"rouge-l": 1}}}
    assert run_detail(RunEntry("x", tmp_path / "empty"))["audit"] is None


def test_metrics_are_read_once_each_complete_line_at_a_time(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": NaN}\n[1]\nnot json\n{"step": 3, "lo')
    first = metrics_since(tmp_path, 0)
    assert first["rows"] == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None}]  # NaN cannot travel as JSON
    assert first["bad"] == 2 and first["reset"] is False
    assert first["offset"] == path.read_bytes().rindex(b"\n") + 1  # the half-written line waits
    with path.open("a") as handle:
        handle.write('ss": 0.5}\n{"step": 4, "loss": 0.25}\n')
    second = metrics_since(tmp_path, first["offset"])
    assert second["rows"] == [{"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.25}]
    assert metrics_since(tmp_path, second["offset"])["rows"] == []
    path.write_text('{"step": 1, "loss": 9.0}\n')  # a new training in the same folder
    again = metrics_since(tmp_path, second["offset"])
    assert again["reset"] is True and again["rows"] == [{"step": 1, "loss": 9.0}]
    assert metrics_since(tmp_path / "nothing", 0) == {"rows": [], "offset": 0, "bad": 0, "size": 0, "reset": False}
