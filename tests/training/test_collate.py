"""Collators: padded batches with a mask; packed batches whose rows restart their positions,
drop their first label and carry no mask; packed steps read back from the encoded rows."""

from __future__ import annotations

import torch

from chattune.data.encode import IGNORE_INDEX
from chattune.training.collate import PackCollator, PackedSteps, PadCollator


def rows_of(lengths, vocab=500, seed=0):
    """Random rows of the given lengths, the first third of each unsupervised."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(20, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def test_collator_restarts_positions_masks_row_starts_and_has_no_mask():
    rows = rows_of([3, 4, 2])
    rows[1]["labels"] = list(rows[1]["input_ids"])  # a fully supervised row: its first label must go
    batch = PackCollator(pad_token_id=0)([{"bins": [[rows[0], rows[1]], [rows[2]]]}])
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert batch["use_cache"] is False
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["input_ids"][0].tolist() == rows[0]["input_ids"] + rows[1]["input_ids"]
    assert batch["labels"][0, 3] == IGNORE_INDEX  # row 0's last token does not predict row 1's first
    assert batch["labels"][0, 4:].tolist() == rows[1]["input_ids"][1:]
    assert batch["labels"][1, 2:].tolist() == [IGNORE_INDEX] * 5 and batch["input_ids"][1, 2:].tolist() == [0] * 5
    flat = PackCollator(pad_token_id=0, flatten=True)([rows[0], rows[1], rows[2]])
    assert flat["input_ids"].shape == (1, 9)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]


def test_pack_collator_pads_bins_to_pad_to_as_a_separate_segment():
    rows = rows_of([3, 4])
    batch = PackCollator(pad_token_id=7, pad_to=6)([{"bins": [[rows[0]], [rows[1]]]}])
    assert batch["input_ids"].shape == (2, 6)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    assert batch["input_ids"][0, 3:].tolist() == [7, 7, 7]
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 3


def test_pad_collator_pads_to_the_longest_row_with_a_mask():
    rows = rows_of([2, 5])
    batch = PadCollator(pad_token_id=9)(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist()[0] == rows[0]["input_ids"] + [9] * 3
    assert batch["labels"].tolist()[0] == rows[0]["labels"] + [IGNORE_INDEX] * 3
    assert batch["labels"].tolist()[1] == rows[1]["labels"]  # the first label is kept: one row a sequence
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_packed_steps_read_each_steps_rows_bin_by_bin():
    from datasets import Dataset

    rows = rows_of([3, 4, 2, 5])
    dataset = Dataset.from_list(rows)
    steps = PackedSteps(dataset, [[[2, 0], [3]], [[1]]])
    assert len(steps) == 2
    first = steps[0]["bins"]
    assert [[row["input_ids"] for row in bin_rows] for bin_rows in first] == \
        [[rows[2]["input_ids"], rows[0]["input_ids"]], [rows[3]["input_ids"]]]
    assert steps[1]["bins"][0][0]["labels"] == rows[1]["labels"]
    batch = PackCollator(0)([steps[0]])
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
