"""Packing: encoded rows into fixed token budgets, without cross-talk between rows.

Rows are packed into bins of at most ``pack_length`` tokens (best-fit decreasing,
over 95% full on Alpaca-like data), the shuffled bins are grouped into steps that
carry as many tokens as ``per_device_train_batch_size`` unpacked rows do on
average, and :class:`PackCollator` turns a step into one batch:

- each bin's rows are concatenated; ``position_ids`` restart at 0 for every row;
- the first label of every row is -100, so no row predicts the next row's first token;
- there is no ``attention_mask`` and ``use_cache`` is False: transformers then builds
  the packed (block-diagonal causal) mask from ``position_ids`` for SDPA and eager
  attention, and flash-attention takes its varlen path (for which all bins of a step
  are flattened into one sequence, ``flatten=True``). With a KV cache, or with an
  attention mask, transformers silently lets packed rows attend to each other:
  :func:`check_packed_attention` runs the real model on a probe and says whether it
  keeps rows apart, so that training never relies on it without checking.

With SDPA, the packed mask makes every bin cost ``pack_length`` squared in attention
whatever its rows; :func:`use_varlen_sdpa` switches the model to an attention function
that runs SDPA causally on each row's own span instead (what flash-attention's varlen
path does on CUDA), so attention costs the sum of the rows' squares, halved.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from chattune.data.encode import IGNORE_INDEX


def pack_bins(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Row indices grouped into bins of at most ``capacity`` tokens (best-fit decreasing).

    Rows are placed longest first, each into the fullest bin it still fits in;
    rows of equal length are taken in a seeded random order. Deterministic for a
    given ``seed``.
    """
    tiebreak = list(range(len(lengths)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tiebreak[i]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted
    for index in order:
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"pack_length: a row of {size} tokens does not fit in {capacity}")
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
    row a step every row is its own bin and step, as unpacked (one row has no padding)."""
    if max(lengths, default=0) > capacity:
        raise ValueError(f"pack_length: a row of {max(lengths)} tokens does not fit in {capacity}")
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


class PackedSteps(torch.utils.data.Dataset):
    """A map-style dataset whose item ``i`` is training step ``i``: ``{"bins": [[row, ...], ...]}``,
    each row a dict with ``input_ids`` and ``labels`` read from the encoded data set."""

    def __init__(self, rows, steps: list[list[list[int]]]):
        self.rows = rows
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> dict:
        step = self.steps[index]
        flat = [i for bin_rows in step for i in bin_rows]
        fetched = self.rows[flat]
        rows = iter([{"input_ids": ids, "labels": labels}
                     for ids, labels in zip(fetched["input_ids"], fetched["labels"], strict=True)])
        return {"bins": [[next(rows) for _ in bin_rows] for bin_rows in step]}


class PackCollator:
    """Packed batches: each bin's rows back to back, ``position_ids`` restarting at 0 per
    row, label -100 on every row's first token, no ``attention_mask``, ``use_cache=False``.

    Items are steps from :class:`PackedSteps` (``{"bins": ...}``) or single rows (each then
    its own bin: padding-free batches). Bins of one batch are right-padded to the longest,
    or to ``pad_to`` (static shapes, kinder to torch.compile and the CUDA allocator), with a
    separate pad segment (its own positions from 0, labels -100) that no row can attend to.
    ``flatten=True`` puts every bin of the batch into one sequence, as flash-attention's
    varlen path needs (it only reads packed ``position_ids`` at batch size 1).
    """

    def __init__(self, pad_token_id: int, flatten: bool = False, pad_to: int | None = None):
        self.pad_token_id = pad_token_id
        self.flatten = flatten
        self.pad_to = pad_to

    @staticmethod
    def _join(rows: list[dict]) -> tuple[list[int], list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for row in rows:
            ids += row["input_ids"]
            labels += [IGNORE_INDEX] + list(row["labels"][1:])
            positions += range(len(row["input_ids"]))
        return ids, labels, positions

    def __call__(self, items: list[dict]) -> dict:
        bins: list[list[dict]] = []
        for item in items:
            if "bins" in item:
                bins.extend(item["bins"])
            else:
                bins.append([item])
        if self.flatten:
            bins = [[row for bin_rows in bins for row in bin_rows]]
        sequences = [self._join(bin_rows) for bin_rows in bins]
        longest = max(len(ids) for ids, _, _ in sequences)
        if self.pad_to is not None and not self.flatten:
            longest = max(longest, self.pad_to)
        input_ids = torch.full((len(sequences), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(sequences), longest), dtype=torch.long)
        for i, (ids, row_labels, positions) in enumerate(sequences):
            n = len(ids)
            input_ids[i, :n] = torch.as_tensor(ids)
            labels[i, :n] = torch.as_tensor(row_labels)
            position_ids[i, :n] = torch.as_tensor(positions)
            position_ids[i, n:] = torch.arange(longest - n)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}


def uses_varlen_attention(model) -> bool:
    """True when the model attends with flash-attention (whose packed path needs ``flatten``)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or ""
    return "flash" in str(implementation)


@torch.no_grad()
def check_packed_attention(model, collator: PackCollator, vocab_size: int,
                           lengths: Sequence[Sequence[int]] = ((7, 5), (4, 9))) -> str | None:
    """Run the model on a probe of packed rows and on each row alone; None if every row's
    logits agree (rows kept apart), else what differed.

    Uses the given collator, so it checks the batch layout training will use. The model
    is put in eval mode for the probe (no dropout) and given back in its former mode.
    """
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    low = min(16, vocab_size - 1)
    bins = [[{"input_ids": torch.randint(low, vocab_size, (n,), generator=generator).tolist(),
              "labels": [IGNORE_INDEX] * n} for n in bin_lengths] for bin_lengths in lengths]
    batch = collator([{"bins": bins}])
    was_training = model.training
    model.eval()
    try:
        packed = model(**{k: v.to(parameter.device) if torch.is_tensor(v) else v
                          for k, v in batch.items() if k != "labels"}).logits.float()
        placements = []  # (sequence, offset, row) of every probe row in the packed batch
        offset = 0
        for sequence, bin_rows in enumerate(bins):
            offset = offset if collator.flatten else 0
            for row in bin_rows:
                placements.append((0 if collator.flatten else sequence, offset, row["input_ids"]))
                offset += len(row["input_ids"])
        worst, scale = 0.0, 1.0
        for sequence, start, ids in placements:
            alone = model(input_ids=torch.tensor([ids], device=parameter.device), use_cache=False).logits.float()[0]
            together = packed[sequence, start:start + len(ids)]
            worst = max(worst, (alone - together).abs().max().item())
            scale = max(scale, alone.abs().max().item())
    finally:
        model.train(was_training)
    tolerance = (1e-3 if parameter.dtype == torch.float32 else 3e-2) * scale
    if worst <= tolerance:
        return None
    return (f"packed rows' logits differ from the rows run one by one by up to {worst:.3g} "
            f"(tolerance {tolerance:.3g}): this model lets packed rows attend to each other")


VARLEN_SDPA = "chattune_sdpa_varlen"
_segment_cache: list = [None, None]  # (position_ids tensor, its segments): every layer sees the same tensor


def row_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """For each sequence of a batch, the (start, end) spans of its packed rows: a row starts
    wherever a position is not the previous one plus 1."""
    if _segment_cache[0] is position_ids:
        return _segment_cache[1]
    positions = position_ids.detach().to("cpu")
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    length = positions.shape[1]
    segments = []
    for row in starts.tolist():
        begin = [i for i, flag in enumerate(row) if flag]
        segments.append(list(zip(begin, begin[1:] + [length], strict=True)))
    _segment_cache[0], _segment_cache[1] = position_ids, segments
    return segments


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """transformers attention function: SDPA run causally on each packed row's own span (from
    ``position_ids``), so no token attends across rows and no masked-out pair is computed.
    Anything else (one row per sequence, a KV cache, sliding windows, compiling) goes to
    transformers' own SDPA with its mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    usable = (position_ids is not None and query.shape[2] > 1 and key.shape[2] == query.shape[2]
              and position_ids.shape[-1] == query.shape[2] and getattr(module, "is_causal", True)
              and not getattr(module, "sliding_window", None) and not torch.compiler.is_compiling())
    segments = row_segments(position_ids) if usable else None
    if segments is not None and len(segments) == 1 and query.shape[0] > 1:  # positions shared by the batch
        segments = segments * query.shape[0]
    if segments is None or all(len(spans) == 1 for spans in segments):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    dtype = query.dtype
    upcast = query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    if upcast:  # CPU flash attention's backward is about twice as slow in half precision
        query, key, value = query.float(), key.float(), value.float()
    outputs = []
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        # split, not slicing: the backward of split is one concatenation, that of a slice a
        # zero-filled tensor of the full size per slice
        for q, k, v, spans in zip(query.split(1), key.split(1), value.split(1), segments, strict=True):
            lengths = [e - s for s, e in spans]
            parts = [sdpa_attention_forward(module, q_row, k_row, v_row, None, dropout=dropout, scaling=scaling,
                                            is_causal=True)[0]
                     for q_row, k_row, v_row in zip(q.split(lengths, dim=2), k.split(lengths, dim=2),
                                                    v.split(lengths, dim=2), strict=True)]
            outputs.append(torch.cat(parts, dim=1))
    return torch.cat(outputs, dim=0).to(dtype), None


def use_varlen_sdpa(model) -> Callable[[], None] | None:
    """Switch a model that attends with SDPA to :func:`varlen_sdpa_attention`; return the
    function that switches it back (None, and nothing changed, for other attention)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    config._attn_implementation = VARLEN_SDPA

    def restore() -> None:
        config._attn_implementation = "sdpa"
        _segment_cache[0] = _segment_cache[1] = None

    return restore
