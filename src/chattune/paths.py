"""Output paths checked before the work that fills them: a command that would write a
folder or a file learns that it cannot (``/proc/x``, a path under a file, a folder where a
file is expected) in one line naming the option or key and the path, before a model loads.

Nothing is created: the check writes and removes a hidden probe file in the nearest folder
that already exists.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from chattune.errors import ConfigError


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if _exists(candidate):
            return candidate
    return Path.cwd()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _check_can_create(folder: Path, what: str, target: Path, expected: str) -> None:
    """Raise ConfigError unless ``folder`` exists or can be created and be written into."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise ConfigError(f"{what}: {target}: {base} is a file, not a folder; expected {expected}")
    try:
        handle, probe = tempfile.mkstemp(dir=base, prefix=".chattune-write-check-")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write {target} ({_reason(exc)} in {base}); expected {expected}") from exc
    os.close(handle)
    os.unlink(probe)


def check_output_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path, after checking that it is a folder, or can be created as one, that
    can be written into; else a ConfigError starting with ``what`` (an option such as ``--out``
    or a config key) and naming the path. Creates nothing."""
    path = Path(path)
    expected = "a folder that can be created and written to"
    if _exists(path) and not path.is_dir():
        raise ConfigError(f"{what}: {path} is a file; expected {expected}")
    _check_can_create(path, what, path, expected)
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, after checking that a file can be written there (its folder
    exists or can be created, and is writable; ``path`` is not a folder nor a read-only
    file); else a ConfigError starting with ``what`` and naming the path. Creates nothing."""
    path = Path(path)
    expected = "a file path in a writable folder"
    if path.is_dir():
        raise ConfigError(f"{what}: {path} is a folder; expected {expected}")
    _check_can_create(path.parent, what, path, expected)
    if _exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{what}: {path} is read-only; expected {expected}")
    return path
