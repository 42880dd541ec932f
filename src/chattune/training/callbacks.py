"""Trainer callbacks: what chattune writes into a run folder while transformers trains.

- :class:`MetricsLogger`: every log event as a line of ``metrics.jsonl``, with tokens/s,
  and a clear word when the loss goes NaN;
- :class:`ManifestWriter`: the manifest and config in every checkpoint, so that each one
  is a self-describing run folder (written by the trainer into the checkpoint before it is
  renamed into place, so that a checkpoint is never without them);
- :class:`CollapseWatch`: a warning when the model has collapsed (gradient norm 0 and the
  loss at ln(vocabulary size), the loss of a uniform guess) for several logging steps;
- :class:`EarlyStopping`: training stops when an eval metric has not improved for a number of
  evaluations (the checkpoints written so far stay);
- :class:`ProgressWriter`: ``progress.json`` (step, steps in all, time left) for whoever watches
  the run (the workbench's page);
- :class:`StopOnSignal`: SIGTERM, or a first Ctrl-C, ends training after the current step with a
  checkpoint written, so that a stopped run resumes where it stopped;
- :class:`StreamAudit`: a streamed run's data audit with the counts so far, in every checkpoint
  and in the run folder at each save and when training ends.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from chattune.config import RunConfig
from chattune.manifest import Manifest, write_run_files


class MetricsLogger(TrainerCallback):
    """Appends every log event (loss, lr, grad norm, tokens/s, eval loss) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self.last_time: float | None = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the tokens/s clock (also on resume)."""
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Append the event, with tokens/s since the last training loss (all processes
        together, and per device when there are several); warn on a NaN/inf loss. Only the
        first process of a job writes."""
        if not state.is_world_process_zero:
            return
        logs = logs if logs is not None else {}  # the event itself: trackers after this callback see tokens/s
        now = time.perf_counter()
        counted = getattr(args, "include_num_input_tokens_seen", "non_padding") != "no"  # (grpo counts none)
        if "loss" in logs and self.last_time is not None and counted:
            seen = state.num_input_tokens_seen  # summed over the processes by the Trainer
            elapsed = max(now - self.last_time, 1e-9)
            logs["tokens_per_second"] = round((seen - self.last_tokens) / elapsed, 1)
            if args.world_size > 1:
                logs["tokens_per_second_per_device"] = round(logs["tokens_per_second"] / args.world_size, 1)
                logs["world_size"] = args.world_size
            self.last_time, self.last_tokens = now, seen
        loss = logs.get("loss")
        if isinstance(loss, float) and (math.isnan(loss) or math.isinf(loss)):
            print(f"chattune: loss is {loss} at step {state.global_step}. Under fp16 this usually "
                  "means overflow: lower learning_rate, use bf16, or train in float32.")
        row = {"step": state.global_step, **logs}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


class ManifestWriter(TrainerCallback):
    """Makes each checkpoint a self-describing run folder (manifest + config)."""

    def __init__(self, manifest: Manifest, config: RunConfig):
        self.manifest = manifest
        self.config = config

    def write_checkpoint_files(self, folder: Path, state) -> None:
        """Write the run files into a checkpoint being saved (called by
        :meth:`chattune.training.trainer.ChattuneTrainer._save_checkpoint` before the rename)."""
        write_run_files(folder, self.manifest, self.config, {"global_step": state.global_step})


class StreamAudit(TrainerCallback):
    """Keeps a streamed run's data audit (``path``, the run folder's) current: ``audit`` with the
    counts so far (``counts()``, e.g. :meth:`chattune.data.stream.ConversationStream.audit`)
    written into each checkpoint being saved and into ``path`` then and when training ends
    (by the first process)."""

    def __init__(self, path: Path, audit: dict, counts):
        self.path, self.audit, self.counts = path, audit, counts

    def current(self) -> dict:
        """The audit with the counts so far."""
        return {**self.audit, **self.counts()}

    def write(self, path: Path) -> None:
        """Write the audit so far to ``path``."""
        path.write_text(json.dumps(self.current(), indent=2, ensure_ascii=False), encoding="utf-8")

    def write_checkpoint_files(self, folder: Path, state) -> None:
        """Write the audit so far into a checkpoint being saved and into the run folder."""
        self.write(folder / self.path.name)
        self.write(self.path)

    def on_train_end(self, args, state, control, **kwargs):
        """Write the audit as training leaves it."""
        if state.is_world_process_zero:
            self.write(self.path)


class CollapseWatch(TrainerCallback):
    """Warns once when the model looks dead: for ``patience`` logging steps in a row the
    gradient norm is 0 and the loss is within ``tolerance`` of ln(vocab_size), the loss of a
    uniform guess over the vocabulary; training goes on, but nothing is being learnt."""

    def __init__(self, vocab_size: int, learning_rate: float, patience: int = 3, tolerance: float = 0.02,
                 log=print):
        self.uniform_loss = math.log(vocab_size)
        self.vocab_size = vocab_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.tolerance = tolerance
        self.log = log
        self.streak = 0
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Count logging steps in a row that look collapsed; warn at ``patience`` of them."""
        logs = logs or {}
        loss, norm = logs.get("loss"), logs.get("grad_norm")
        if loss is None or norm is None:
            return
        dead = (abs(float(norm)) <= 1e-12
                and abs(float(loss) - self.uniform_loss) <= self.tolerance * self.uniform_loss)
        self.streak = self.streak + 1 if dead else 0
        if self.streak >= self.patience and not self.warned:
            self.warned = True
            self.log(f"chattune: warning: the model has collapsed by step {state.global_step}: for "
                     f"{self.streak} logging steps the gradient norm is 0 and the loss {float(loss):.4f} is "
                     f"ln({self.vocab_size}) = {self.uniform_loss:.4f}, a uniform guess; it no longer learns. "
                     f"Likely cause: learning_rate={self.learning_rate:g} is too high; lower it "
                     "(LoRA usually 1e-5 to 1e-3) and start again")


class EarlyStopping(TrainerCallback):
    """Stop training when ``metric`` (an eval metric: lower is better for a loss, higher for any
    other) has not improved by more than ``threshold`` over its best for ``patience``
    evaluations in a row; says so through ``log``."""

    def __init__(self, metric: str, patience: int, threshold: float = 0.0, log=print):
        self.metric, self.patience, self.threshold, self.log = metric, patience, threshold, log
        self.lower_is_better = "loss" in metric
        self.best: float | None = None
        self.stale = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Compare this evaluation's value with the best so far; stop after ``patience`` without gain."""
        value = (metrics or {}).get(self.metric)
        if value is None or not math.isfinite(value):
            return
        if self.best is None or (self.best - value if self.lower_is_better else value - self.best) > self.threshold:
            self.best, self.stale = value, 0
            return
        self.stale += 1
        if self.stale >= self.patience:
            control.should_training_stop = True
            self.log(f"early stopping at step {state.global_step}: {self.metric} {value:.4f} has not improved on "
                     f"its best {self.best:.4f} by more than {self.threshold:g} for {self.stale} evaluations")


PROGRESS_NAME = "progress.json"
STOPPED_EXIT = 3
"""``chattune train``'s exit status when it stopped on request with a checkpoint (not finished)."""


class ProgressWriter(TrainerCallback):
    """Writes ``progress.json`` in the run folder (whole, by a rename): the step, the steps in
    all, the epoch, seconds since this process began training and the time left at the pace
    of this process's steps so far; at most once every ``interval`` seconds, and at the end."""

    def __init__(self, folder: Path, interval: float = 1.0):
        self.path, self.interval = folder / PROGRESS_NAME, interval
        self.began: float | None = None
        self.first_step = 0
        self.written = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock (on resume: from the step resumed at)."""
        self.began, self.first_step = time.time(), state.global_step
        self.write(state, "training")

    def on_step_end(self, args, state, control, **kwargs):
        """Rewrite the file when ``interval`` has passed since the last time."""
        if time.time() - self.written >= self.interval:
            self.write(state, "training")

    def on_train_end(self, args, state, control, **kwargs):
        """The last word: the step training ended at."""
        self.write(state, "ended")

    def write(self, state, phase: str) -> None:
        """The file as of ``state`` (only the first process of a job writes)."""
        if not state.is_world_process_zero or self.began is None:
            return
        now = time.time()
        done = state.global_step - self.first_step
        elapsed = now - self.began
        left = max(state.max_steps - state.global_step, 0)
        eta = round(elapsed / done * left, 1) if done > 0 else None
        body = {"phase": phase, "step": state.global_step, "max_steps": state.max_steps,
                "epoch": round(state.epoch or 0.0, 4), "elapsed": round(elapsed, 1), "eta_seconds": eta,
                "updated": round(now, 3)}
        staging = self.path.with_name(f".{PROGRESS_NAME}.{os.getpid()}")
        staging.write_text(json.dumps(body), encoding="utf-8")
        os.replace(staging, self.path)
        self.written = now


class StopOnSignal(TrainerCallback):
    """Ends training cleanly on request: SIGTERM (what the workbench sends) or a first Ctrl-C
    mark the stop; at the end of the step under way a checkpoint is saved and training ends
    (``stopped`` tells the recipe not to write the run as finished). A second Ctrl-C interrupts
    at once. Only a single-process job listens (the processes of a distributed job would stop
    at different steps); the handlers are put back as they were by :meth:`restore`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log=print):
        self.log = log
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self.previous: dict = {}

    def install(self) -> StopOnSignal:
        """Listen for the signals (only from the main thread, where Python runs handlers)."""
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self.previous[number] = signal.signal(number, self.handle)
        return self

    def restore(self) -> None:
        """Put the handlers back."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def handle(self, number, frame) -> None:
        """Mark the stop; a second Ctrl-C raises KeyboardInterrupt."""
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        self.log(f"chattune: {self.requested}: stopping after this step with a checkpoint "
                 "(Ctrl-C again to interrupt at once)")

    def on_step_end(self, args, state, control, **kwargs):
        """A stop marked: save a checkpoint of this step and end training."""
        if self.requested and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            self.log(f"chattune: stopped at step {state.global_step}: checkpoint-{state.global_step} written; "
                     "resume with resume_from_checkpoint=true")
