"""Names from the page stay inside their folders: links resolved, ``..`` and absolute paths refused."""

from __future__ import annotations

import pytest

from chattune.errors import ConfigError
from chattune.workbench.folders import Folders, PathRefused


@pytest.fixture
def folders(tmp_path):
    for name in ("models/tiny", "models/family/small", "data/sub"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "models/tiny/config.json").write_text("{}")
    (tmp_path / "models/family/small/config.json").write_text("{}")
    (tmp_path / "models/model.Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "models/notes").mkdir()
    (tmp_path / "data/a.json").write_text("[]")
    (tmp_path / "data/sub/b.jsonl").write_text("")
    (tmp_path / "data/readme.md").write_text("not data")
    (tmp_path / "secret.json").write_text("[]")
    return Folders.create(tmp_path / "models", tmp_path / "data", tmp_path / "runs")


def test_the_folders_list_models_and_data_by_relative_name(folders):
    assert folders.models_found() == [{"name": "family/small", "kind": "folder"},
                                      {"name": "model.Q8_0.gguf", "kind": "gguf"},
                                      {"name": "tiny", "kind": "folder"}]
    assert [f["name"] for f in folders.data_found()] == ["a.json", "sub/b.jsonl"]
    assert folders.runs.is_dir()


@pytest.mark.parametrize("name", ["../secret.json", "/etc/passwd", "sub/../../secret.json", "", "a\x00b"])
def test_a_name_that_leaves_its_folder_is_refused_naming_the_field(folders, name):
    with pytest.raises(PathRefused) as caught:
        folders.inside("data", name, "train_files[0]")
    assert caught.value.key == "train_files[0]"
    assert str(caught.value).startswith("train_files[0]: ")


def test_a_link_pointing_out_of_its_folder_is_refused_and_not_listed(folders, tmp_path):
    (folders.data / "escape.json").symlink_to(tmp_path / "secret.json")
    (folders.models / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/config.json").write_text("{}")
    with pytest.raises(PathRefused, match="outside the data folder"):
        folders.inside("data", "escape.json", "train_files")
    assert "escape.json" not in [f["name"] for f in folders.data_found()]
    assert "outside" not in [m["name"] for m in folders.models_found()]


def test_an_absolute_path_inside_the_folder_is_accepted(folders):
    assert folders.inside("data", str(folders.data / "a.json"), "train_files") == folders.data / "a.json"
    with pytest.raises(PathRefused, match="not in the data folder"):
        folders.inside("data", "missing.json", "train_files")


def test_uploads_are_plain_new_data_files(folders):
    path = folders.save_upload("new.jsonl", b'{"instruction": "hi", "output": "hello"}\n')
    assert path.read_bytes().startswith(b'{"instruction"')
    for name, message in [("new.jsonl", "already in the data folder"), ("../x.json", "plain file name"),
                          ("sub/x.json", "plain file name"), ("x.exe", "expected a data file"),
                          (".hidden.json", "plain file name")]:
        with pytest.raises(PathRefused, match=message):
            folders.save_upload(name, b"[]")
    assert path.read_bytes().startswith(b'{"instruction"')  # never overwritten


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(ConfigError, match="--models-dir: .* is not a folder"):
        Folders.create(tmp_path / "nope", tmp_path, tmp_path / "runs")
