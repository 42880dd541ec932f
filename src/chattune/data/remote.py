"""Data files that are not on this disk: storage URLs (through fsspec) and hub data sets (through
``datasets.load_dataset``), made local copies that chattune's own readers then read.

- A path with a protocol (``s3://bucket/train.jsonl``, ``gs://...``, ``https://...``,
  ``hf://datasets/OWNER/NAME/file.json``, ``memory://...``, ``file:///...``) is read with
  ``fsspec`` (the protocol's package must be installed: ``s3fs``, ``gcsfs``, ...) and copied,
  whole, into the cache folder.
- ``hub:OWNER/NAME`` (optionally ``hub:OWNER/NAME:SPLIT``, default ``train``) is a data set of
  the Hugging Face hub, loaded by ``datasets.load_dataset`` (its own cache first; offline, only
  from it) and written as JSON Lines into the cache folder.

Every row is then read, converted and counted as a local file's rows are: the copy's path names
the rows, and the log line of each fetch names the source it came from. The copy's bytes are
hashed into the data's fingerprint, so a changed remote file is encoded again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath

from chattune.config import DataArgs, DataSource
from chattune.errors import DataError

HUB_PREFIX = "hub:"
_PROTOCOL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str) -> bool:
    """Whether a data path names a storage URL or a hub data set rather than a file here."""
    return path.startswith(HUB_PREFIX) or bool(_PROTOCOL.match(path))


def _copy_folder(root: Path, path: str) -> Path:
    return root / "remote" / hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]


def fetch_url(url: str, root: Path, key: str) -> Path:
    """A copy of the file at ``url`` (any fsspec protocol) in ``root``, written whole by a rename."""
    import fsspec

    name = PurePosixPath(url.split("?", 1)[0].rstrip("/")).name or "data"
    folder = _copy_folder(root, url)
    target = folder / name
    staging = folder / f".{name}.{os.getpid()}.part"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with fsspec.open(url, "rb") as source, staging.open("wb") as copy:
            while chunk := source.read(1 << 20):
                copy.write(chunk)
        os.replace(staging, target)
    except ImportError as exc:
        raise DataError(f"{key}: {url}: reading this kind of URL needs a package that is not installed "
                        f"({exc}); pip install the fsspec filesystem for it (s3fs, gcsfs, aiohttp, ...)") from exc
    except (OSError, ValueError) as exc:
        staging.unlink(missing_ok=True)
        raise DataError(f"{key}: {url}: cannot be read ({type(exc).__name__}: {exc}); expected a reachable "
                        "data file") from exc
    return target


def fetch_hub(reference: str, root: Path, key: str) -> Path:
    """The hub data set ``hub:OWNER/NAME[:SPLIT]`` as a JSON Lines copy in ``root``."""
    spec = reference[len(HUB_PREFIX):]
    name, _, split = spec.partition(":")
    split = split or "train"
    if not name:
        raise DataError(f"{key}: {reference}: expected hub:OWNER/NAME or hub:OWNER/NAME:SPLIT")
    from datasets import load_dataset

    try:
        rows = load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many kinds (offline, not found, no such split)
        text = " ".join(str(exc).split())[:300]
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("the hub cannot be reached (offline) and the data set is not in the datasets cache"
                if offline or "connect" in text.lower() or "offline" in text.lower() else text)
        raise DataError(f"{key}: {reference}: cannot be loaded: {hint}; load it once where the hub is reachable, "
                        "or give a local file") from exc
    folder = _copy_folder(root, reference)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name.replace('/', '__')}-{split}.jsonl"
    staging = folder / f".{target.name}.{os.getpid()}.part"
    with staging.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(staging, target)
    return target


def local_sources(sources: list[DataSource], root: Path, key: str, log=print) -> list[DataSource]:
    """``sources`` with each remote one replaced by its local copy (fetched now, said through ``log``)."""
    local = []
    for index, source in enumerate(sources):
        if not is_remote(source.path):
            local.append(source)
            continue
        where = f"{key}[{index}]"
        copy = (fetch_hub if source.path.startswith(HUB_PREFIX) else fetch_url)(source.path, Path(root), where)
        log(f"{where}: {source.path} -> {copy} ({copy.stat().st_size:,} bytes)")
        local.append(dataclasses.replace(source, path=str(copy)))
    return local


def localized(data: DataArgs, root: Path, log=print) -> DataArgs:
    """``data`` with its remote train and eval files fetched into ``root`` (unchanged when none is remote)."""
    if not any(is_remote(s.path) for s in [*data.train_files, *data.eval_files]):
        return data
    return dataclasses.replace(data, train_files=local_sources(data.train_files, root, "train_files", log),
                               eval_files=local_sources(data.eval_files, root, "eval_files", log))
