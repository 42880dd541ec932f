"""Packing: which encoded rows share a bin, and which bins make up each training step.

Rows are packed into bins of at most ``pack_length`` tokens (best-fit decreasing,
over 95% full on Alpaca-like data), and the shuffled bins are grouped into steps that
carry as many tokens as ``per_device_train_batch_size`` unpacked rows do on average:
:func:`plan_packing` returns that plan as row indices. Plain data, no model: the
collator that turns a step into tensors is :class:`chattune.collate.PackCollator`, and
the check that a model keeps packed rows apart is in :mod:`chattune.attention`.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from chattune.errors import DataError


def _too_long(size: int, capacity: int) -> DataError:
    return DataError(f"pack_length: a row of {size} tokens does not fit in a bin of {capacity} tokens; "
                     "expected pack_length (default max_seq_length) to be at least the longest row, "
                     "and rows to be cut to max_seq_length")


def pack_bins(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Row indices grouped into bins of at most ``capacity`` tokens (best-fit decreasing).

    Rows are placed longest first, each into the fullest bin it still fits in;
    rows of equal length are taken in a seeded random order. Deterministic for a
    given ``seed``. A row longer than ``capacity`` is a :class:`~chattune.errors.DataError`.
    """
    tiebreak = list(range(len(lengths)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tiebreak[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted
    for index in order:
        size = lengths[index]
        if size > capacity:
            raise _too_long(size, capacity)
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            left, target = free.pop(slot)
        else:
            left, target = capacity, len(bins)
            bins.append([])
        bins[target].append(index)
        if left - size > 0:
            bisect.insort(free, (left - size, target))
    return bins


def group_steps(bin_tokens: Sequence[int], tokens_per_step: float) -> list[list[int]]:
    """Consecutive bins grouped into steps of about ``tokens_per_step`` tokens each.

    A bin joins the step in which its middle token falls, counting tokens from the
    start, so step k holds the bins around tokens [k T, (k+1) T): steps follow the
    token budget without drifting, and there are about ``sum / T`` of them (fewer
    only when one bin alone holds more than ``T`` tokens).
    """
    steps: dict[int, list[int]] = {}
    seen = 0
    for index, tokens in enumerate(bin_tokens):
        key = int((seen + tokens / 2) // max(tokens_per_step, 1.0))
        steps.setdefault(key, []).append(index)
        seen += tokens
    return [steps[k] for k in sorted(steps)]


@dataclass
class PackPlan:
    """How one split is packed: the rows of each bin, the bins of each step, and the numbers."""

    steps: list[list[list[int]]]
    rows: int
    tokens: int
    bins: int
    capacity: int
    rows_per_step: float
    pack_length: int
    slots: int

    @property
    def fill(self) -> float:
        """Share of the bins' token slots (each bin padded to ``capacity``, or to its own
        row when that is longer) that hold a row's token."""
        return self.tokens / max(self.slots, 1)

    @property
    def pad_to(self) -> int | None:
        """The length every bin is padded to (static shapes); None at one row a step."""
        return None if self.rows_per_step <= 1 else self.capacity

    def summary(self) -> dict:
        """The plan's numbers, for the audit and the log."""
        sizes = [len(step) for step in self.steps]
        return {
            "rows": self.rows, "tokens": self.tokens, "bins": self.bins, "pack_length": self.pack_length,
            "bin_length": self.capacity, "fill": round(self.fill, 4), "steps": len(self.steps),
            "rows_per_step": round(self.rows / max(len(self.steps), 1), 2),
            "rows_per_step_unpacked": self.rows_per_step,
            "bins_per_step": [min(sizes, default=0), max(sizes, default=0)],
        }


def plan_packing(lengths: Sequence[int], capacity: int, rows_per_step: int, seed: int,
                 shuffle: bool = True) -> PackPlan:
    """Pack rows into bins and the (seeded, shuffled) bins into steps that each carry the
    tokens of ``rows_per_step`` average rows, so that a step means what it means unpacked.

    When a step's token budget is smaller than ``capacity`` (few rows a step, or a long
    pack_length), the bins are cut to the budget and a row longer than it gets a bin of its
    own: with whole ``capacity`` bins every step would carry more rows than asked for. At one
    row a step every row is its own bin and step, as unpacked (one row has no padding).
    A row longer than ``capacity`` (pack_length) is a :class:`~chattune.errors.DataError`."""
    if max(lengths, default=0) > capacity:
        raise _too_long(max(lengths), capacity)
    total = sum(lengths)
    if rows_per_step <= 1:
        order = list(range(len(lengths)))
        if shuffle:
            random.Random(seed + 1).shuffle(order)
        return PackPlan([[[i]] for i in order], len(lengths), total, len(order), max(lengths, default=0),
                        rows_per_step, capacity, total)
    per_step = rows_per_step * total / max(len(lengths), 1)
    bin_length = min(capacity, math.ceil(per_step))
    short = [i for i, n in enumerate(lengths) if n <= bin_length]
    bins = [[short[j] for j in rows] for rows in pack_bins([lengths[i] for i in short], bin_length, seed)]
    bins += [[i] for i, n in enumerate(lengths) if n > bin_length]
    if shuffle:
        random.Random(seed + 1).shuffle(bins)
    bin_tokens = [sum(lengths[i] for i in rows) for rows in bins]
    steps = [[bins[b] for b in step] for step in group_steps(bin_tokens, per_step)]
    slots = sum(max(bin_length, tokens) for tokens in bin_tokens)
    return PackPlan(steps, len(lengths), total, len(bins), bin_length, rows_per_step, capacity, slots)
