"""The Trainer as chattune runs it: a token-weighted eval loss whatever the batching, its
arguments from the run config, and the checkpoints a run may (not) resume from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from chattune.config_io import build_config
from chattune.data.encode import IGNORE_INDEX
from chattune.errors import ConfigError
from chattune.training.batching import build_batches
from chattune.training.loss import CausalLMLoss, HeadCapture, output_layer
from chattune.training.trainer import (
    ChattuneTrainer,
    dataloader_workers,
    resume_path,
    training_arguments,
)
from tests.training.test_collate import rows_of
from tests.training.tmpfs import mounted_tmpfs

EVAL_LENGTHS = [5, 30, 12, 41, 8, 19, 27, 3, 36, 14, 22]


def config_of(tmp_path, **values):
    return build_config({"model_name_or_path": "unused", "output_dir": str(tmp_path / "out"), "max_seq_length": 48,
                         "report_to": ["none"], **values})


def test_eval_loss_is_token_weighted_whatever_the_batching(tiny_models, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_models("glm4"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    rows = rows_of(EVAL_LENGTHS, vocab=model.config.vocab_size)
    prepared = SimpleNamespace(train=Dataset.from_list(rows), eval=Dataset.from_list(rows))
    config = config_of(tmp_path, per_device_eval_batch_size=3)
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
            labels = torch.tensor(row["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits[:-1], labels, ignore_index=IGNORE_INDEX,
                                                       reduction="sum").item()
            count += (labels != IGNORE_INDEX).sum().item()
    expected = total / count
    got = {}
    for mode in ("pack", "padding_free", "group_by_length", "pad"):
        for chunked in (False, True):
            batches = build_batches(mode, prepared, config, model.config.pad_token_id or 0, flatten=False)
            loss = CausalLMLoss(HeadCapture(output_layer(model)) if chunked else None, 7)
            trainer = ChattuneTrainer(model=model, args=training_arguments(config, True, batches),
                                      eval_dataset=batches.eval, data_collator=batches.collator,
                                      compute_loss_func=loss)
            with loss.capturing():
                got[mode, chunked] = trainer.evaluate()["eval_loss"]
                assert trainer.final_eval_loss() == pytest.approx(got[mode, chunked], rel=1e-6)
    for key, value in got.items():
        assert value == pytest.approx(expected, rel=1e-5), (key, got, expected)


def test_training_arguments_follow_the_config_and_the_batching(tmp_path):
    config = config_of(tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=2, save_steps=10,
                       torch_compile="true", gradient_accumulation_steps=2)
    packed = SimpleNamespace(mode="pack", train_batch_size=1, eval_batch_size=1)
    args = training_arguments(config, True, packed)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (1, 1)
    assert args.eval_strategy == "steps" and args.eval_steps == 10 and args.gradient_accumulation_steps == 2
    assert args.torch_compile and args.torch_compile_backend == "inductor"
    assert args.remove_unused_columns is False and args.report_to == []
    unbatched = training_arguments(config, False)
    assert (unbatched.per_device_train_batch_size, unbatched.per_device_eval_batch_size) == (4, 2)
    assert unbatched.eval_strategy == "no"
    grouped = training_arguments(config, False, SimpleNamespace(mode="group_by_length", train_batch_size=4,
                                                                eval_batch_size=2))
    strategy = getattr(grouped, "train_sampling_strategy", None) or getattr(grouped, "group_by_length", None)
    assert strategy in ("group_by_length", True)


def test_dataloader_workers_are_as_set_else_none_on_cpu():
    assert dataloader_workers(3) == 3
    if not torch.cuda.is_available():
        assert dataloader_workers(None) == 0
    else:
        assert 1 <= dataloader_workers(None) <= 4


def test_resume_path_never_overwrites_checkpoints(tmp_path):
    out = tmp_path / "out"
    assert resume_path(config_of(tmp_path), out) is None
    with pytest.raises(ConfigError, match="no checkpoint-"):
        resume_path(config_of(tmp_path, resume_from_checkpoint="true"), out)
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        resume_path(config_of(tmp_path, resume_from_checkpoint=str(tmp_path / "missing")), out)
    (out / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume_from_checkpoint=true"):
        resume_path(config_of(tmp_path), out)
    with pytest.raises(ConfigError, match="no complete checkpoint-.*; checkpoint-4: empty folder"):
        resume_path(config_of(tmp_path, resume_from_checkpoint="true"), out)
    with pytest.raises(ConfigError, match="is not a complete checkpoint .empty folder"):
        resume_path(config_of(tmp_path, resume_from_checkpoint=str(out / "checkpoint-4")), out)
    assert (out / "checkpoint-4").is_dir()  # a refused resume moves nothing


# --- a checkpoint the disk cannot take, a checkpoint damaged on disk ---------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 40 kB tmpfs: the run's first adapter_model.safetensors (64 kB) does not fit."""
    with mounted_tmpfs(tmp_path / "tiny-disk", "40k") as mount:
        yield mount


def test_a_full_disk_while_safetensors_writes_is_one_line_and_leaves_no_checkpoint(tiny_disk, tiny_models,
                                                                                   data_file, capsys):
    from tests.training.test_faults import overrides, run_cli

    out = tiny_disk / "out"
    code, err = run_cli(capsys, overrides(tiny_models("glm4"), data_file, out, save_steps=1, max_steps=2))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"chattune: error: output_dir {out}: the disk is full"), err[0]
    assert "while saving checkpoint-1" in err[0]
    assert not list(out.glob("*checkpoint-*"))  # the partial save is gone, nothing looks complete


def test_a_failed_safetensors_write_keeps_the_earlier_checkpoints(tiny_models, data_file, tmp_path, capsys,
                                                                  monkeypatch):
    import peft.peft_model
    from safetensors import SafetensorError

    from chattune.training.checkpoints import checkpoint_problems
    from tests.training.test_faults import overrides, run_cli

    original = peft.peft_model.safe_save_file

    def full_at_step_2(tensors, filename, *args, **kwargs):
        if "tmp-checkpoint-2" in str(filename):
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 100)  # what the disk took before it was full
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_at_step_2)
    out = tmp_path / "out"
    code, err = run_cli(capsys, overrides(tiny_models("glm4"), data_file, out, save_steps=1, max_steps=3))
    assert code == 2 and len(err) == 1, err
    assert f"output_dir {out}: the disk is full" in err[0] and "while saving checkpoint-2" in err[0]
    assert "the earlier checkpoints are untouched (last complete: checkpoint-1)" in err[0]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-1"]
    assert checkpoint_problems(out / "checkpoint-1") == []


def _poison(safetensors_file) -> None:
    """Overwrite every tensor byte of a safetensors file with float32 NaN; its size stays."""
    import struct

    data = bytearray(safetensors_file.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:] = struct.pack("<f", float("nan")) * ((len(data) - start) // 4)
    safetensors_file.write_bytes(bytes(data))


def test_resuming_from_a_checkpoint_with_nan_weights_stops_naming_it(tiny_models, data_file, tmp_path, capsys):
    from chattune.training.checkpoints import checkpoint_problems
    from tests.training.test_faults import overrides, run_cli

    out = tmp_path / "out"
    model = tiny_models("glm4")
    assert run_cli(capsys, overrides(model, data_file, out, save_steps=2, max_steps=4))[0] == 0
    _poison(out / "checkpoint-4" / "adapter_model.safetensors")
    assert checkpoint_problems(out / "checkpoint-4") == []  # whole on disk, only its values are bad
    code, err = run_cli(capsys, overrides(model, data_file, out, save_steps=2, max_steps=6,
                                          resume_from_checkpoint="true"))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"chattune: error: resume_from_checkpoint: {out / 'checkpoint-4'} is a bad checkpoint: ")
    assert "NaN or inf" in err[0] and f"resume from an earlier one: resume_from_checkpoint={out / 'checkpoint-2'}" \
        in err[0]
    assert "last good checkpoint" not in err[0]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    code, err = run_cli(capsys, overrides(model, data_file, out, save_steps=2, max_steps=6,
                                          resume_from_checkpoint=str(out / "checkpoint-2")))
    assert code == 0, err
    assert checkpoint_problems(out / "checkpoint-6") == []
