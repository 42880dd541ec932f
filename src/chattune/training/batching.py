"""Batching: how training and evaluation rows reach the model, step by step.

``packing`` chooses the mode: rows packed into ``pack_length`` bins without cross-talk
(``pack``, checked on the real model before training), padding-free batches
(``padding_free``), length-grouped batches (``group_by_length``) or plain padding
(``pad``). Whatever the mode, a step carries the tokens of
``per_device_train_batch_size`` rows on average, so steps, warm-up and the
learning-rate schedule mean the same thing with and without packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chattune.config import DataArgs, RunConfig
from chattune.data.prepare import PreparedData
from chattune.data.pretrain import pack_stream, stream_rows
from chattune.errors import ConfigError
from chattune.methods import get_method
from chattune.training.attention import check_packed_attention, uses_varlen_attention
from chattune.training.collate import FILLER, PackCollator, PackedSteps, PadCollator
from chattune.training.distributed import all_agree
from chattune.training.packing import plan_packing

PACKED_MODES = ("pack", "padding_free")
"""Modes whose batches hold several rows in one sequence (told apart by ``position_ids``)."""


@dataclass
class Batches:
    """How training and evaluation data reach the model."""

    mode: str
    train: object
    eval: object | None
    collator: object
    train_batch_size: int
    eval_batch_size: int
    summary: dict = field(default_factory=dict)
    world_size: int = 1

    def train_sampler(self, seed: int):
        """The training sampler when several processes train on packed steps (None: the
        Trainer's own): whole global steps shuffled, so that rank r keeps its planned share."""
        if self.mode != "pack" or self.world_size == 1:
            return None
        return GlobalStepSampler(len(self.train), self.world_size, seed)


class GlobalStepSampler(torch.utils.data.Sampler):
    """Items in groups of ``world_size`` (one global step: item ``k * world_size + r`` is rank
    ``r``'s share), the groups in a new seeded order every epoch, each group's items in rank
    order; accelerate then hands rank ``r`` every ``world_size``-th item from ``r`` on, i.e.
    exactly its planned share of each step. Deterministic per (seed, epoch): exact resume."""

    def __init__(self, items: int, world_size: int, seed: int):
        self.items, self.world_size, self.seed, self.epoch = items, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order (called by the Trainer at each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for group in torch.randperm(self.items // self.world_size, generator=generator).tolist():
            yield from range(group * self.world_size, (group + 1) * self.world_size)


class StreamedBlocks(torch.utils.data.IterableDataset):
    """Pre-training rows read lazily from ``train_files`` (:func:`chattune.data.pretrain.stream_rows`)
    and filled, in arrival order, into blocks of ``capacity`` tokens: one item per block, as
    :class:`PackCollator` reads steps (``{"bins": [rows]}``). Each iteration reads the files again."""

    def __init__(self, data: DataArgs, tokenizer, capacity: int):
        self.data, self.tokenizer, self.capacity = data, tokenizer, capacity

    def __iter__(self):
        for block in pack_stream(stream_rows(self.data, self.tokenizer), self.capacity):
            yield {"bins": [[{"input_ids": row, "labels": row} for row in block]]}


class StreamedRows(torch.utils.data.IterableDataset):
    """SFT rows read, converted and encoded lazily from ``train_files``
    (:class:`chattune.data.stream.ConversationStream`): one item per row, in file order, the
    files read again after each pass, endlessly (training stops at ``max_steps``). The Trainer
    skips the batches a checkpoint had trained on by reading them again, so a resumed run goes
    on with the rows the uninterrupted one would have seen, and the counts with it."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        return self.stream.rows()


def row_lengths(dataset) -> list[int]:
    """Tokens of every row of an encoded data set (read from Arrow, not row by row)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_pylist()


def resolve_packing(config: RunConfig, model, pad_token_id: int, vocab_size: int, log=print) -> str:
    """The batching mode to train with: ``auto`` becomes ``pack`` where the model keeps packed
    rows apart (checked on a probe), else ``group_by_length``; an explicit ``pack`` or
    ``padding_free`` the model cannot honour is an error."""
    wanted = config.data.packing
    if wanted in ("pad", "group_by_length"):
        return wanted
    reason = get_method(config.method.method).packing_refusal
    if reason is None:
        collator = PackCollator(pad_token_id, flatten=wanted == "padding_free" or uses_varlen_attention(model))
        reason = check_packed_attention(model, collator, vocab_size)
    if not all_agree(reason is None) and reason is None:  # every process must batch alike
        reason = "the probe failed on another process"
    if reason is None:
        return "pack" if wanted == "auto" else wanted
    if wanted == "auto":
        log(f"packing: not packing ({reason}); batching rows grouped by length instead")
        return "group_by_length"
    raise ConfigError(f"packing: {wanted} is not possible here: {reason}. Use packing=group_by_length or pad.")


def _filled(steps: list, multiple: int) -> list:
    """``steps`` and steps of one filler row up to a multiple of ``multiple`` (evaluation with
    several processes: each process then gets the same number of batches, and no eval row is
    evaluated twice, as accelerate would otherwise repeat rows to even them out)."""
    return steps + [[[FILLER]]] * (-len(steps) % multiple)


def _filled_rows(dataset, pad_token_id: int, multiple: int):
    """``dataset`` and filler rows (one pad token, no supervised token) up to a multiple of ``multiple``."""
    missing = -len(dataset) % multiple
    if not missing:
        return dataset
    from datasets import Dataset, concatenate_datasets

    columns = {"input_ids": [[pad_token_id]] * missing, "labels": [[-100]] * missing}
    if "images" in dataset.column_names:
        columns["images"] = [[] for _ in range(missing)]
    filler = Dataset.from_dict(columns, features=dataset.features)
    return concatenate_datasets([dataset, filler])


def build_batches(mode: str, prepared: PreparedData, config: RunConfig, pad_token_id: int,
                  flatten: bool, world_size: int = 1) -> Batches:
    """Datasets, collator and Trainer batch sizes for a batching mode.

    ``pack``: Trainer items are whole steps (bins grouped to carry the tokens of
    ``per_device_train_batch_size`` average rows; for stage pretrain, of that many full
    bins), so its batch size is 1.
    ``padding_free``: batches of rows, concatenated into one sequence.
    ``group_by_length`` / ``pad``: batches of rows padded to the longest (with an attention mask).

    With ``world_size`` processes, packed training steps are planned per rank
    (:func:`~chattune.training.packing.plan_packing`), and the eval set is completed with filler
    rows to a whole number of batches on every process. In the unpacked modes the Trainer's
    sampler shares the rows: rank r takes every ``world_size``-th batch, and accelerate
    completes an epoch's last, partial global batch with that epoch's first rows (a few rows
    are seen twice in that step; none is dropped).
    """
    t, d = config.train, config.data
    if isinstance(prepared.train, StreamedBlocks):
        if mode not in PACKED_MODES:
            raise ConfigError(f"streaming: streamed text is packed into blocks, and packing is not possible here "
                              f"(packing={mode}); set streaming=false")
        collator = PackCollator(pad_token_id, flatten, pad_to=None if flatten else prepared.train.capacity)
        summary = {"mode": "stream", "block_length": prepared.train.capacity,
                   "blocks_per_step": t.per_device_train_batch_size}
        return Batches("stream", prepared.train, prepared.eval, collator, t.per_device_train_batch_size,
                       t.per_device_eval_batch_size, summary, world_size)
    if isinstance(prepared.train, StreamedRows):
        return _streamed_rows(mode, prepared, config, pad_token_id, world_size)
    pretrain = config.preference.stage == "pretrain"  # a step is per_device_train_batch_size full blocks
    if mode == "pack":
        capacity = d.pack_length or d.max_seq_length
        train_plan = plan_packing(row_lengths(prepared.train), capacity, t.per_device_train_batch_size, t.seed,
                                  world_size=world_size,
                                  bins_per_step=t.per_device_train_batch_size if pretrain else None)
        train = PackedSteps(prepared.train, train_plan.steps, pad_token_id)
        summary = {"mode": mode, "train": train_plan.summary()}
        evaluation = None
        if prepared.eval is not None:
            eval_plan = plan_packing(row_lengths(prepared.eval), capacity, t.per_device_eval_batch_size,
                                     t.seed, shuffle=False,
                                     bins_per_step=t.per_device_eval_batch_size if pretrain else None)
            evaluation = PackedSteps(prepared.eval, _filled(eval_plan.steps, world_size), pad_token_id)
            summary["eval"] = eval_plan.summary()
        collator = PackCollator(pad_token_id, flatten, pad_to=train_plan.pad_to)
        return Batches(mode, train, evaluation, collator, 1, 1, summary, world_size)
    train, evaluation = prepared.train, prepared.eval
    if evaluation is not None and world_size > 1:
        evaluation = _filled_rows(evaluation, pad_token_id, world_size * t.per_device_eval_batch_size)
    if mode == "padding_free":
        collator = PackCollator(pad_token_id, flatten=True)
    else:
        collator = PadCollator(pad_token_id)
    if mode == "group_by_length":
        train = train.add_column("length", row_lengths(train))
    return Batches(mode, train, evaluation, collator, t.per_device_train_batch_size,
                   t.per_device_eval_batch_size,
                   {"mode": mode, **({"world_size": world_size} if world_size > 1 else {})}, world_size)


def _streamed_rows(mode: str, prepared: PreparedData, config: RunConfig, pad_token_id: int,
                   world_size: int) -> Batches:
    """Batches of streamed SFT rows, padded to the longest (``per_device_train_batch_size`` rows a
    batch, in the order read); the eval set as in ``pad`` mode."""
    t = config.train
    if mode in PACKED_MODES:
        raise ConfigError(f"packing: {mode} needs every row's length ahead, and streamed rows are read as "
                          "training goes; use packing=pad or auto, or set streaming=false")
    evaluation = prepared.eval
    if evaluation is not None and world_size > 1:
        evaluation = _filled_rows(evaluation, pad_token_id, world_size * t.per_device_eval_batch_size)
    summary = {"mode": "stream", "rows": "padded", "rows_per_batch": t.per_device_train_batch_size,
               **({"world_size": world_size} if world_size > 1 else {})}
    return Batches("stream", prepared.train, evaluation, PadCollator(pad_token_id), t.per_device_train_batch_size,
                   t.per_device_eval_batch_size, summary, world_size)


def stream_batching(config: RunConfig, log=print) -> str:
    """The batching mode of streamed SFT rows: ``auto`` and ``group_by_length`` become ``pad``
    (said in the log: the rows' lengths are not known ahead, so they are neither packed nor
    grouped by length); ``pack`` and ``padding_free`` stay, for :func:`build_batches` to refuse."""
    wanted = config.data.packing
    if wanted in ("auto", "group_by_length"):
        log(f"packing: {wanted} -> pad (streamed rows are read as training goes: padded in the order read, "
            "neither packed nor grouped by length)")
        return "pad"
    return wanted


def format_batches(batches: Batches) -> str:
    """One line on how the data is batched (for the log)."""
    if batches.mode == "stream" and batches.summary.get("rows") == "padded":
        return (f"batching: streamed rows, {batches.summary['rows_per_batch']} a batch in the order read, "
                "padded to the longest" + (f" on {batches.world_size} processes" if batches.world_size > 1 else ""))
    if batches.mode == "stream":
        return (f"batching: streamed, documents filled in order into blocks of {batches.summary['block_length']} "
                f"tokens (no attention across documents), {batches.summary['blocks_per_step']} blocks a step")
    if batches.mode != "pack":
        return f"batching: {batches.mode}" + (f" on {batches.world_size} processes" if batches.world_size > 1 else "")
    p = batches.summary["train"]
    size = f"{p['bin_length']}" + (f" (a step's budget; pack_length {p['pack_length']})"
                                  if p["bin_length"] < p["pack_length"] else "")
    line = (f"packing: {p['rows']} rows into {p['bins']} bins of {size} tokens "
            f"({p['fill']:.1%} full); {p['steps']} steps of {p['rows_per_step']} rows "
            f"({p['bins_per_step'][0]}-{p['bins_per_step'][1]} bins) per epoch and device, "
            f"as {p['rows_per_step_unpacked']} rows a step unpacked")
    if "rank_imbalance" in p:
        line += (f"; {p['world_size']} processes, each step's tokens dealt out to them: the busiest carries "
                 f"{p['rank_imbalance']['mean']:.1%} more than the mean (worst step {p['rank_imbalance']['max']:.1%})")
    if abs(p["rows_per_step"] - p["rows_per_step_unpacked"]) > 0.25 * p["rows_per_step_unpacked"]:
        line += ("; steps hold a different number of rows than unpacked ones would, as some rows are "
                 "much longer than a step's budget: raise per_device_train_batch_size or use packing=pad")
    return line
