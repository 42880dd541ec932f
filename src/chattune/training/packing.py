"""Packing: which encoded rows share a bin, and which bins make up each training step.

Rows are packed into bins of at most ``pack_length`` tokens (best-fit decreasing,
over 95% full on Alpaca-like data), and the shuffled bins are grouped into steps that
carry as many tokens as ``per_device_train_batch_size`` unpacked rows do on average:
:func:`plan_packing` returns that plan as row indices. With several processes the plan
deals each global step's bins out to the ranks, so that every rank of a step carries about
the same tokens (:func:`deal_to_ranks`) and no row is on two ranks or dropped. Plain data, no model: the
collator that turns a step into tensors is :class:`chattune.training.collate.PackCollator`, and
the check that a model keeps packed rows apart is in :mod:`chattune.training.attention`.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
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
    world_size: int = 1
    imbalance: list[float] = dataclasses.field(default_factory=list)
    """Per global step (several processes): the busiest rank's tokens over the mean rank's, minus 1."""

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
        summary = {
            "rows": self.rows, "tokens": self.tokens, "bins": self.bins, "pack_length": self.pack_length,
            "bin_length": self.capacity, "fill": round(self.fill, 4),
            "steps": len(self.steps) // self.world_size,
            "rows_per_step": round(self.rows / max(len(self.steps), 1), 2),
            "rows_per_step_unpacked": self.rows_per_step,
            "bins_per_step": [min(sizes, default=0), max(sizes, default=0)],
        }
        if self.world_size > 1:
            summary["world_size"] = self.world_size
            summary["rank_imbalance"] = {
                "mean": round(sum(self.imbalance) / max(len(self.imbalance), 1), 4),
                "max": round(max(self.imbalance, default=0.0), 4)}
        return summary


def deal_to_ranks(bins: list[list[int]], lengths: Sequence[int], world_size: int) -> list[list[list[int]]]:
    """The bins of one global step dealt out to ``world_size`` ranks, largest first to the
    rank with the fewest tokens so far (each rank's bins, in rank order). With fewer bins
    than ranks the bins are split into their rows first; the caller makes sure a global step
    has at least ``world_size`` rows."""
    if len(bins) < world_size:
        bins = [[row] for rows in bins for row in rows]
    tokens = [sum(lengths[i] for i in rows) for rows in bins]
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [(0, rank) for rank in range(world_size)]
    for index in sorted(range(len(bins)), key=lambda b: (-tokens[b], b)):
        carried, rank = heapq.heappop(load)
        ranks[rank].append(bins[index])
        heapq.heappush(load, (carried + tokens[index], rank))
    return ranks


def _global_steps(bins: list[list[int]], bins_per_rank: int, world_size: int) -> list[list[list[int]]]:
    """Consecutive bins grouped into global steps of ``bins_per_rank x world_size`` bins (bins
    of about equal size: each rank then gets ``bins_per_rank`` of them); the bins left over
    make a last, smaller step, which joins the one before it when it holds fewer rows than
    ranks, so that every rank has a row in every step and none is dropped."""
    size = bins_per_rank * world_size
    groups = [bins[k:k + size] for k in range(0, len(bins), size)]
    if len(groups) > 1 and sum(len(rows) for rows in groups[-1]) < world_size:
        groups[-2].extend(groups.pop())
    return groups


def plan_packing(lengths: Sequence[int], capacity: int, rows_per_step: int, seed: int,
                 shuffle: bool = True, world_size: int = 1, bins_per_step: int | None = None) -> PackPlan:
    """Pack rows into bins and the (seeded, shuffled) bins into steps that each carry the
    tokens of ``rows_per_step`` average rows, so that a step means what it means unpacked.

    When a step's token budget is smaller than ``capacity`` (few rows a step, or a long
    pack_length), the bins are cut to the budget and a row longer than it gets a bin of its
    own: with whole ``capacity`` bins every step would carry more rows than asked for. At one
    row a step every row is its own bin and step, as unpacked (one row has no padding).
    A row longer than ``capacity`` (pack_length) is a :class:`~chattune.errors.DataError`.

    With ``world_size`` processes, item ``k * world_size + r`` of ``steps`` is rank ``r``'s
    share of global step ``k`` (:func:`deal_to_ranks`): every rank of a step carries about
    ``rows_per_step`` rows' tokens, every row is in exactly one item, and the number of items
    is a multiple of ``world_size``. A last global step too small to give every rank a row
    joins the one before it (those ranks carry a little more in that step); fewer rows than
    processes is a DataError.

    ``bins_per_step`` (pre-training: a step is a number of full blocks, not of documents)
    sets a step's budget to that many ``capacity`` bins instead; ``rows_per_step`` is then unused."""
    if max(lengths, default=0) > capacity:
        raise _too_long(max(lengths), capacity)
    if world_size > 1:
        return _plan_for_ranks(lengths, capacity, rows_per_step, seed, shuffle, world_size, bins_per_step)
    total = sum(lengths)
    if bins_per_step is None and rows_per_step <= 1:
        order = list(range(len(lengths)))
        if shuffle:
            random.Random(seed + 1).shuffle(order)
        return PackPlan([[[i]] for i in order], len(lengths), total, len(order), max(lengths, default=0),
                        rows_per_step, capacity, total)
    per_step = bins_per_step * capacity if bins_per_step else rows_per_step * total / max(len(lengths), 1)
    if bins_per_step:
        rows_per_step = round(per_step * len(lengths) / max(total, 1), 2)
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


def _plan_for_ranks(lengths: Sequence[int], capacity: int, rows_per_step: int, seed: int, shuffle: bool,
                    world_size: int, bins_per_step: int | None = None) -> PackPlan:
    """:func:`plan_packing` for several processes: bins as for one, grouped into global steps
    of ``world_size`` ranks' tokens and dealt out to the ranks."""
    if len(lengths) < world_size:
        raise DataError(f"{len(lengths)} rows cannot be shared by {world_size} processes (each needs at least "
                        "one row a step); add data or start fewer processes")
    total = sum(lengths)
    per_step = bins_per_step * capacity if bins_per_step else max(rows_per_step, 1) * total / len(lengths)
    if bins_per_step is None and rows_per_step <= 1:  # one row a rank: a step's rows are of about the same length
        return _rows_for_ranks(lengths, capacity, seed, shuffle, world_size)
    else:  # a rank's budget is a whole number of equal bins, so that ranks can be dealt equal shares
        bins_per_rank = math.ceil(per_step / capacity)
        bin_length = math.ceil(per_step / bins_per_rank)
        short = [i for i, n in enumerate(lengths) if n <= bin_length]
        bins = [[short[j] for j in rows] for rows in pack_bins([lengths[i] for i in short], bin_length, seed)]
        bins += [[i] for i, n in enumerate(lengths) if n > bin_length]
    if shuffle:
        random.Random(seed + 1).shuffle(bins)
    items: list[list[list[int]]] = []
    imbalance = []
    for group in _global_steps(bins, bins_per_rank, world_size):
        shares = deal_to_ranks(group, lengths, world_size)
        carried = [sum(lengths[i] for rows in share for i in rows) for share in shares]
        imbalance.append(max(carried) / (sum(carried) / world_size) - 1.0)
        items.extend(shares)
    slots = sum(max(bin_length, sum(lengths[i] for i in rows)) for rows in bins)
    return PackPlan(items, len(lengths), total, len(bins), bin_length, rows_per_step, capacity, slots,
                    world_size, imbalance)


def _rows_for_ranks(lengths: Sequence[int], capacity: int, seed: int, shuffle: bool,
                    world_size: int) -> PackPlan:
    """One row a rank and step, each step's rows of about the same length (rows sorted by
    length, seeded ties, cut into steps of ``world_size``; the steps shuffled); the rows left
    over join the last step."""
    tiebreak = list(range(len(lengths)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tiebreak[i]))
    groups = [order[k:k + world_size] for k in range(0, len(order) - world_size + 1, world_size)]
    groups[-1] += order[len(groups) * world_size:]
    if shuffle:
        random.Random(seed + 1).shuffle(groups)
    items: list[list[list[int]]] = []
    imbalance = []
    for group in groups:
        shares = deal_to_ranks([[i] for i in group], lengths, world_size)
        carried = [sum(lengths[i] for rows in share for i in rows) for share in shares]
        imbalance.append(max(carried) / (sum(carried) / world_size) - 1.0)
        items.extend(shares)
    total = sum(lengths)
    return PackPlan(items, len(lengths), total, len(lengths), max(lengths), 1, capacity, total,
                    world_size, imbalance)
