"""Packing plans: bins that fill, steps that keep the batch in tokens, and a row too long
for its bin reported as a DataError naming the key. (That packed rows never see each other
is checked in tests/test_attention.py, the collator in tests/test_collate.py.)"""

from __future__ import annotations

import math
import random

import pytest

from chattune.data.packing import group_steps, pack_bins, plan_packing
from chattune.errors import ChattuneError, DataError


def test_bins_hold_every_row_once_and_never_overflow():
    lengths = [random.Random(i).randint(1, 300) for i in range(500)]
    bins = pack_bins(lengths, 512, seed=3)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert bins == pack_bins(lengths, 512, seed=3)  # deterministic
    assert sum(lengths) / (len(bins) * 512) > 0.97
    with pytest.raises(DataError, match="pack_length"):
        pack_bins([10, 600], 512)


def test_steps_follow_the_token_budget():
    tokens = [500] * 100
    steps = group_steps(tokens, 1250.0)  # 2.5 bins a step
    assert sorted(i for s in steps for i in s) == list(range(100))
    assert len(steps) == 40 and {len(s) for s in steps} == {2, 3}
    assert all(steps[k][-1] + 1 == steps[k + 1][0] for k in range(len(steps) - 1))  # consecutive


def alpaca_like_lengths(count=985, seed=0):
    """Row lengths shaped like the Alpaca demo's (mean about 200 tokens, a long tail to 512)."""
    rng = random.Random(seed)
    return [min(512, max(12, int(rng.lognormvariate(5.1, 0.55)))) for _ in range(count)]


@pytest.mark.parametrize("pack_length", [512, 2048])
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16])
def test_a_step_carries_about_the_configured_rows_whatever_the_pack_length(pack_length, batch):
    lengths = alpaca_like_lengths()
    plan = plan_packing(lengths, pack_length, batch, seed=42)
    unpacked = len(lengths) / batch
    assert abs(len(plan.steps) - unpacked) <= 0.04 * unpacked + 1, plan.summary()
    assert sorted(i for s in plan.steps for b in s for i in b) == list(range(len(lengths)))
    for step in plan.steps:
        for rows in step:  # a bin over the budget is a single row longer than it
            assert sum(lengths[i] for i in rows) <= plan.capacity or len(rows) == 1
    budget = batch * sum(lengths) / len(lengths)
    if batch == 1:
        assert all(len(step) == 1 and len(step[0]) == 1 for step in plan.steps) and plan.pad_to is None
    else:
        assert plan.capacity == min(pack_length, math.ceil(budget)) == plan.pad_to
        assert plan.fill > 0.95, plan.summary()
    assert plan.summary()["pack_length"] == pack_length


def encoded_alpaca(tiny_models, shared_data, tmp_path):
    from chattune.config_io import load_config
    from chattune.data.prepare import prepare_data
    from chattune.model import load_tokenizer

    model = tiny_models("glm4")
    config = load_config(None, [f"model_name_or_path={model}", f"train_files={shared_data / 'alpaca_en_demo.json'}",
                                "template=tutorial-alpaca", "max_seq_length=512", f"cache_dir={tmp_path}"])
    return prepare_data(config.data, load_tokenizer(str(model)), "tutorial-alpaca", 42)


def test_demo_data_packs_over_95_percent_in_as_many_steps(tiny_models, shared_data, tmp_path):
    from chattune.batching import row_lengths
    from chattune.collate import PackedSteps

    prepared = encoded_alpaca(tiny_models, shared_data, tmp_path)
    lengths = row_lengths(prepared.train)
    assert max(lengths) == 512
    for batch in (2, 4, 8):
        plan = plan_packing(lengths, 512, batch, seed=42)
        assert plan.fill > 0.95, plan.summary()
        # the same number of steps per epoch as unpacked batches of `batch` rows (+-1)
        assert abs(len(plan.steps) - len(lengths) / batch) <= 1, plan.summary()
        assert sorted(i for s in plan.steps for b in s for i in b) == list(range(len(lengths)))
    dataset = PackedSteps(prepared.train, plan.steps)
    first = dataset[0]["bins"]
    assert [len(b) for b in first] == [len(b) for b in plan.steps[0]]
    assert first[0][0]["input_ids"] == prepared.train[plan.steps[0][0][0]]["input_ids"]


@pytest.mark.parametrize("plan", [lambda: pack_bins([10, 600, 30], 512),
                                  lambda: plan_packing([10, 600, 30], 512, 4, seed=0),
                                  lambda: plan_packing([10, 600, 30], 512, 1, seed=0)],
                         ids=["pack_bins", "plan_packing", "plan_packing_one_row_a_step"])
def test_a_row_longer_than_pack_length_is_a_data_error_naming_the_keys(plan):
    with pytest.raises(DataError) as caught:
        plan()
    assert isinstance(caught.value, ChattuneError)
    message = str(caught.value)
    assert message.startswith("pack_length: a row of 600 tokens does not fit in a bin of 512 tokens")
    assert "max_seq_length" in message and "expected" in message
