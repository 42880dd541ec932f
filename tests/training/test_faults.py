"""Training when things go wrong: a kill in the middle of a checkpoint save, damaged
checkpoints, a full disk, a diverged run and bad input each end in a resume that equals the
uninterrupted run, or in one line saying what happened; never in a traceback, a half-written
``checkpoint-N`` or NaN weights on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.cli import main
from chattune.config_io import load_config
from chattune.training.checkpoints import checkpoint_problems
from chattune.training.recipe import train
from tests.training.tmpfs import mounted_tmpfs

REPO = Path(__file__).resolve().parents[2]


def overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    values = {"model_name_or_path": str(model), "train_files": str(data), "max_seq_length": 96,
              "output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 6, "save_steps": 2,
              "logging_steps": 2, "learning_rate": 2e-3, "seed": 7, "report_to": "none", "eval_fraction": 0}
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def reference(tiny_models, data_file, tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "out"
    train(load_config(None, overrides(tiny_models("glm4"), data_file, out)), log=lambda *_: None)
    return out


def assert_same_adapter(got_dir: Path, expected_dir: Path) -> None:
    expected = load_file(str(expected_dir / "adapter_model.safetensors"))
    got = load_file(str(got_dir / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def resume(tiny_models, data_file, out: Path) -> list[str]:
    lines: list[str] = []
    config = load_config(None, overrides(tiny_models("glm4"), data_file, out, resume_from_checkpoint="true"))
    result = train(config, log=lambda *parts: lines.append(" ".join(map(str, parts))))
    assert result.global_step == 6
    return lines


def test_every_checkpoint_of_a_run_is_complete(reference):
    names = sorted(p.name for p in reference.iterdir() if p.is_dir() and "checkpoint" in p.name)
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # no tmp-checkpoint left behind
    for name in names:
        assert checkpoint_problems(reference / name) == []


KILLED_RUN = """
import json, os, sys, time
from transformers import Trainer
from chattune.config_io import load_config
from chattune.training.recipe import train

marker = sys.argv[1]
original = Trainer._save_rng_state

def slow_save(self, output_dir):
    if self.state.global_step == 4:  # weights and optimizer written, the rest not yet
        open(marker, "w").close()
        time.sleep(600)
    return original(self, output_dir)

Trainer._save_rng_state = slow_save
train(load_config(None, json.loads(sys.argv[2])), log=lambda *_: None)
"""


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_previous_one(
        reference, tiny_models, data_file, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "saving"
    args = json.dumps(overrides(tiny_models("glm4"), data_file, out))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(marker), args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the training run never reached the save of checkpoint-4"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert checkpoint_problems(out / "checkpoint-2") == []
    assert not (out / "checkpoint-4").exists() or checkpoint_problems(out / "checkpoint-4") == []
    lines = resume(tiny_models, data_file, out)
    assert any("resuming from checkpoint-2" in line for line in lines), lines
    assert any("tmp-checkpoint-4" in line and "interrupted" in line for line in lines), lines
    assert (out / "incomplete-tmp-checkpoint-4").is_dir()  # kept, not deleted
    assert_same_adapter(out, reference)


def _truncate_adapter(folder: Path) -> str:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "adapter_model.safetensors is truncated"


def _drop_trainer_state(folder: Path) -> str:
    (folder / "trainer_state.json").unlink()
    return "no trainer_state.json"


def _empty_optimizer_no_state(folder: Path) -> str:
    (folder / "trainer_state.json").unlink()
    (folder / "optimizer.pt").write_bytes(b"")
    return "optimizer.pt is empty (0 bytes)"


def _emptied(folder: Path) -> str:
    for child in folder.iterdir():
        child.unlink()
    return "empty folder"


@pytest.mark.parametrize("damage", [_truncate_adapter, _drop_trainer_state, _empty_optimizer_no_state, _emptied])
def test_resume_true_skips_a_damaged_newest_checkpoint_and_names_it(damage, reference, tiny_models, data_file,
                                                                    tmp_path):
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(reference / name, out / name)
    reason = damage(out / "checkpoint-4")
    lines = resume(tiny_models, data_file, out)
    skipped = [line for line in lines if "skipping checkpoint-4" in line]
    assert skipped and reason in skipped[0], lines
    assert any("resuming from checkpoint-2" in line for line in lines), lines
    assert (out / "incomplete-checkpoint-4").is_dir()  # never deleted
    assert checkpoint_problems(out / "checkpoint-4") == []  # saved again, whole
    assert_same_adapter(out, reference)


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    code = main(["train", *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("chattune: error:")]
    return code, err


def finite_on_disk(out: Path) -> bool:
    for path in out.rglob("*.safetensors"):
        for tensor in load_file(str(path)).values():
            if not torch.isfinite(tensor).all():
                return False
    return True


def test_a_diverged_run_stops_on_its_step_and_saves_no_nan(tiny_models, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, overrides(tiny_models("glm4"), data_file, out, learning_rate="1e30",
                                          max_grad_norm=0, save_steps=1, max_steps=8))
    assert code == 2 and len(err) == 1, err
    assert "training diverged at step 2: the loss is nan" in err[0]
    assert "learning_rate=1e+30 is too high" in err[0] and "max_grad_norm=1.0" in err[0]
    assert "the last good checkpoint, checkpoint-1, is kept" in err[0]
    assert not (out / "adapter_model.safetensors").exists()  # no final output
    assert checkpoint_problems(out / "checkpoint-1") == []
    assert finite_on_disk(out)


def test_weights_turned_non_finite_are_never_saved(tiny_models, data_file, tmp_path, capsys, monkeypatch):
    from chattune.training.trainer import ChattuneTrainer

    original = ChattuneTrainer.training_step

    def poisoned(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        if self.state.global_step == 2:  # the update of step 3 leaves a NaN weight, the loss stays finite
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return loss

    monkeypatch.setattr(ChattuneTrainer, "training_step", poisoned)
    monkeypatch.setattr(ChattuneTrainer, "_get_grad_norm", lambda self, model, grad_norm=None: 0.5)
    out = tmp_path / "out"
    code, err = run_cli(capsys, overrides(tiny_models("glm4"), data_file, out, save_steps=1, max_steps=3))
    assert code == 2 and len(err) == 1, err
    assert "hold NaN or inf values" in err[0] and "checkpoint-3 was not written" in err[0]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert finite_on_disk(out)


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "1m") as mount:
        yield mount


def test_a_full_disk_ends_in_one_line_and_keeps_the_earlier_checkpoints(small_disk, tiny_models, data_file, capsys):
    out = small_disk / "out"
    code, err = run_cli(capsys, overrides(tiny_models("glm4"), data_file, out, save_steps=1, max_steps=8))
    assert code == 2 and len(err) == 1, err
    assert "the disk is full" in err[0] and "it needs about" in err[0] and "MB" in err[0]
    kept = sorted(out.glob("checkpoint-*"))
    assert kept and all(checkpoint_problems(folder) == [] for folder in kept)
    assert not list(out.glob("tmp-*"))
    assert f"last complete: {kept[-1].name}" in err[0]


# --- bad input: one line, naming where the value came from -------------------------------------


@pytest.fixture
def config_file(tiny_models, data_file, tmp_path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model_name_or_path: {tiny_models('glm4')}\ntrain_files: [{data_file}]\n"
                    f"output_dir: {tmp_path / 'out'}\nmax_steps: 2\nsave_steps: 2\nmax_seq_length: 96\n"
                    "report_to: none\n")
    return path


def _bad_input(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(overrides, fragment of the expected message) for one bad input."""
    if case == "empty file":
        (tmp_path / "empty.json").write_text("")
        return [f"train_files={tmp_path / 'empty.json'}"], "no rows"
    if case == "empty list":
        (tmp_path / "list.json").write_text("[]")
        return [f"train_files={tmp_path / 'list.json'}"], "no rows"
    if case == "all rows invalid":
        (tmp_path / "bad.json").write_text('[{"foo": 1}, {"bar": 2}]')
        return [f"train_files={tmp_path / 'bad.json'}"], "2 skipped"
    if case == "missing file":
        return [f"train_files={tmp_path / 'missing.json'}"], "no such file"
    if case == "output_dir is a file":
        (tmp_path / "afile").write_text("x")
        return [f"output_dir={tmp_path / 'afile'}"], "command line: output_dir: "
    if case == "infinite epochs":
        return ["max_steps=-1", "num_train_epochs=inf"], "command line: num_train_epochs: must be a finite number"
    if case == "huge learning rate":
        return ["learning_rate=1e38"], "command line: learning_rate: 1e+38 is beyond"
    if case == "mistyped override":
        return ["learning_rate=abc"], "command line: learning_rate: expected a number"
    if case == "model folder with only config.json":
        folder = tmp_path / "onlyconfig"
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "llama"}')
        return [f"model_name_or_path={folder}"], "no tokenizer files in the folder"
    assert case == "fp16 on CPU"
    if torch.cuda.is_available():
        pytest.skip("fp16 is fine with CUDA")
    return ["fp16=true"], "command line: fp16: float16 mixed precision needs a CUDA GPU"


@pytest.mark.parametrize("case", ["empty file", "empty list", "all rows invalid", "missing file",
                                  "output_dir is a file", "infinite epochs", "huge learning rate",
                                  "mistyped override", "model folder with only config.json", "fp16 on CPU"])
def test_bad_input_is_one_line_naming_its_source(case, config_file, tmp_path, capsys):
    extra, fragment = _bad_input(tmp_path, case)
    code, err = run_cli(capsys, [str(config_file), *extra])
    assert code == 2 and len(err) == 1, err
    assert fragment in err[0], err[0]
    assert str(config_file) not in err[0] or "command line" not in fragment


def test_a_bad_value_in_the_file_names_the_file(config_file, capsys):
    text = config_file.read_text() + "learning_rate: 1.0e+38\n"
    config_file.write_text(text)
    code, err = run_cli(capsys, [str(config_file)])
    assert code == 2 and err == [f"chattune: error: {config_file}: learning_rate: 1e+38 is beyond what a float32 "
                                 "optimizer can compute with; expected a finite number up to 1e+30 "
                                 "(LoRA usually 1e-5 to 1e-3)"]


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_that_resumes(tiny_models, data_file, tmp_path):
    out = tmp_path / "out"
    args = overrides(tiny_models("glm4"), data_file, out, max_steps=3000, save_steps=100000, logging_steps=1)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "chattune", "train", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "progress.json").exists() or json.loads((out / "progress.json").read_text())["step"] < 2:
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the training never reached step 2"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    step = json.loads((out / "progress.json").read_text())["step"]
    assert process.returncode == 3, stderr[-2000:]
    assert f"stopped at step {step}: checkpoint-{step} is in {out}" in stdout
    assert "resume_from_checkpoint=true" in stdout and "Traceback" not in stderr
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert checkpoint_problems(out / f"checkpoint-{step}") == []
    assert not (out / "chattune.json").exists()  # stopped, not finished
    config = load_config(None, [*args, f"max_steps={step + 2}", "resume_from_checkpoint=true"])  # later wins
    assert train(config, log=lambda *_: None).global_step == step + 2
    assert (out / "chattune.json").is_file()
