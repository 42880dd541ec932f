"""Checkpoints that are whole or absent: what a complete one holds, which one a run resumes
from, and the one-line errors for a save the disk cannot take.

A checkpoint is written into ``tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once every
file is on disk (:meth:`chattune.training.trainer.ChattuneTrainer._save_checkpoint`), so that a
folder named ``checkpoint-N`` is complete. Folders left by an older chattune, a kill or a
damaged disk are checked (:func:`checkpoint_problems`) before a resume; the ones skipped are
renamed ``incomplete-...`` with a word, never deleted.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

from safetensors import SafetensorError

from chattune.errors import TrainingError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = "tmp-"
INCOMPLETE_PREFIX = "incomplete-"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "chattune.json"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "adapter_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json")
SHARDED_PREFIXES = ("pytorch_model_fsdp", "optimizer_", "global_step")
"""Folders of sharded checkpoints: FSDP's model and optimizer shards, DeepSpeed's engine state."""
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
"""What a failed save raises: OSError, torch.save's RuntimeError, safetensors' SafetensorError."""
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How safetensors' Rust writer names the system error of a failed write."""


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-N`` folders of a run folder as (N, path), newest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in folder.iterdir()
             if (m := CHECKPOINT_RE.match(child.name)) and child.is_dir()]
    return sorted(found, reverse=True)


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is truncated ({size} bytes)"
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if 8 + length > size:
                return f"{path.name} is truncated ({size} bytes, its header alone is {8 + length})"
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{path.name} has an unreadable header ({exc})"
    if size < 8 + length + end:
        return f"{path.name} is truncated ({size} of {8 + length + end} bytes)"
    return None


def _zip_problem(path: Path) -> str | None:
    size = path.stat().st_size
    if size == 0:
        return f"{path.name} is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"{path.name} is truncated or unreadable ({size} bytes)"
    return None


def _json_problem(path: Path, key: str | None = None) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{path.name} is unreadable ({exc.__class__.__name__})"
    if key is not None and not (isinstance(data, dict) and isinstance(data.get(key), int)):
        return f"{path.name} has no {key}"
    return None


def _file_problem(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix == ".json":
        problem = _json_problem(path)
        if problem or not path.name.endswith(".index.json"):
            return problem
        shards = set(json.loads(path.read_text(encoding="utf-8")).get("weight_map", {}).values())
        for shard in sorted(shards):
            if not (path.parent / shard).is_file():
                return f"{shard} is missing"
            problem = _file_problem(path.parent / shard)
            if problem:
                return problem
        return None
    return _zip_problem(path)


def checkpoint_problems(folder: str | Path) -> list[str]:
    """Why ``folder`` is not a complete checkpoint to resume from (empty: it is complete):
    trainer state, weights, optimizer, scheduler, RNG state and chattune's manifest must be
    there and whole (a truncated safetensors file or torch archive counts as missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["not a folder"]
    names = {child.name for child in folder.iterdir()}
    if not names:
        return ["empty folder"]
    problems = []
    if TRAINER_STATE not in names:
        problems.append(f"no {TRAINER_STATE}")
    else:
        problems.append(_json_problem(folder / TRAINER_STATE, "global_step"))
    weights = [name for name in WEIGHT_FILES if name in names]
    sharded = sorted(name for name in names if name.startswith(SHARDED_PREFIXES) and (folder / name).is_dir())
    if not weights and not sharded:
        problems.append("no weights (adapter_model.safetensors or model.safetensors)")
    problems += [_file_problem(folder / name) for name in weights]
    problems += [f"{name} is empty" for name in sharded if not any((folder / name).iterdir())]
    engine = any(name.startswith(SHARDED_PREFIXES[-1]) for name in sharded)  # DeepSpeed keeps its own state
    optimizer = [name for name in ("optimizer.pt", "optimizer.bin") if name in names]
    if optimizer:
        problems.append(_file_problem(folder / optimizer[0]))
    elif not engine and not any(name.startswith("optimizer_") for name in sharded):
        problems.append("no optimizer.pt")
    if "scheduler.pt" in names:
        problems.append(_file_problem(folder / "scheduler.pt"))
    elif not engine:
        problems.append("no scheduler.pt")
    rng = sorted(name for name in names if name.startswith("rng_state") and name.endswith(".pth"))
    problems += [_file_problem(folder / name) for name in rng] if rng else ["no rng_state.pth"]
    problems.append(_json_problem(folder / MANIFEST) if MANIFEST in names else f"no {MANIFEST}")
    return [problem for problem in problems if problem]


def set_aside(folder: Path, prefix: str = INCOMPLETE_PREFIX) -> Path:
    """Rename ``folder`` to ``<prefix><name>`` (``.2``, ``.3``... if taken) beside it, out of
    the way of resume and rotation; return the new path. Nothing is deleted."""
    target = folder.with_name(prefix + folder.name)
    count = 1
    while target.exists():
        count += 1
        target = folder.with_name(f"{prefix}{folder.name}.{count}")
    os.replace(folder, target)
    return target


def staging_leftovers(output_dir: str | Path) -> list[Path]:
    """``tmp-checkpoint-N`` folders: saves that were interrupted before they were complete."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(child for child in folder.iterdir()
                  if child.is_dir() and CHECKPOINT_RE.match(child.name.removeprefix(STAGING_PREFIX))
                  and child.name.startswith(STAGING_PREFIX))


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` of a run folder, or None."""
    for _, folder in list_checkpoints(output_dir):
        if not checkpoint_problems(folder):
            return folder
    return None


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk (before it is renamed)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the system allows it."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def megabytes(count: float) -> str:
    """``count`` bytes for a message: ``1.2 MB``."""
    return f"{count / 1e6:.1f} MB"


def error_code(exc: BaseException) -> int | None:
    """The system error number behind ``exc``: an OSError's errno, or the ``(os error N)``
    that safetensors' SafetensorError carries in its message; None if it names none."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, SafetensorError):
        match = _OS_ERROR.search(str(exc))
        return int(match.group(1)) if match else None
    return None


def file_size_limit() -> int | None:
    """This process's largest file in bytes (``ulimit -f``), or None when unlimited."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def storage_error(exc: BaseException, target: Path, needed: int | None = None,
                  what: str = "writing the run folder") -> TrainingError | None:
    """A one-line TrainingError when ``exc`` means ``target`` cannot take the write (disk full,
    read-only, no permission, a file over the size limit; an OSError, or a SafetensorError
    naming its ``os error``), with the space it needed; None for any other error.
    torch.save reports a full disk, or a file over ``ulimit -f``, as a RuntimeError
    (``unexpected pos``) without errno: then the free space, and the limit, decide."""
    code = error_code(exc)
    try:
        free = shutil.disk_usage(target if target.exists() else target.parent).free
    except OSError:
        free = None
    unnumbered = not isinstance(exc, OSError) and isinstance(exc, RuntimeError)
    full = code in FULL_ERRNOS or (unnumbered and free is not None and needed is not None and free < needed)
    if not full and unnumbered and "unexpected pos" in str(exc) and file_size_limit() is not None:
        code = errno.EFBIG
    last = last_complete_checkpoint(target)
    kept = f"; the earlier checkpoints are untouched (last complete: {last.name})" if last else ""
    if full:
        need = f" it needs about {megabytes(needed)}," if needed else ""
        have = f" {megabytes(free)} is free" if free is not None else ""
        return TrainingError(
            f"output_dir {target}: the disk is full (no space left on the device) while {what}:{need}{have}. "
            f"Free some space or choose another output_dir{kept}")
    if code == errno.EFBIG:
        limit = file_size_limit()
        size = f" of {megabytes(limit)}" if limit is not None else ""
        return TrainingError(f"output_dir {target}: a file reached this process's file size limit{size} "
                             f"(ulimit -f) while {what}; raise the limit or choose another output_dir{kept}")
    if code in STORAGE_ERRNOS:
        reason = os.strerror(code).lower() if code else str(exc)
        return TrainingError(f"output_dir {target}: cannot write {getattr(exc, 'filename', None) or target} "
                             f"({reason}) while {what}; choose a writable output_dir{kept}")
    return None


def non_finite(model) -> list[str]:
    """Names of the trainable parameters holding NaN or inf values (empty: all finite)."""
    import torch

    return [name for name, param in model.named_parameters()
            if param.requires_grad and not bool(torch.isfinite(param.detach()).all())]


def is_finite_number(value) -> bool:
    """Whether ``value`` (a float or a one-element tensor) is finite; None counts as finite."""
    if value is None:
        return True
    return math.isfinite(float(value))
