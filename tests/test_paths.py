"""Output paths checked before the work: one line naming the option and the path, nothing created."""

from __future__ import annotations

import os

import pytest

from chattune.errors import ConfigError
from chattune.paths import check_output_dir, check_output_file


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    return path


def test_folders_that_exist_or_can_be_made_pass_and_nothing_is_created(tmp_path):
    assert check_output_dir(tmp_path, "--out") == tmp_path
    assert check_output_dir(tmp_path / "a" / "b", "output_dir") == tmp_path / "a" / "b"
    assert check_output_file(tmp_path / "c" / "x.jsonl", "--out") == tmp_path / "c" / "x.jsonl"
    assert list(tmp_path.iterdir()) == []  # no probe file, no folder left behind


@pytest.mark.parametrize(("check", "target", "message"), [
    (check_output_dir, "afile", "output_dir: {t}/afile is a file; expected a folder"),
    (check_output_dir, "afile/sub", "output_dir: {t}/afile/sub: {t}/afile is a file, not a folder"),
    (check_output_file, "afile/x.jsonl", "output_dir: {t}/afile/x.jsonl: {t}/afile is a file, not a folder"),
    (check_output_file, ".", "output_dir: {t} is a folder; expected a file path"),
])
def test_a_path_under_or_at_the_wrong_kind_of_entry_is_refused(check, target, message, tmp_path, a_file):
    with pytest.raises(ConfigError) as caught:
        check(tmp_path / target, "output_dir")
    assert str(caught.value).startswith(message.format(t=tmp_path))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("check", [check_output_dir, check_output_file])
def test_a_path_in_proc_is_refused_naming_it(check):
    with pytest.raises(ConfigError, match=r"^--out: cannot write /proc/x\.jsonl \(.* in /proc\); expected "):
        check("/proc/x.jsonl", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only files and folders")
def test_a_read_only_file_or_folder_is_refused(tmp_path, a_file):
    a_file.chmod(0o444)
    with pytest.raises(ConfigError, match="is read-only"):
        check_output_file(a_file, "--out")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"^--out: cannot write .*ro/x \(Permission denied"):
            check_output_dir(folder / "x", "--out")
    finally:
        folder.chmod(0o755)
