"""Callbacks: metrics.jsonl gets every log event with tokens/s and a word on a NaN loss; every
checkpoint the Trainer saves gets the manifest and config; a collapsed model is warned about."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import yaml

from chattune.config_io import build_config
from chattune.training.callbacks import CollapseWatch, ManifestWriter, MetricsLogger


def test_metrics_logger_appends_every_event_with_tokens_per_second(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(path)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=100, is_world_process_zero=True)
    args = SimpleNamespace(world_size=1)
    logger.on_train_begin(args, state, None)
    state.global_step, state.num_input_tokens_seen = 2, 612
    logger.on_log(args, state, None, logs={"loss": 2.5, "learning_rate": 1e-3})
    logger.on_log(args, state, None, logs={"eval_loss": 2.75})
    state.global_step = 3
    logger.on_log(args, state, None, logs={"loss": float("nan")})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 3]
    assert rows[0]["loss"] == 2.5 and rows[0]["learning_rate"] == 1e-3 and rows[0]["tokens_per_second"] > 0
    assert rows[1] == {"step": 2, "eval_loss": 2.75}  # tokens/s only with a training loss
    assert rows[2]["tokens_per_second"] == 0.0  # no tokens seen since the last loss
    assert "loss is nan at step 3" in capsys.readouterr().out


def test_with_several_processes_rank_0_writes_total_and_per_device_tokens_per_second(tmp_path):
    path = tmp_path / "metrics.jsonl"
    args = SimpleNamespace(world_size=2)
    for rank in (0, 1):
        logger = MetricsLogger(path)
        state = SimpleNamespace(global_step=0, num_input_tokens_seen=0, is_world_process_zero=rank == 0)
        logger.on_train_begin(args, state, None)
        state.global_step, state.num_input_tokens_seen = 2, 4000  # the Trainer's sum over processes
        logger.on_log(args, state, None, logs={"loss": 2.5})
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]  # rank 1 wrote nothing
    assert row["world_size"] == 2
    assert abs(row["tokens_per_second_per_device"] - row["tokens_per_second"] / 2) <= 0.1


def test_manifest_writer_writes_the_run_files_into_a_checkpoint_being_saved(tmp_path):
    config = build_config({"model_name_or_path": "base", "output_dir": str(tmp_path)})
    manifest = SimpleNamespace(to_json=lambda: {"chattune_version": "test"})
    writer = ManifestWriter(manifest, config)
    staging = tmp_path / "tmp-checkpoint-4"
    staging.mkdir()
    writer.write_checkpoint_files(staging, SimpleNamespace(global_step=4))
    written = json.loads((staging / "chattune.json").read_text())
    assert written == {"chattune_version": "test", "global_step": 4}
    assert yaml.safe_load((staging / "chattune.yaml").read_text())["model_name_or_path"] == "base"


def test_collapse_watch_warns_once_after_patience_dead_logging_steps():
    lines = []
    watch = CollapseWatch(878, 1e3, patience=3, log=lines.append)
    state = SimpleNamespace(global_step=0)
    dead = {"loss": math.log(878) + 0.01, "grad_norm": 0.0}
    for step, logs in enumerate([dead, dead, {"loss": 6.0, "grad_norm": 0.0}, dead, dead, {"eval_loss": 1.0},
                                 dead, dead, dead], start=1):
        state.global_step = step
        watch.on_log(None, state, None, logs=logs)
    assert len(lines) == 1
    assert "collapsed by step 7" in lines[0] and "ln(878)" in lines[0] and "learning_rate=1000 is too high" in lines[0]
    quiet = CollapseWatch(878, 1e-4, log=lines.append)  # a fresh model sits at ln(V) too, but it learns
    for step in range(5):
        quiet.on_log(None, SimpleNamespace(global_step=step), None, logs={"loss": math.log(878), "grad_norm": 0.9})
    assert len(lines) == 1


def _state(step: int, max_steps: int = 100, zero: bool = True):
    return SimpleNamespace(global_step=step, max_steps=max_steps, epoch=step / 50, is_world_process_zero=zero)


def test_progress_writer_writes_the_step_and_the_time_left_at_this_pace(tmp_path, monkeypatch):
    import threading
    import time

    from chattune.training import callbacks

    clock, real_time, caller = iter([1000.0, 1000.0, 1010.0, 1010.0, 1020.0, 1020.0]), time.time, threading.get_ident()
    # (time.time is global: a thread left by another test, such as wandb's, must keep its real clock)
    monkeypatch.setattr(callbacks.time, "time",
                        lambda: next(clock) if threading.get_ident() == caller else real_time())
    writer = callbacks.ProgressWriter(tmp_path, interval=0.0)
    writer.on_train_begin(None, _state(20), None)  # resumed at step 20
    writer.on_step_end(None, _state(30), None)
    written = json.loads((tmp_path / "progress.json").read_text())
    assert written == {"phase": "training", "step": 30, "max_steps": 100, "epoch": 0.6, "elapsed": 10.0,
                       "eta_seconds": 70.0, "updated": 1010.0}  # 10 steps in 10 s: 70 left
    writer.on_train_end(None, _state(40), None)
    assert json.loads((tmp_path / "progress.json").read_text())["phase"] == "ended"
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no staging file left
    other = callbacks.ProgressWriter(tmp_path / "rank1")
    other.on_train_begin(None, _state(0, zero=False), None)
    assert not (tmp_path / "rank1").exists()


def test_stop_on_signal_checkpoints_the_step_under_way_and_ends_training():
    import signal

    from transformers import TrainerControl

    from chattune.training.callbacks import StopOnSignal

    said = []
    stopper = StopOnSignal(log=said.append)
    control = TrainerControl()
    stopper.on_step_end(None, _state(3), control)
    assert not control.should_save and not control.should_training_stop  # nothing asked yet
    stopper.handle(signal.SIGTERM, None)
    stopper.on_step_end(None, _state(4), control)
    assert control.should_save and control.should_training_stop and stopper.stopped_at == 4
    assert said[-1].startswith("chattune: stopped at step 4: checkpoint-4 written")
    first_ctrl_c = StopOnSignal(log=said.append)
    first_ctrl_c.handle(signal.SIGINT, None)
    try:
        first_ctrl_c.handle(signal.SIGINT, None)
        raise AssertionError("a second Ctrl-C must interrupt at once")
    except KeyboardInterrupt:
        pass


def test_stop_on_signal_puts_the_handlers_back():
    import signal

    from chattune.training.callbacks import StopOnSignal

    before = signal.getsignal(signal.SIGTERM)
    stopper = StopOnSignal().install()
    assert signal.getsignal(signal.SIGTERM) == stopper.handle
    stopper.restore()
    assert signal.getsignal(signal.SIGTERM) == before
