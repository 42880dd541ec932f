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
