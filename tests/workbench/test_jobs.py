"""The job queue: one job at a time, stop and its checkpoint status, state kept on disk across servers.

The jobs run a stand-in for ``python`` (a shell script) so that these tests take no model."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from chattune.errors import ConfigError
from chattune.workbench.jobs import JOB_FILE, JobNotFound, JobQueue

FAKE = """#!/bin/bash
shift 2  # -m chattune
case "$1" in
  work) trap 'echo "chattune: stopped at step 7: checkpoint-7 written"; exit 3' TERM
        echo "working in $PWD"; printf 'step 1\\rstep 2\\rstep 3\\n'
        for i in $(seq 1 600); do sleep 0.05; done; exit 0;;
  fail) echo "Traceback (most recent call last):"; echo "chattune: error: train_files[0]: row 3: no answer"; exit 2;;
  quick) echo "done"; exit 0;;
esac
"""


@pytest.fixture
def queue(tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    made = JobQueue(tmp_path / "jobs", python=str(fake)).start()
    yield made
    made.close(wait=10)


def wait_for(queue: JobQueue, job_id: str, states: tuple[str, ...], seconds: float = 20.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        job = queue.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is {queue.get(job_id).state}, not {states}")


def test_jobs_run_one_at_a_time_in_order_and_stop_ends_with_the_checkpoint_status(queue):
    first = queue.submit("train", "first", ["work"], files={"config.yaml": "max_steps: 1\n"})
    second = queue.submit("train", "second", ["work"])
    wait_for(queue, first.id, ("running",))
    assert queue.get(second.id).state == "queued" and queue.position(queue.get(second.id)) == 1
    assert (queue.job_dir(first) / "config.yaml").read_text() == "max_steps: 1\n"
    time.sleep(0.3)
    assert queue.stop(first.id).state == "stopping"
    done = wait_for(queue, first.id, ("stopped", "failed"))
    assert (done.state, done.returncode) == ("stopped", 3)
    assert "checkpoint" in done.message
    assert "checkpoint-7 written" in queue.log_tail(done)
    wait_for(queue, second.id, ("running",))
    queue.stop(second.id)
    wait_for(queue, second.id, ("stopped",))


def test_a_failed_job_says_why_from_its_log_and_progress_lines_read_as_the_terminal_shows_them(queue):
    failed = wait_for(queue, queue.submit("train", "bad", ["fail"]).id, ("failed",))
    assert failed.returncode == 2
    assert failed.message == "chattune: error: train_files[0]: row 3: no answer"
    job = queue.submit("train", "t", ["work"])
    wait_for(queue, job.id, ("running",))
    end = time.monotonic() + 10
    while "step 3" not in queue.log_tail(job) and time.monotonic() < end:
        time.sleep(0.05)
    assert "step 3" in queue.log_tail(job) and "step 1" not in queue.log_tail(job)
    queue.stop(job.id)


def test_a_queued_job_is_taken_off_the_queue_and_a_finished_one_cannot_be_stopped(queue):
    running = queue.submit("train", "a", ["work"])
    waiting = queue.submit("eval", "b", ["quick"])
    wait_for(queue, running.id, ("running",))
    assert queue.stop(waiting.id).state == "stopped"
    queue.stop(running.id)
    wait_for(queue, running.id, ("stopped",))
    time.sleep(0.5)
    assert queue.get(waiting.id).started is None  # never ran
    with pytest.raises(ConfigError, match="not running or queued"):
        queue.stop(waiting.id)
    with pytest.raises(JobNotFound):
        queue.get("nope")


def test_two_users_submitting_at_once_get_a_queue(queue):
    import threading

    made = []
    threads = [threading.Thread(target=lambda: made.append(queue.submit("eval", "q", ["quick"]))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({job.id for job in made}) == 6
    for job in made:
        assert wait_for(queue, job.id, ("finished",)).returncode == 0


def test_a_new_server_finds_the_jobs_keeps_watching_live_ones_and_marks_lost_ones(queue, tmp_path):
    live = queue.submit("train", "live", ["work"])
    wait_for(queue, live.id, ("running",))
    lost_dir = queue.folder / "19990101-000000-dead00"
    lost_dir.mkdir()
    (lost_dir / JOB_FILE).write_text(json.dumps({"id": "19990101-000000-dead00", "kind": "train", "title": "lost",
                                                 "argv": ["train"], "state": "running", "pid": 2 ** 22 + 12345}))
    again = JobQueue(queue.folder, python=queue.python).start()
    try:
        assert again.get(live.id).state == "running"  # its process is alive: watched by pid
        lost = again.get("19990101-000000-dead00")
        assert lost.state == "failed" and "server stopped while this job ran" in lost.message
        os.kill(again.get(live.id).pid, signal.SIGTERM)
        end = time.monotonic() + 20
        while again.get(live.id).state == "running" and time.monotonic() < end:
            time.sleep(0.05)
        assert again.get(live.id).state == "failed"  # ended unasked, no exit status to read
    finally:
        again.close(stop_running=False)
    on_disk = json.loads(Path(queue.job_dir(lost), JOB_FILE).read_text())
    assert on_disk["state"] == "failed"
