"""Packing plans: bins that fill, steps that keep the batch in tokens, and a row too long
for its bin reported as a DataError naming the key. (That packed rows never see each other
is checked in tests/training/test_attention.py, the collator in tests/training/test_collate.py.)"""

from __future__ import annotations

import math
import random

import pytest

from chattune.errors import ChattuneError, DataError
from chattune.training.packing import group_steps, pack_bins, plan_packing


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
    from chattune.training.batching import row_lengths
    from chattune.training.collate import PackedSteps

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


# --- several processes: each global step dealt out to the ranks ------------------------------

def rows_of_plan(plan) -> list[int]:
    return sorted(i for item in plan.steps for rows in item for i in rows)


def item_tokens(plan, lengths) -> list[int]:
    return [sum(lengths[i] for rows in item for i in rows) for item in plan.steps]


@pytest.mark.parametrize("pack_length", [512, 2048])
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_a_plan_for_ranks_holds_every_row_once_in_whole_global_steps(world_size, batch, pack_length):
    """Item ``k * world_size + r`` is rank r's share of global step k: every row in exactly one
    item, whole global steps, no rank without a row, and about as many global steps as
    unpacked batches of ``world_size x batch`` rows (measured: within 5.4%, the most at
    world_size 2 and batch 2)."""
    lengths = alpaca_like_lengths()
    plan = plan_packing(lengths, pack_length, batch, seed=42, world_size=world_size)
    assert rows_of_plan(plan) == list(range(len(lengths)))
    assert len(plan.steps) % world_size == 0
    assert all(any(rows for rows in item) for item in plan.steps), "a rank with nothing to do in a step"
    steps = len(plan.steps) // world_size
    assert len(plan.imbalance) == steps == plan.summary()["steps"]
    unpacked = len(lengths) / (world_size * batch)
    assert abs(steps - unpacked) <= 0.06 * unpacked + 1, plan.summary()
    assert plan.summary()["world_size"] == world_size
    assert plan == plan_packing(lengths, pack_length, batch, seed=42, world_size=world_size)  # deterministic
    for item in plan.steps:  # a bin over the budget is a single row longer than it
        assert all(sum(lengths[i] for i in rows) <= plan.capacity or len(rows) == 1 for rows in item)


IMBALANCE_OVER_5_PERCENT = {(8, 4, 512)}
"""(world_size, batch, pack_length) whose mean imbalance is over 5% (see the test below)."""


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.xfail(
        strict=True, reason="known: at 8 ranks, 4 rows a step and pack_length 512 the budget is 2 bins of "
                            "380 tokens, and rows longer than that get bins of their own (mean imbalance 8.5%)"))
    if case in IMBALANCE_OVER_5_PERCENT else case
    for case in [(w, b, p) for w in (2, 3, 8) for b in (4, 8, 16) for p in (512, 2048)]],
    ids=lambda case: "world{}-batch{}-pack{}".format(*case))
def test_ranks_of_a_step_carry_about_the_same_tokens(case):
    """The busiest rank of a global step carries on average under 5% more tokens than the mean
    rank, at 4 or more rows a step (Alpaca-like lengths, seed 42). A rank's budget is a whole
    number of equal bins and a global step that many bins per rank. Measured mean (worst step):

    ====== ===== ================== ==================
    world  batch pack_length 512    pack_length 2048
    ====== ===== ================== ==================
    2      4     2.5% (18%)         0.7% (34%)
    2      8     0.7% (17%)         0.8% (33%)
    2      16    0.5% (8%)          0.6% (14%)
    3      4     3.8% (20%)         0.9% (20%)
    3      8     0.7% (11%)         0.8% (20%)
    3      16    0.5% (5%)          3.0% (49%)
    8      4     8.5% (53%)  xfail  0.7% (8%)
    8      8     2.9% (34%)         1.0% (7%)
    8      16    2.0% (11%)         4.8% (34%)
    ====== ===== ================== ==================

    (At 1 row a step: 0.2%, 0.5%, 1.6% for 2, 3, 8 ranks; at 2 rows: 3.7%, 6.2%, 15.1%.) The
    xfail case: the budget of 4 rows is 2 bins of 380 tokens, and the rows longer than that
    (up to 512) get bins of their own, which the ranks cannot share evenly."""
    world_size, batch, pack_length = case
    lengths = alpaca_like_lengths()
    plan = plan_packing(lengths, pack_length, batch, seed=42, world_size=world_size)
    carried = item_tokens(plan, lengths)
    for k, imbalance in enumerate(plan.imbalance):  # the recorded figure is the step's own
        step = carried[k * world_size:(k + 1) * world_size]
        assert imbalance == pytest.approx(max(step) / (sum(step) / world_size) - 1)
    mean = sum(plan.imbalance) / len(plan.imbalance)
    assert mean < 0.05, f"mean imbalance {mean:.1%}"


def test_the_real_demo_data_is_planned_for_ranks(tiny_models, shared_data, tmp_path):
    from chattune.training.batching import row_lengths

    lengths = row_lengths(encoded_alpaca(tiny_models, shared_data, tmp_path).train)
    for world_size in (2, 3, 8):
        for batch in (1, 4):
            plan = plan_packing(lengths, 512, batch, seed=42, world_size=world_size)
            assert rows_of_plan(plan) == list(range(len(lengths)))
            assert len(plan.steps) % world_size == 0 and all(any(item) for item in plan.steps)
            assert plan.summary()["rank_imbalance"]["mean"] < 0.1, plan.summary()


def test_a_tail_too_small_for_every_rank_joins_the_step_before():
    """5 rows of 10 tokens, 2 rows a rank and step, 2 ranks: the budget cuts a step of 4 rows and
    a tail of 1, which cannot give both ranks a row; it joins the step before (3 and 2 rows)."""
    plan = plan_packing([10] * 5, 10, 2, seed=0, world_size=2)
    assert len(plan.steps) == 2 and sorted(len(item) for item in plan.steps) == [2, 3]
    assert rows_of_plan(plan) == [0, 1, 2, 3, 4]
    plan = plan_packing([10] * 7, 10, 2, seed=0, world_size=3)  # 6 + 1 -> one step of 7
    assert len(plan.steps) == 3 and sorted(len(item) for item in plan.steps) == [2, 2, 3]
    plan = plan_packing([10, 20, 30, 40, 50, 60, 70], 96, 1, seed=0, world_size=3)  # one row a rank: 3 + 4
    assert len(plan.steps) == 6 and rows_of_plan(plan) == list(range(7))
    assert sorted(sum(len(rows) for rows in item) for item in plan.steps) == [1, 1, 1, 1, 1, 2]


@pytest.mark.parametrize("batch", [1, 4])
def test_fewer_rows_than_processes_is_a_data_error_naming_both(batch):
    with pytest.raises(DataError, match="^3 rows cannot be shared by 8 processes .*start fewer processes"):
        plan_packing([10, 20, 30], 96, batch, seed=0, world_size=8)
    plan = plan_packing([10, 20], 96, batch, seed=0, world_size=2)  # as many rows as processes: one each
    assert sorted(rows for item in plan.steps for rows in item) == [[0], [1]]


def test_deal_to_ranks_gives_every_rank_about_the_same_tokens():
    from chattune.training.packing import deal_to_ranks

    lengths = [50, 40, 30, 20, 10, 10]
    shares = deal_to_ranks([[i] for i in range(6)], lengths, 2)
    assert [sum(lengths[i] for rows in share for i in rows) for share in shares] == [80, 80]
    assert sorted(rows for share in shares for rows in share) == [[i] for i in range(6)]
    # fewer bins than ranks: the bins are split into their rows
    assert deal_to_ranks([[0, 1, 2]], [5, 6, 7], 3) == [[[2]], [[1]], [[0]]]
    rng = random.Random(1)
    for _ in range(200):
        world_size = rng.randint(2, 8)
        count = rng.randint(world_size, 40)
        lengths = [rng.randint(1, 500) for _ in range(count)]
        bins = [[i] for i in range(count)]
        shares = deal_to_ranks(bins, lengths, world_size)
        assert len(shares) == world_size and all(shares)
        assert sorted(rows for share in shares for rows in share) == bins
        loads = [sum(lengths[i] for rows in share for i in rows) for share in shares]
        assert max(loads) - min(loads) <= max(lengths)  # largest first to the least loaded
