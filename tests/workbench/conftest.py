"""A workbench over a tiny model and a small Alpaca file, served on a loopback port."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from chattune.workbench.app import JOBS_FOLDER, ModelSlot, build_app
from chattune.workbench.folders import Folders
from chattune.workbench.jobs import JobQueue
from tests.serve.server_thread import ServerThread

ROWS = 40


@dataclass
class Bench:
    """A running workbench: its URL, folders, job queue and model slot."""

    url: str
    folders: Folders
    jobs: JobQueue
    slot: ModelSlot
    key: str | None = None


def alpaca_rows(count: int = ROWS) -> list[dict]:
    """Small Alpaca rows with a checkable answer."""
    return [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."}
            for i in range(count)]


def make_folders(root: Path, tiny_model: Path) -> Folders:
    """models/tiny (a copy of the session's tiny model: a link out of the folder would be
    refused), data/alpaca.json, runs/."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    if not (root / "models" / "tiny").exists():
        shutil.copytree(tiny_model, root / "models" / "tiny")
    (root / "data" / "alpaca.json").write_text(json.dumps(alpaca_rows()), encoding="utf-8")
    return Folders.create(root / "models", root / "data", root / "runs")


def start_bench(root: Path, tiny_model: Path, key: str | None = None) -> tuple[Bench, ServerThread]:
    """A workbench with its job thread running, served on a free loopback port."""
    folders = make_folders(root, tiny_model)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    jobs = JobQueue(folders.runs / JOBS_FOLDER, env=env).start()
    slot = ModelSlot()
    server = ServerThread(build_app(folders, jobs, slot, api_key=key)).start()
    return Bench(server.url, folders, jobs, slot, key), server


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_models):
    """A workbench (no API key) over the session's tiny Llama."""
    made, server = start_bench(tmp_path_factory.mktemp("workbench"), tiny_models("llama"))
    yield made
    server.stop()
    made.jobs.close(wait=30)
    made.slot.close()
