"""``chattune train CONFIG --nproc N``: start torchrun on this machine for N processes, and
when the job fails, say which process failed, how, and where to resume from.

torchrun itself does the work: it starts one ``chattune train`` per device, watches them, and
stops them all as soon as one dies (a crash, an out-of-memory kill, a SIGKILL), so that a job
never hangs on a dead process. Several machines: run torchrun on each yourself (see the
README), with ``--nnodes``, ``--node_rank``, ``--master_addr`` and ``--master_port``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from chattune.training.checkpoints import last_complete_checkpoint


@dataclass
class Failure:
    """The first process torchrun saw fail."""

    rank: int | None
    exitcode: int | None
    pid: int | None

    def describe(self) -> str:
        """``process rank 1 (pid 123) was killed by SIGKILL`` or ``... exited with code 2``."""
        who = "a process" if self.rank is None else f"process rank {self.rank}"
        if self.pid is not None:
            who += f" (pid {self.pid})"
        if self.exitcode is None:
            return f"{who} failed"
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"{who} was killed by {name}"
        return f"{who} exited with code {self.exitcode} (its error is above)"


_FIELD = re.compile(r"^\s*(rank|exitcode)\s*:\s*(-?\d+)(?:.*?pid:\s*(\d+))?")


def parse_failure(lines: list[str]) -> Failure | None:
    """The root-cause failure from torchrun's report (``Root Cause (first observed failure)``),
    else its first listed failure; None when the text holds no report."""
    start = next((i for i, line in enumerate(lines) if "Root Cause" in line), None)
    if start is None:
        start = next((i for i, line in enumerate(lines) if line.strip().startswith("Failures:")), None)
    if start is None:
        return None
    rank = exitcode = pid = None
    for line in lines[start:]:
        match = _FIELD.match(line)
        if not match:
            if line.startswith("=====") and rank is not None:
                break
            continue
        if match.group(1) == "rank":
            rank = int(match.group(2))
        else:
            exitcode = int(match.group(2))
            pid = int(match.group(3)) if match.group(3) else None
            break
    return Failure(rank, exitcode, pid)


def torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """The torchrun command line for ``chattune train TRAIN_ARGS`` on ``nproc`` processes of
    this machine (a free port chosen by torchrun's standalone rendezvous)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "chattune.cli", "train", *train_args]


def worker_environment(nproc: int) -> dict[str, str]:
    """The processes' environment: on CPU each gets its share of the cores as threads
    (torchrun would give each one thread), unless OMP_NUM_THREADS is set."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        import torch

        cores = os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = "1" if torch.cuda.is_available() else str(max(1, cores // nproc))
    return env


def launch_local(nproc: int, train_args: list[str], output_dir: str | Path, resume_hint: str) -> int:
    """Run ``chattune train TRAIN_ARGS`` on ``nproc`` processes under torchrun, passing its
    output through; on failure print which process failed and how, and the checkpoint to
    resume from. Returns torchrun's exit code."""
    process = subprocess.Popen(torchrun_command(nproc, train_args), env=worker_environment(nproc),
                               stdout=sys.stdout, stderr=subprocess.PIPE, text=True, errors="replace")
    tail: deque[str] = deque(maxlen=400)
    assert process.stderr is not None
    for line in process.stderr:
        sys.stderr.write(line)
        tail.append(line.rstrip("\n"))
    code = process.wait()
    if code == 0:
        return 0
    failure = parse_failure(list(tail)) or Failure(None, None, None)
    last = last_complete_checkpoint(output_dir)
    where = (f"the last complete checkpoint is {last}; resume with: {resume_hint}" if last
             else f"no checkpoint had been written to {output_dir}")
    sys.stderr.write(f"chattune: error: training on {nproc} processes stopped: {failure.describe()}; "
                     f"torchrun stopped the other processes. {where[0].upper()}{where[1:]}\n")
    return code
