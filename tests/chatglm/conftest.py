"""Fixtures for the ChatGLM parity tests: THUDM's own remote code, run in a second venv.

THUDM's remote code (../shared/fixtures/chatglm) does not run on transformers 5, so the reference
side runs ``thudm_reference.py`` with the python of a separate venv holding the transformers it was
written for (4.33.3). The venv is built once and kept between sessions, at ``$CHATTUNE_THUDM_VENV``
or ``<repo>/.thudm-venv/``; a marker file written after a successful install tells a finished venv
from a half-built one (which is rebuilt). Tests that need it skip when it cannot be built (no
package index, no disk), with pip's last lines as the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "chatglm"
SCRIPT = HERE / "thudm_reference.py"
FAMILIES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")

# torch first, alone: 2.13.0 is the one on the local wheel store (any other version downloads GBs)
VENV_INSTALLS = (("torch==2.13.0",), ("transformers==4.33.3", "sentencepiece", "protobuf", "numpy<2"))
MARKER = ".chattune-thudm-ok"
PIP_TIMEOUT = 1800  # seconds per pip call
REFERENCE_TIMEOUT = 300  # seconds per reference run (about 3-10 s each)


def thudm_venv_path() -> Path:
    return Path(os.environ.get("CHATTUNE_THUDM_VENV") or REPO / ".thudm-venv").expanduser().resolve()


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _marker_text() -> str:
    return json.dumps({"installs": VENV_INSTALLS, "base_python": sys.version.split()[0]})


@contextlib.contextmanager
def _lock(venv: Path):
    """One builder at a time (e.g. two pytest sessions); the lock file lives outside the venv."""
    key = hashlib.sha1(str(venv).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"chattune-thudm-venv-{key}.lock"
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(key, None)
    return env


def build_thudm_venv(venv: Path) -> tuple[Path | None, str]:
    """(python, "") when the venv is ready, else (None, why). Builds it when the marker is missing."""
    python = _venv_python(venv)
    marker = venv / MARKER
    with _lock(venv):
        if marker.is_file() and marker.read_text() == _marker_text() and python.exists():
            return python, ""
        if venv.exists() and not venv.is_dir():
            return None, f"{venv} exists and is not a folder"
        if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").is_file():
            return None, f"{venv} exists, is not empty and is not a venv: not touching it"
        started = time.time()
        steps = [[sys.executable, "-m", "venv", "--clear", str(venv)]]
        steps += [[str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pkgs]
                  for pkgs in VENV_INSTALLS]
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True,
                                      timeout=PIP_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return None, f"{' '.join(cmd[-4:])}: {type(exc).__name__}: {exc}"
            if proc.returncode != 0:
                return None, (f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}):\n"
                              + _tail(proc.stderr + "\n" + proc.stdout))
        marker.write_text(_marker_text())
        (venv / ".chattune-thudm-build-seconds").write_text(f"{time.time() - started:.1f}\n")
        return python, ""


@pytest.fixture(scope="session")
def thudm_venv() -> Path:
    """Python of the reference venv (torch 2.13.0, transformers 4.33.3, sentencepiece, protobuf,
    numpy<2); built on first use, reused by later sessions; skips the test if it cannot be built."""
    python, why = build_thudm_venv(thudm_venv_path())
    if python is None:
        pytest.skip(f"cannot build the THUDM reference venv: {why}")
    return python


@pytest.fixture(scope="session")
def fixture_dir():
    """A function family -> ../shared/fixtures/chatglm/<family> (skips where it is absent)."""

    def get(family: str) -> Path:
        path = FIXTURES / family
        if not (path / "config.json").is_file():
            pytest.skip(f"ChatGLM fixtures not found at {path} (a clone without ../shared)")
        return path

    return get


@pytest.fixture(scope="session")
def thudm_reference(thudm_venv, fixture_dir, tmp_path_factory):
    """A function family -> OUT_DIR of ``thudm_reference.py`` for that family (reference.json,
    logits.pt, model/). Each family runs once per session; a failed run raises, every time it is
    asked for, with the script's stderr."""
    root = tmp_path_factory.mktemp("thudm-reference")
    done: dict[str, Path | str] = {}

    def get(family: str) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown ChatGLM family {family!r}; expected one of {FAMILIES}")
        if family not in done:
            src = fixture_dir(family)
            out = root / family
            started = time.time()
            try:
                proc = subprocess.run([str(thudm_venv), str(SCRIPT), str(src), str(out)],
                                      env=_clean_env(), capture_output=True, text=True,
                                      timeout=REFERENCE_TIMEOUT, cwd=str(root))
                if proc.returncode != 0:
                    done[family] = (f"thudm_reference.py {family} failed (exit {proc.returncode}) "
                                    f"after {time.time() - started:.1f}s:\n{_tail(proc.stderr, 40)}")
                elif not (out / "reference.json").is_file():
                    done[family] = f"thudm_reference.py {family} wrote no reference.json:\n{_tail(proc.stderr, 40)}"
                else:
                    done[family] = out
            except subprocess.TimeoutExpired:
                done[family] = f"thudm_reference.py {family} ran past {REFERENCE_TIMEOUT}s"
        result = done[family]
        if isinstance(result, str):
            raise RuntimeError(result)
        return result

    return get
