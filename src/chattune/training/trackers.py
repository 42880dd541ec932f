"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and SwanLab through ``report_to``.

transformers' own callbacks do the logging; chattune checks the names and packages before a
model loads, hands them the run's name, project and tags (:func:`tracker_environment`: the
environment variables each callback reads), and logs the run's config and manifest once
(:class:`TrackerRecords`). The metrics are those of ``metrics.jsonl``: the
:class:`~chattune.training.callbacks.MetricsLogger` runs first and adds tokens/s to the very
log event the trackers then receive.

Offline use is each tool's own: ``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI=file:./mlruns``,
``SWANLAB_MODE=local``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

from transformers import TrainerCallback

from chattune.config import RunConfig
from chattune.errors import ConfigError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "swanlab": "swanlab"}
"""``report_to`` names chattune wires, and the module each needs."""
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny (or mlflow)",
           "swanlab": "swanlab"}
DEFAULT_PROJECT = "chattune"


def tracker_names(config: RunConfig) -> list[str]:
    """The trackers ``report_to`` names (none for ``none``)."""
    return [name for name in config.train.report_to if name != "none"]


def check_trackers(config: RunConfig, where: str = "") -> list[str]:
    """The trackers ``report_to`` names (none for ``none``), after checking each is known and
    its package installed: a ConfigError naming the key and the ``pip install`` otherwise."""
    names = tracker_names(config)
    if "none" in config.train.report_to and names:
        raise ConfigError(f"{where}report_to: 'none' with {', '.join(names)}; give either")
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{where}report_to: unknown tracker {name!r}; expected some of "
                              f"{', '.join(TRACKERS)} or none")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"{where}report_to: {name}: its package is not installed; pip install {INSTALL[name]}")
    return names


def run_name(config: RunConfig) -> str:
    """The run's name in the trackers: ``run_name``, else the run folder's name."""
    return config.train.run_name or Path(config.train.output_dir).name


def tracker_environment(config: RunConfig) -> dict[str, str]:
    """The environment variables transformers' tracker callbacks read for the project and tags
    (the run's name goes through ``TrainingArguments.run_name``)."""
    t = config.train
    names = tracker_names(config)
    project = t.project or DEFAULT_PROJECT
    tags = list(t.tags or [])
    env: dict[str, str] = {}
    if "wandb" in names:
        env["WANDB_PROJECT"] = project
        if tags:
            env["WANDB_TAGS"] = ",".join(tags)
    if "mlflow" in names:
        env["MLFLOW_EXPERIMENT_NAME"] = project
        if tags:
            env["MLFLOW_TAGS"] = json.dumps({tag: "true" for tag in tags})
    if "swanlab" in names:
        env["SWANLAB_PROJECT"] = project
    return env


@contextlib.contextmanager
def tracker_env(config: RunConfig):
    """Set :func:`tracker_environment` for the training, and put the environment back after."""
    values = tracker_environment(config)
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield values
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _plain(value):
    return json.loads(json.dumps(value, default=str))


class TrackerRecords(TrainerCallback):
    """Logs the run's config (its flat keys) and manifest once, when training begins, to each
    tracker in ``names`` (after transformers' callbacks have opened their runs)."""

    def __init__(self, names: list[str], config: dict, manifest: dict):
        self.names, self.config, self.manifest = names, _plain(config), _plain(manifest)

    def on_train_begin(self, args, state, control, **kwargs):
        """Log the records (only the first process of a job)."""
        if not state.is_world_process_zero:
            return
        if "wandb" in self.names:
            import wandb

            if wandb.run is not None:
                wandb.config.update({"chattune_config": self.config, "chattune_manifest": self.manifest},
                                    allow_val_change=True)
        if "mlflow" in self.names:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_dict(self.config, "chattune/config.json")
                mlflow.log_dict(self.manifest, "chattune/manifest.json")
        if "swanlab" in self.names:
            import swanlab

            if getattr(swanlab, "get_run", lambda: None)() is not None:
                swanlab.config.update({"chattune_config": self.config, "chattune_manifest": self.manifest})
