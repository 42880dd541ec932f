"""What counts as a complete checkpoint, also for the layouts FSDP and DeepSpeed write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from chattune.training.checkpoints import checkpoint_problems


def _common(folder: Path) -> None:
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (folder / "chattune.json").write_text("{}")
    for rank in (0, 1):
        torch.save({"cpu": torch.zeros(1)}, folder / f"rng_state_{rank}.pth")


def ddp_checkpoint(folder: Path) -> Path:
    """What the Trainer writes under DDP (rank 0) plus each rank's RNG state."""
    _common(folder)
    torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({}, folder / "scheduler.pt")
    return folder


def fsdp_checkpoint(folder: Path) -> Path:
    """FSDP with a full state dict for the model and the optimizer saved in shards (accelerate)."""
    _common(folder)
    for shard in ("pytorch_model_fsdp_0", "optimizer_0"):
        (folder / shard).mkdir()
        (folder / shard / "__0_0.distcp").write_bytes(b"shard")
    torch.save({}, folder / "scheduler.pt")
    return folder


def deepspeed_checkpoint(folder: Path) -> Path:
    """DeepSpeed: its engine keeps optimizer (and scheduler) state under global_stepN."""
    _common(folder)
    (folder / "global_step4").mkdir()
    (folder / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"state")
    (folder / "latest").write_text("global_step4")
    return folder


@pytest.mark.parametrize("build", [ddp_checkpoint, fsdp_checkpoint, deepspeed_checkpoint],
                         ids=["ddp", "fsdp", "deepspeed"])
def test_each_backends_complete_checkpoint_is_complete(build, tmp_path):
    assert checkpoint_problems(build(tmp_path / "checkpoint-4")) == []


def test_a_ddp_checkpoint_without_its_optimizer_is_not(tmp_path):
    folder = ddp_checkpoint(tmp_path / "checkpoint-4")
    (folder / "optimizer.pt").unlink()
    assert checkpoint_problems(folder) == ["no optimizer.pt"]


def test_an_empty_shard_folder_is_not_complete(tmp_path):
    folder = fsdp_checkpoint(tmp_path / "checkpoint-4")
    (folder / "optimizer_0" / "__0_0.distcp").unlink()
    assert checkpoint_problems(folder) == ["optimizer_0 is empty"]


def test_an_fsdp_checkpoint_without_optimizer_shards_is_not(tmp_path):
    folder = fsdp_checkpoint(tmp_path / "checkpoint-4")
    for child in (folder / "optimizer_0").iterdir():
        child.unlink()
    (folder / "optimizer_0").rmdir()
    assert checkpoint_problems(folder) == ["no optimizer.pt"]


def test_a_full_disk_under_safetensors_is_a_one_line_error_naming_the_run_folder(tmp_path):
    from safetensors import SafetensorError

    from chattune.training.checkpoints import storage_error

    exc = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    error = storage_error(exc, tmp_path, 3_000_000, "saving checkpoint-2")
    assert error is not None and "\n" not in str(error)
    assert str(error).startswith(f"output_dir {tmp_path}: the disk is full (no space left on the device) "
                                 "while saving checkpoint-2: it needs about 3.0 MB")


def test_a_file_over_the_size_limit_under_safetensors_names_the_limit(tmp_path):
    from safetensors import SafetensorError

    from chattune.training.checkpoints import storage_error

    error = storage_error(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
                          tmp_path, None, "saving checkpoint-1")
    assert error is not None and "file size limit" in str(error) and "ulimit -f" in str(error)


def test_other_safetensors_errors_are_not_storage_errors(tmp_path):
    from safetensors import SafetensorError

    from chattune.training.checkpoints import error_code, storage_error

    exc = SafetensorError("Error while deserializing header: HeaderTooLarge")
    assert error_code(exc) is None and storage_error(exc, tmp_path) is None
    assert error_code(OSError(28, "No space left on device")) == 28


def test_torch_save_over_the_file_size_limit_names_the_limit(tmp_path, monkeypatch):
    from chattune.training import checkpoints

    monkeypatch.setattr(checkpoints, "file_size_limit", lambda: 102_400)
    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 101568 vs 101456")
    error = checkpoints.storage_error(exc, tmp_path, 1000, "saving checkpoint-1")
    assert str(error) == (f"output_dir {tmp_path}: a file reached this process's file size limit of 0.1 MB "
                          "(ulimit -f) while saving checkpoint-1; raise the limit or choose another output_dir")
    monkeypatch.setattr(checkpoints, "file_size_limit", lambda: None)
    assert checkpoints.storage_error(exc, tmp_path, 1000, "saving checkpoint-1") is None
