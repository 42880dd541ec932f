"""Jobs the page starts: ``chattune train``, ``eval`` and ``export`` as processes of their own, queued.

Each job is a folder under the jobs folder (``RUNS/.jobs/ID``) holding ``job.json`` (what it
runs and its state, rewritten whole on every change), its config and ``log.txt`` (the
process's output). The server starts queued jobs in order, at most ``max_running`` at once
(one by default: one device, one job), so two users starting at once get a queue. A job
outlives the page that started it: the page reads the folder again after a reload, and a
server started again finds jobs still running (by their process id) and keeps watching them.

States: ``queued`` -> ``running`` -> ``finished`` | ``failed``; ``stop`` on a running job
sends SIGTERM (``stopping``): a training writes a checkpoint at the end of its step and ends
``stopped`` (:class:`chattune.training.callbacks.StopOnSignal`); a queued job is just taken
off the queue (``stopped``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from chattune.errors import ConfigError
from chattune.training.callbacks import STOPPED_EXIT

JOB_FILE = "job.json"
LOG_FILE = "log.txt"
ACTIVE = ("queued", "running", "stopping")
LOG_TAIL_BYTES = 12_000
TICK_SECONDS = 0.25


class JobNotFound(ConfigError):
    """No job with that id."""


@dataclass
class Job:
    """One process the page started (or queued)."""

    id: str
    kind: str
    title: str
    argv: list[str]
    run_dir: str | None = None
    created: float = 0.0
    state: str = "queued"
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    message: str | None = None
    pid: int | None = None
    stop_requested: float | None = None
    resumes: str | None = None
    """The job this one goes on from (a resumed training)."""
    extra: dict = field(default_factory=dict)

    def command(self) -> str:
        """The job as a user would type it."""
        return "chattune " + " ".join(shlex.quote(part) for part in self.argv)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


class JobQueue:
    """The jobs under ``folder``, started in order by a thread of their own (:meth:`start`)."""

    def __init__(self, folder: Path, max_running: int = 1, python: str = sys.executable,
                 env: dict[str, str] | None = None):
        if max_running < 1:
            raise ConfigError(f"--max-jobs: must be >= 1, got {max_running}")
        self.folder, self.max_running, self.python = Path(folder), max_running, python
        self.env = env
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self.processes: dict[str, subprocess.Popen] = {}
        self.wake = threading.Event()
        self.closing = False
        self.thread: threading.Thread | None = None
        self._read_folder()

    # --- state on disk -------------------------------------------------------------------------

    def _read_folder(self) -> None:
        """The jobs written before this server started: running ones whose process is alive are
        watched again; those whose process is gone ended while no server watched them."""
        names = {f.name for f in fields(Job)}
        for path in sorted(self.folder.glob(f"*/{JOB_FILE}")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                job = Job(**{k: v for k, v in data.items() if k in names})
            except (OSError, ValueError, TypeError):
                continue
            if job.state in ("running", "stopping") and not (job.pid and _process_alive(job.pid)):
                job.state = "stopped" if job.stop_requested else "failed"
                job.message = job.message or "the server stopped while this job ran; its log says how far it got"
                job.ended = job.ended or time.time()
                self._write(job)
            self.jobs[job.id] = job

    def job_dir(self, job: Job) -> Path:
        """The job's folder."""
        return self.folder / job.id

    def _write(self, job: Job) -> None:
        folder = self.job_dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{JOB_FILE}.tmp"
        staging.write_text(json.dumps(asdict(job), indent=1), encoding="utf-8")
        os.replace(staging, folder / JOB_FILE)

    # --- what the routes call ------------------------------------------------------------------

    def submit(self, kind: str, title: str, argv: list[str], run_dir: str | None = None,
               files: dict[str, str] | None = None, resumes: str | None = None, extra: dict | None = None) -> Job:
        """Queue a job (``argv``: ``chattune``'s arguments; ``files``: written into the job's
        folder first, by name; the text ``{job}`` in ``argv`` becomes that folder)."""
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        job = Job(job_id, kind, title, argv, run_dir, time.time(), resumes=resumes, extra=extra or {})
        folder = self.job_dir(job)
        folder.mkdir(parents=True)
        for name, text in (files or {}).items():
            (folder / name).write_text(text, encoding="utf-8")
        job.argv = [part.replace("{job}", str(folder)) for part in argv]
        with self.lock:
            self.jobs[job.id] = job
            self._write(job)
        self.wake.set()
        return job

    def get(self, job_id: str) -> Job:
        """The job, or :class:`JobNotFound`."""
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return job

    def listed(self) -> list[Job]:
        """Every job, newest first."""
        with self.lock:
            return sorted(self.jobs.values(), key=lambda job: job.created, reverse=True)

    def position(self, job: Job) -> int | None:
        """A queued job's place in the queue (1: next), else None."""
        with self.lock:
            queued = sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.created)
        return next((i + 1 for i, j in enumerate(queued) if j.id == job.id), None)

    def stop(self, job_id: str) -> Job:
        """Stop a job: off the queue if queued; SIGTERM if running (a training checkpoints first)."""
        with self.lock:
            job = self.get(job_id)
            if job.state == "queued":
                job.state, job.ended, job.message = "stopped", time.time(), "taken off the queue before it started"
            elif job.state == "running":
                job.state, job.stop_requested = "stopping", time.time()
                self._signal(job, signal.SIGTERM)
            else:
                raise ConfigError(f"job {job_id}: it is {job.state}, not running or queued")
            self._write(job)
        return job

    def log_tail(self, job: Job, size: int = LOG_TAIL_BYTES) -> str:
        """The end of the job's log, each line as a terminal would show it last (progress bars
        rewrite their line with carriage returns)."""
        path = self.job_dir(job) / LOG_FILE
        try:
            with path.open("rb") as handle:
                handle.seek(max(path.stat().st_size - size, 0))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(line.rstrip("\r").rpartition("\r")[2] for line in text.split("\n"))

    # --- the thread that starts and reaps ------------------------------------------------------

    def start(self) -> JobQueue:
        """Start the thread that runs queued jobs."""
        self.thread = threading.Thread(target=self._loop, name="chattune-jobs", daemon=True)
        self.thread.start()
        return self

    def close(self, stop_running: bool = True, wait: float = 60.0) -> None:
        """Stop the thread; with ``stop_running`` also stop running jobs (a training writes its
        checkpoint) and wait up to ``wait`` seconds for them."""
        if stop_running:
            for job in list(self.jobs.values()):
                if job.state == "running":
                    self.stop(job.id)
            deadline = time.time() + wait
            while time.time() < deadline and any(j.state in ("running", "stopping") for j in self.jobs.values()):
                self._reap()
                time.sleep(TICK_SECONDS)
        self.closing = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self.closing:
            try:
                self._reap()
                self._launch()
            except Exception as exc:  # keep the queue alive; the job that failed says why
                print(f"chattune workbench: job queue: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.wake.wait(TICK_SECONDS)
            self.wake.clear()

    def _signal(self, job: Job, number: int) -> None:
        process = self.processes.get(job.id)
        try:
            if process is not None:
                process.send_signal(number)
            elif job.pid:
                os.kill(job.pid, number)
        except ProcessLookupError:
            pass

    def _launch(self) -> None:
        with self.lock:
            running = sum(1 for j in self.jobs.values() if j.state in ("running", "stopping"))
            queued = sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.created)
            for job in queued[:max(self.max_running - running, 0)]:
                self._spawn(job)

    def _spawn(self, job: Job) -> None:
        folder = self.job_dir(job)
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        with (folder / LOG_FILE).open("ab") as log:
            log.write(f"$ {job.command()}\n".encode())
            log.flush()
            try:
                process = subprocess.Popen([self.python, "-m", "chattune", *job.argv], stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder, env=env,
                                           start_new_session=True)
            except OSError as exc:
                job.state, job.ended, job.message = "failed", time.time(), f"could not start: {exc}"
                self._write(job)
                return
        self.processes[job.id] = process
        job.state, job.started, job.pid = "running", time.time(), process.pid
        self._write(job)

    def _reap(self) -> None:
        with self.lock:
            for job in self.jobs.values():
                if job.state not in ("running", "stopping"):
                    continue
                process = self.processes.get(job.id)
                if process is not None:
                    code = process.poll()
                    if code is None:
                        continue
                    self.processes.pop(job.id)
                elif job.pid and _process_alive(job.pid):
                    continue  # a job of an earlier server: watched by its process id
                else:
                    code = None
                self._ended(job, code)

    def _ended(self, job: Job, code: int | None) -> None:
        job.ended, job.returncode = time.time(), code
        if code == 0:
            job.state, job.message = "finished", None
        elif job.stop_requested and code in (STOPPED_EXIT, -signal.SIGTERM, None):
            job.state = "stopped"
            job.message = ("stopped with a checkpoint; Resume goes on from it" if code == STOPPED_EXIT
                           else "stopped before training began (nothing to keep)" if job.kind == "train"
                           else "stopped")
        else:
            job.state = "failed"
            job.message = _last_error(self.log_tail(job, 4000)) or f"exit status {code}"
        self._write(job)


def _last_error(tail: str) -> str | None:
    """The last ``chattune: error:`` line (or the last line) of a log's tail."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower() or line.startswith("Traceback")]
    return (errors[-1] if errors else lines[-1] if lines else None)
