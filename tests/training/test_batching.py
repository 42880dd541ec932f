"""Batching: each mode's data sets, collator and Trainer batch sizes; packing chosen where the
probe allows it (else length grouping, or an error when asked for explicitly); one log line
on how data is batched; a row too long for its bin is a DataError naming the key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from chattune.config_io import build_config
from chattune.data.encode import IGNORE_INDEX
from chattune.errors import ConfigError, DataError
from chattune.training.batching import (
    Batches,
    GlobalStepSampler,
    build_batches,
    format_batches,
    resolve_packing,
    row_lengths,
)
from chattune.training.collate import FILLER, PackCollator, PackedSteps, PadCollator
from tests.training.test_collate import rows_of

LENGTHS = [30, 12, 25, 7, 40, 18, 22, 9, 33, 15]


def config_of(**values):
    return build_config({"model_name_or_path": "unused", "max_seq_length": 48, "seed": 3,
                         "per_device_train_batch_size": 3, "per_device_eval_batch_size": 2, **values})


@pytest.fixture(scope="module")
def prepared():
    from datasets import Dataset

    return SimpleNamespace(train=Dataset.from_list(rows_of(LENGTHS)), eval=Dataset.from_list(rows_of([11, 5, 20], seed=1)))


def test_row_lengths_reads_every_rows_tokens(prepared):
    assert row_lengths(prepared.train) == LENGTHS


def test_pack_batches_are_whole_steps_with_the_plan_in_the_summary(prepared):
    batches = build_batches("pack", prepared, config_of(), pad_token_id=0, flatten=False)
    assert isinstance(batches.train, PackedSteps) and isinstance(batches.eval, PackedSteps)
    assert (batches.train_batch_size, batches.eval_batch_size) == (1, 1)
    assert isinstance(batches.collator, PackCollator) and not batches.collator.flatten
    plan = batches.summary["train"]
    assert batches.summary["mode"] == "pack" and plan["rows"] == len(LENGTHS) and plan["pack_length"] == 48
    assert batches.collator.pad_to == plan["bin_length"]
    assert sorted(i for step in batches.train.steps for b in step for i in b) == list(range(len(LENGTHS)))
    assert batches.summary["eval"]["rows"] == 3
    line = format_batches(batches)
    assert line.startswith(f"packing: {len(LENGTHS)} rows into {plan['bins']} bins of {plan['bin_length']}")
    assert "as 3 rows a step unpacked" in line


@pytest.mark.parametrize("mode", ["padding_free", "group_by_length", "pad"])
def test_row_batches_keep_the_configured_batch_sizes(mode, prepared):
    batches = build_batches(mode, prepared, config_of(), pad_token_id=0, flatten=False)
    assert (batches.train_batch_size, batches.eval_batch_size) == (3, 2)
    assert batches.summary == {"mode": mode} and format_batches(batches) == f"batching: {mode}"
    assert isinstance(batches.collator, PackCollator if mode == "padding_free" else PadCollator)
    if mode == "padding_free":
        assert batches.collator.flatten
    assert ("length" in batches.train.column_names) == (mode == "group_by_length")
    if mode == "group_by_length":
        assert batches.train["length"] == LENGTHS
    assert batches.eval is prepared.eval


def test_a_row_longer_than_pack_length_is_a_data_error(prepared):
    """Unreachable from a validated config (pack_length >= max_seq_length, rows cut to
    max_seq_length); a config changed after validation still gets the error, not a traceback."""
    config = config_of()
    config.data.pack_length = 20
    with pytest.raises(DataError, match="pack_length: a row of 40 tokens does not fit in a bin of 20 tokens"):
        build_batches("pack", prepared, config, pad_token_id=0, flatten=False)


def test_the_log_line_warns_when_steps_hold_other_row_counts_than_unpacked():
    summary = {"rows": 10, "bins": 10, "bin_length": 100, "pack_length": 512, "fill": 0.5, "steps": 5,
               "rows_per_step": 2.0, "rows_per_step_unpacked": 4, "bins_per_step": [1, 3]}
    line = format_batches(Batches("pack", None, None, None, 1, 1, {"mode": "pack", "train": summary}))
    assert "of 100 (a step's budget; pack_length 512) tokens" in line
    assert "raise per_device_train_batch_size or use packing=pad" in line


@pytest.fixture(scope="module")
def llama(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32)


def test_auto_packs_where_the_probe_keeps_rows_apart(llama):
    logged = []
    assert resolve_packing(config_of(), llama, 0, llama.config.vocab_size, logged.append) == "pack"
    assert resolve_packing(config_of(packing="padding_free"), llama, 0, llama.config.vocab_size) == "padding_free"
    assert logged == []


def test_pad_and_length_grouping_are_taken_as_asked_without_a_probe(llama, monkeypatch):
    import chattune.training.batching

    def no_probe(*args, **kwargs):
        raise AssertionError("probed the model for a mode that packs nothing")

    monkeypatch.setattr(chattune.training.batching, "check_packed_attention", no_probe)
    for mode in ("pad", "group_by_length"):
        assert resolve_packing(config_of(packing=mode), llama, 0, llama.config.vocab_size) == mode


def test_a_method_or_model_that_mixes_packed_rows_falls_back_or_is_refused(llama, monkeypatch):
    import chattune.training.batching

    logged = []
    ptuning = config_of(method="ptuning")
    assert resolve_packing(ptuning, llama, 0, llama.config.vocab_size, logged.append) == "group_by_length"
    assert "KV prefix" in logged[0]
    monkeypatch.setattr(chattune.training.batching, "check_packed_attention", lambda *a, **k: "rows attend to each other")
    assert resolve_packing(config_of(), llama, 0, llama.config.vocab_size, logged.append) == "group_by_length"
    assert logged[1] == ("packing: not packing (rows attend to each other); "
                         "batching rows grouped by length instead")
    with pytest.raises(ConfigError, match="packing: pack is not possible here: rows attend"):
        resolve_packing(config_of(packing="pack"), llama, 0, llama.config.vocab_size)


# --- several processes ------------------------------------------------------------------------

def test_the_global_step_sampler_keeps_each_steps_items_together_in_rank_order():
    sampler = GlobalStepSampler(12, 3, seed=5)
    order = list(sampler)
    assert len(sampler) == 12 and sorted(order) == list(range(12))  # every item once an epoch
    groups = [order[k:k + 3] for k in range(0, 12, 3)]
    assert all(group == [group[0], group[0] + 1, group[0] + 2] and group[0] % 3 == 0 for group in groups)
    assert order == list(GlobalStepSampler(12, 3, seed=5))  # the same for the same (seed, epoch)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(12)) and second != order  # a new order each epoch
    again = GlobalStepSampler(12, 3, seed=5)
    again.set_epoch(1)
    assert list(again) == second  # exact resume: the order depends on (seed, epoch) alone
    assert list(GlobalStepSampler(12, 3, seed=6)) != order


def test_accelerate_hands_each_rank_its_planned_share_of_every_step():
    """What the Trainer does with the sampler on several processes: batches of one item,
    sharded by accelerate, rank r taking every world_size-th from r on."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    world_size, items = 4, 40
    sampler = GlobalStepSampler(items, world_size, seed=11)
    order = list(sampler)
    for rank in range(world_size):
        shard = BatchSamplerShard(BatchSampler(sampler, 1, drop_last=False), num_processes=world_size,
                                  process_index=rank, split_batches=False, even_batches=True)
        got = [batch[0] for batch in shard]
        assert got == order[rank::world_size]
        assert all(item % world_size == rank for item in got)  # item k * world_size + r: rank r's share


def test_packed_batches_for_two_processes_plan_per_rank_and_fill_the_eval_steps(prepared):
    """3 eval rows at an eval batch of 3 are one packed step; a filler step (one pad token,
    no supervised label) makes it two, one per process."""
    batches = build_batches("pack", prepared, config_of(per_device_eval_batch_size=3), pad_token_id=0,
                            flatten=False, world_size=2)
    assert len(batches.train) % 2 == 0 and batches.world_size == 2
    assert sorted(i for step in batches.train.steps for b in step for i in b) == list(range(len(LENGTHS)))
    plan = batches.summary["train"]
    assert plan["world_size"] == 2 and set(plan["rank_imbalance"]) == {"mean", "max"}
    assert plan["steps"] == len(batches.train) // 2
    assert "2 processes, each step's tokens dealt out to them" in format_batches(batches)
    sampler = batches.train_sampler(seed=3)
    assert isinstance(sampler, GlobalStepSampler) and (sampler.items, sampler.world_size) == (len(batches.train), 2)

    assert batches.summary["eval"]["steps"] == 1 and len(batches.eval) == 2
    assert batches.eval.steps[-1] == [[FILLER]]
    assert sorted(i for step in batches.eval.steps[:-1] for b in step for i in b) == [0, 1, 2]
    filler = batches.eval[1]
    assert filler == {"bins": [[{"input_ids": [0], "labels": [IGNORE_INDEX]}]]}
    collated = batches.collator([filler])
    assert (collated["labels"] == IGNORE_INDEX).all()  # adds nothing to the eval loss
    real = batches.collator([batches.eval[0]])
    assert (real["labels"] != IGNORE_INDEX).sum() > 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_padded_eval_set_is_filled_to_whole_batches_on_every_process(prepared, world_size):
    """3 eval rows, an eval batch of 2: filled to 4 rows on 2 processes, to 6 on 3; the
    filler rows are one pad token without a supervised label."""
    batches = build_batches("pad", prepared, config_of(), pad_token_id=0, flatten=False, world_size=world_size)
    assert len(batches.eval) == 2 * world_size and len(batches.eval) % (2 * world_size) == 0
    assert batches.eval[:3] == prepared.eval[:3]
    for row in batches.eval.select(range(3, len(batches.eval))):
        assert row == {"input_ids": [0], "labels": [IGNORE_INDEX]}
    assert batches.train is prepared.train  # the Trainer's sampler shares the training rows
    assert batches.train_sampler(seed=3) is None
    assert batches.summary == {"mode": "pad", "world_size": world_size}
    assert format_batches(batches) == f"batching: pad on {world_size} processes"


def test_one_process_gets_no_filler_and_the_trainers_own_sampler(prepared):
    for mode in ("pack", "pad"):
        batches = build_batches(mode, prepared, config_of(), pad_token_id=0, flatten=False)
        assert batches.train_sampler(seed=3) is None
        assert len(batches.eval) == (3 if mode == "pad" else batches.summary["eval"]["steps"])


def test_eval_filler_rows_keep_an_image_column():
    """Several processes: the eval set is completed with filler rows; with images in the data the
    fillers get an empty images list (the column's features must match)."""
    from datasets import Dataset

    from chattune.training.batching import _filled_rows

    rows = Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [[1, 2], [-100]], "images": [["/a.png"], []]})
    filled = _filled_rows(rows, pad_token_id=0, multiple=4)
    assert len(filled) == 4 and filled["images"] == [["/a.png"], [], [], []]
    assert filled["labels"][2:] == [[-100], [-100]]
