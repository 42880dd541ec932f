"""The workbench's three folders, and every path the page names confined to one of them.

The page sends names relative to a folder (``tiny``, ``alpaca.json``, ``my-run``); the server
resolves each inside its folder, symlinks included, and refuses anything that leaves it
(``..``, an absolute path elsewhere, a link pointing out), so a page user reads and writes
nothing but what the server's owner put under ``--models-dir``, ``--data-dir`` and
``--runs-dir``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chattune.errors import ConfigError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
"""The files the data folder lists (chattune's readers take these)."""
MODEL_FILES = ("config.json",)
MAX_LISTED = 500


class PathRefused(ConfigError):
    """A name that does not stay inside its folder; ``key`` is the field that sent it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Folders:
    """Where models are picked from, data files read from, and runs written to."""

    models: Path
    data: Path
    runs: Path

    @classmethod
    def create(cls, models: str | Path, data: str | Path, runs: str | Path) -> Folders:
        """The three folders, resolved; models and data must exist, runs is created."""
        found = {}
        for option, value in (("--models-dir", models), ("--data-dir", data)):
            path = Path(value).expanduser().resolve()
            if not path.is_dir():
                raise ConfigError(f"{option}: {value} is not a folder")
            found[option] = path
        runs_path = Path(runs).expanduser().resolve()
        try:
            runs_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--runs-dir: cannot create {runs} ({exc.strerror or exc})") from exc
        return cls(found["--models-dir"], found["--data-dir"], runs_path)

    def root(self, folder: str) -> Path:
        """The folder called ``models``, ``data`` or ``runs``."""
        return {"models": self.models, "data": self.data, "runs": self.runs}[folder]

    def inside(self, folder: str, name: str, key: str, *, must_exist: bool = True) -> Path:
        """``name`` resolved inside the folder ``folder``, or :class:`PathRefused` naming ``key``.

        ``name`` is relative to the folder, or an absolute path already inside it; the resolved
        path (links followed) must be the folder or under it."""
        root = self.root(folder)
        text = str(name).strip()
        if not text or "\x00" in text:
            raise PathRefused(key, f"expected a name inside the {folder} folder, got {name!r}")
        candidate = Path(text).expanduser()
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if path != root and root not in path.parents:
            raise PathRefused(key, f"{name!r} is outside the {folder} folder ({root}); "
                                   f"give a name inside it")
        if must_exist and not path.exists():
            raise PathRefused(key, f"{name!r} is not in the {folder} folder ({root})")
        return path

    def relative(self, folder: str, path: Path | str) -> str:
        """``path`` as a name relative to the folder ``folder`` (as the page shows it)."""
        root = self.root(folder)
        resolved = Path(path).resolve()
        return resolved.relative_to(root).as_posix() if resolved != root else "."

    def models_found(self) -> list[dict]:
        """Model folders (holding ``config.json``) and GGUF files under the models folder, a
        few levels deep, by name."""
        found: list[dict] = []
        for path, kind in _walk_models(self.models, 3):
            try:
                inside = self.inside("models", path, "models")
            except PathRefused:
                continue  # a link out of the folder is not offered
            found.append({"name": self.relative("models", inside), "kind": kind})
            if len(found) >= MAX_LISTED:
                break
        return sorted(found, key=lambda item: item["name"])

    def data_found(self) -> list[dict]:
        """Data files (by suffix) under the data folder, a few levels deep, with their sizes."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.data, followlinks=False):
            depth = len(Path(dirpath).relative_to(self.data).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < 3 else []
            for filename in sorted(filenames):
                if filename.lower().endswith(DATA_SUFFIXES) and not filename.startswith("."):
                    path = Path(dirpath) / filename
                    try:
                        inside = self.inside("data", path, "data")
                    except PathRefused:
                        continue  # a link out of the folder is not offered
                    found.append({"name": self.relative("data", inside), "size": inside.stat().st_size})
        return found[:MAX_LISTED]

    def save_upload(self, name: str, body: bytes) -> Path:
        """Write an uploaded data file as ``name`` in the data folder (a plain file name with a
        data suffix, never over an existing file)."""
        if not name or Path(name).name != name or name.startswith("."):
            raise PathRefused("name", f"expected a plain file name (no folders), got {name!r}")
        if not name.lower().endswith(DATA_SUFFIXES):
            raise PathRefused("name", f"{name!r}: expected a data file ending in {', '.join(DATA_SUFFIXES)}")
        path = self.inside("data", name, "name", must_exist=False)
        try:
            with path.open("xb") as handle:
                handle.write(body)
        except FileExistsError as exc:
            raise PathRefused("name", f"{name!r} is already in the data folder; choose another name") from exc
        return path


def _walk_models(root: Path, depth: int):
    try:
        children = sorted(root.iterdir())
    except OSError:
        return
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_file() and child.suffix.lower() == ".gguf":
            yield child, "gguf"
        elif child.is_dir():
            if any((child / name).is_file() for name in MODEL_FILES):
                yield child, "folder"
            elif depth > 1:
                yield from _walk_models(child, depth - 1)
