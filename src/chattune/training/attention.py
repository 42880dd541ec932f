"""Attention over packed rows: the probe that training relies on, and per-row SDPA.

Packed rows (see :class:`chattune.training.collate.PackCollator`) must not attend to each other.
transformers keeps them apart when there is no attention mask and no KV cache, but
silently lets them mix otherwise: :func:`check_packed_attention` runs the real model on a
probe and says whether it keeps rows apart, so that training never relies on it without
checking.

With SDPA, the packed mask makes every bin cost ``pack_length`` squared in attention
whatever its rows; :func:`use_varlen_sdpa` switches a model, for the time of a ``with``
block, to :func:`varlen_sdpa_attention`, which runs SDPA causally on each row's own span
instead (what flash-attention's varlen path does on CUDA), so attention costs the sum of
the rows' squares, halved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from chattune.data.encode import IGNORE_INDEX
from chattune.training.collate import PackCollator

VARLEN_SDPA = "chattune_sdpa_varlen"
_segment_cache: list = [None, None]  # (position_ids tensor, its segments): every layer sees the same tensor


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


@contextlib.contextmanager
def use_varlen_sdpa(model) -> Iterator[bool]:
    """Within the block, a model that attends with SDPA attends with
    :func:`varlen_sdpa_attention`; on leaving it, with SDPA again. Yields whether the model
    was switched (False, and nothing changed, for other attention).

    The function is registered under ``chattune_sdpa_varlen`` with transformers'
    ``AttentionInterface`` (its extension point, shared by every model; the entry stays):
    what is switched and switched back is the model config's attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    config._attn_implementation = VARLEN_SDPA
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
        _segment_cache[0] = _segment_cache[1] = None
