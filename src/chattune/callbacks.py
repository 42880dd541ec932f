"""Trainer callbacks: what chattune writes into a run folder while transformers trains.

- :class:`MetricsLogger`: every log event as a line of ``metrics.jsonl``, with tokens/s,
  and a clear word when the loss goes NaN;
- :class:`ManifestWriter`: the manifest and config in every checkpoint, so that each one
  is a self-describing run folder.
"""

from __future__ import annotations

import json
import math
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
        """Append the event, with tokens/s since the last training loss; warn on a NaN/inf loss."""
        logs = dict(logs or {})
        now = time.perf_counter()
        if "loss" in logs and self.last_time is not None:
            seen = state.num_input_tokens_seen
            elapsed = max(now - self.last_time, 1e-9)
            logs["tokens_per_second"] = round((seen - self.last_tokens) / elapsed, 1)
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

    def on_save(self, args, state, control, **kwargs):
        """Write the run files into the checkpoint the Trainer has just saved."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_run_files(folder, self.manifest, self.config, {"global_step": state.global_step})
