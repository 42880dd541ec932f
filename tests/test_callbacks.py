"""Callbacks: metrics.jsonl gets every log event with tokens/s and a word on a NaN loss; every
checkpoint the Trainer saves gets the manifest and config."""

from __future__ import annotations

import json
from types import SimpleNamespace

import yaml

from chattune.callbacks import ManifestWriter, MetricsLogger
from chattune.config_io import build_config


def test_metrics_logger_appends_every_event_with_tokens_per_second(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(path)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=100)
    logger.on_train_begin(None, state, None)
    state.global_step, state.num_input_tokens_seen = 2, 612
    logger.on_log(None, state, None, logs={"loss": 2.5, "learning_rate": 1e-3})
    logger.on_log(None, state, None, logs={"eval_loss": 2.75})
    state.global_step = 3
    logger.on_log(None, state, None, logs={"loss": float("nan")})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 3]
    assert rows[0]["loss"] == 2.5 and rows[0]["learning_rate"] == 1e-3 and rows[0]["tokens_per_second"] > 0
    assert rows[1] == {"step": 2, "eval_loss": 2.75}  # tokens/s only with a training loss
    assert rows[2]["tokens_per_second"] == 0.0  # no tokens seen since the last loss
    assert "loss is nan at step 3" in capsys.readouterr().out


def test_manifest_writer_makes_each_saved_checkpoint_a_run_folder(tmp_path):
    config = build_config({"model_name_or_path": "base", "output_dir": str(tmp_path)})
    manifest = SimpleNamespace(to_json=lambda: {"chattune_version": "test"})
    writer = ManifestWriter(manifest, config)
    (tmp_path / "checkpoint-4").mkdir()
    writer.on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=4), None)
    written = json.loads((tmp_path / "checkpoint-4" / "chattune.json").read_text())
    assert written == {"chattune_version": "test", "global_step": 4}
    assert yaml.safe_load((tmp_path / "checkpoint-4" / "chattune.yaml").read_text())["model_name_or_path"] == "base"
    writer.on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=8), None)
    assert not (tmp_path / "checkpoint-8").exists()  # no checkpoint saved at that step: nothing written
