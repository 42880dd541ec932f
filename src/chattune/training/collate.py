"""Collators: encoded rows (or packed steps) into the tensors of one batch.

- :class:`PadCollator`: rows padded to the longest, with an attention mask;
- :class:`ImageCollator`: the same, plus the pixels of the rows' images (vision-language models);
- :class:`PackCollator`: packed bins, each row's positions from 0, no attention mask
  (transformers then keeps the rows apart; :mod:`chattune.training.attention` checks that it does);
- :class:`PackedSteps`: the data set whose item ``i`` is the bins of training step ``i``,
  as :class:`PackCollator` reads them (the plan comes from :mod:`chattune.training.packing`).
"""

from __future__ import annotations

import torch

from chattune.data.encode import IGNORE_INDEX
from chattune.errors import DataError
from chattune.vision.images import ImageError, load_image


class PadCollator:
    """Pads a batch to its longest row: pad id on inputs, -100 on labels, 0 on the mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """One padded batch of ``rows``."""
        longest = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class ImageCollator:
    """A :class:`PadCollator` batch plus its rows' images (their ``images`` column), in order,
    as the vision-language model's processor makes them (``pixel_values`` and the like).

    Raises DataError when an image can no longer be read, or when its size changed since the
    data was encoded (its image tokens would no longer match it)."""

    def __init__(self, pad_token_id: int, vision):
        self.pad = PadCollator(pad_token_id)
        self.vision = vision

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """One padded batch of ``rows`` with the pixels of their images."""
        batch = self.pad(rows)
        refs = [ref for row in rows for ref in (row.get("images") or [])]
        if not refs:
            return batch
        try:
            images = [load_image(ref, "training data") for ref in refs]
        except ImageError as exc:
            raise DataError(f"{exc}; it was readable when the data was encoded") from exc
        token = self.vision.image_token_id
        expected = sum(self.vision.expansion(image).count(token) for image in images)
        if int((batch["input_ids"] == token).sum()) != expected:
            raise DataError(f"images {refs}: their image tokens differ from those encoded (an image changed "
                            "size since the data was prepared); encode the data again (chattune data prepare CONFIG --force)")
        batch.update(self.vision.pixels(images))
        return batch


FILLER = -1
"""Row index of a filler row: one pad token, no supervised token (it adds nothing to a loss)."""


class PackedSteps(torch.utils.data.Dataset):
    """A map-style dataset whose item ``i`` is training step ``i``: ``{"bins": [[row, ...], ...]}``,
    each row a dict with ``input_ids`` and ``labels`` read from the encoded data set (index
    :data:`FILLER`: a row of one ``pad_token_id`` whose label is ignored)."""

    def __init__(self, rows, steps: list[list[list[int]]], pad_token_id: int = 0):
        self.rows = rows
        self.steps = steps
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> dict:
        """The rows of step ``index``, bin by bin."""
        step = self.steps[index]
        flat = [i for bin_rows in step for i in bin_rows if i != FILLER]
        fetched = self.rows[flat] if flat else {"input_ids": [], "labels": []}
        rows = iter([{"input_ids": ids, "labels": labels}
                     for ids, labels in zip(fetched["input_ids"], fetched["labels"], strict=True)])
        filler = {"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX]}
        return {"bins": [[filler if i == FILLER else next(rows) for i in bin_rows] for bin_rows in step]}


class PackCollator:
    """Packed batches: each bin's rows back to back, ``position_ids`` restarting at 0 per
    row, label -100 on every row's first token, no ``attention_mask``, ``use_cache=False``.

    Items are steps from :class:`PackedSteps` (``{"bins": ...}``) or single rows (each then
    its own bin: padding-free batches). Bins of one batch are right-padded to the longest,
    or to ``pad_to`` (static shapes, kinder to torch.compile and the CUDA allocator), with a
    separate pad segment (its own positions from 0, labels -100) that no row can attend to.
    ``flatten=True`` puts every bin of the batch into one sequence, as flash-attention's
    varlen path needs (it only reads packed ``position_ids`` at batch size 1).

    Without an attention mask and with ``use_cache`` False, transformers builds the packed
    (block-diagonal causal) mask from ``position_ids`` for SDPA and eager attention, and
    flash-attention takes its varlen path. With a KV cache, or with an attention mask,
    transformers silently lets packed rows attend to each other:
    :func:`chattune.training.attention.check_packed_attention` runs the real model on a probe.
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
        """One packed batch of ``items`` (steps or rows)."""
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
