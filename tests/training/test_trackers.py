"""Experiment trackers through report_to: names and packages checked before a model loads; MLflow
(its file store) and Weights & Biases (offline) get the run's name, project, tags, the metrics of
metrics.jsonl (tokens/s included) and, once, the config and manifest."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from chattune.config_io import build_config
from chattune.errors import ConfigError
from chattune.training import trackers
from chattune.training.recipe import train


def config(model: Path, data: Path, out: Path, **extra):
    return build_config({"model_name_or_path": str(model), "train_files": [str(data)], "output_dir": str(out),
                         "max_steps": 6, "logging_steps": 2, "save_steps": 100, "max_seq_length": 64,
                         "per_device_train_batch_size": 2, "seed": 3, **extra})


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_names_and_packages_are_checked_naming_the_key(monkeypatch, tmp_path):
    base = {"model_name_or_path": "m", "train_files": "a.json", "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="report_to: unknown tracker 'wandbb'; expected some of tensorboard, wandb"):
        trackers.check_trackers(build_config({**base, "report_to": "wandbb"}))
    with pytest.raises(ConfigError, match="report_to: 'none' with mlflow; give either"):
        trackers.check_trackers(build_config({**base, "report_to": "none,mlflow"}))
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"report_to: swanlab: its package is not installed; pip install swanlab"):
        trackers.check_trackers(build_config({**base, "report_to": "swanlab"}))
    assert trackers.check_trackers(build_config({**base, "report_to": "none"})) == []


def test_the_project_and_tags_reach_each_trackers_variables(tmp_path):
    made = build_config({"model_name_or_path": "m", "train_files": "a.json", "output_dir": str(tmp_path / "r"),
                         "report_to": "wandb,mlflow,swanlab", "project": "p", "tags": "x,y"})
    assert trackers.tracker_environment(made) == {
        "WANDB_PROJECT": "p", "WANDB_TAGS": "x,y", "MLFLOW_EXPERIMENT_NAME": "p",
        "MLFLOW_TAGS": '{"x": "true", "y": "true"}', "SWANLAB_PROJECT": "p"}
    assert trackers.run_name(made) == "r"


mlflow = pytest.importorskip("mlflow", reason="MLflow is in the test extra (pip install mlflow-skinny)")


def test_mlflow_gets_the_runs_name_tags_metrics_config_and_manifest(tiny_models, data_file, tmp_path, monkeypatch):
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store works offline, needs no database
    out = tmp_path / "run"
    train(config(tiny_models("llama"), data_file, out, report_to="mlflow", project="proj", run_name="first",
                 tags="alpaca,tiny"), log=lambda *_: None)
    assert "MLFLOW_EXPERIMENT_NAME" not in os.environ  # put back after the training
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("proj")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["mlflow.runName"] == "first"
    assert run.data.tags["alpaca"] == run.data.tags["tiny"] == "true"
    rows = [row for row in metrics_rows(out) if "loss" in row]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == pytest.approx({row["step"]: row["loss"] for row in rows})
    speeds = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "tokens_per_second")}
    assert speeds == pytest.approx({row["step"]: row["tokens_per_second"] for row in rows})
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="chattune",
                                                      tracking_uri=store.as_uri(), dst_path=str(tmp_path / "got")))
    assert json.loads((folder / "config.json").read_text())["output_dir"] == str(out)
    assert json.loads((folder / "manifest.json").read_text())["method"]["name"] == "lora"


wandb = pytest.importorskip("wandb", reason="wandb is in the test extra (pip install wandb)")


def wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` file (LevelDB's log format: 32 KiB blocks of
    checksum, length and type headers, a record split over blocks as first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, parts = 7, 32768, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def test_wandb_offline_gets_the_runs_name_tags_metrics_config_and_manifest(tiny_models, data_file, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(config(tiny_models("llama"), data_file, out, report_to="wandb", project="proj", tags="a,b"),
          log=lambda *_: None)
    wandb.finish()
    assert "WANDB_PROJECT" not in os.environ
    (path,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")
    records = list(wandb_records(path))
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "run" for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)  # wandb's service process may still be writing the file after finish() (seen once in CI)
        records = list(wandb_records(path))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, list(run.tags)) == ("proj", "run", ["a", "b"])
    config_items = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
                    for item in r.config.update if item.key.startswith("chattune_")}
    assert config_items["chattune_config"]["output_dir"] == str(out)
    assert config_items["chattune_manifest"]["method"]["name"] == "lora"
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = {row["train/global_step"]: (row["train/loss"], row["train/tokens_per_second"])
              for row in history if "train/loss" in row}
    rows = [row for row in metrics_rows(out) if "loss" in row]
    assert logged == {row["step"]: (pytest.approx(row["loss"]), pytest.approx(row["tokens_per_second"]))
                      for row in rows}
