"""The decoder: a batch of requests, one KV cache, one step at a time.

Every generation in chattune goes through :class:`Decoder`: a batch decoded to its end
(``predict``, ``eval``, the demo, generation metrics during training, the export
check) goes through :func:`decode_batch` (:func:`decode_steps` when streamed, as
``chattune chat``), and the server's engine drives the decoder from its worker
thread, admitting requests between steps. So a request gets the
same tokens in a batch of one, in a batch of many, in the terminal and over HTTP.

The running batch is one left-padded KV cache: ``mask`` marks the real positions
of each row and each row's positions are passed explicitly, so a row's keys and
values are exactly those it would have alone. Requests join a running batch
(prefilled together into their own cache, then merged) and leave it the step they
end (end token, stop string, ``max_tokens``, or cancelled). Rows may use different
LoRA adapters: peft's ``adapter_names`` picks one per row (``__base__`` for none);
a batch of one adapter just makes it the active one. A P-Tuning v2 prefix seeds
every row's cache with its keys and values, positions continuing after it, as in
training.

A failure in one row's own work (its generator's seed, sampling its token, decoding
its text) ends that row alone with an ``error`` event (and its ``error`` set); only a
failure of the shared forward pass, which cannot be laid at one row's door, fails the
whole batch. A row never samples an id in its ``banned_ids`` (the ids its tokenizer
cannot decode, :mod:`chattune.inference.vocabulary`): their logits are set to -inf first.

Caches that are not plain per-layer key/value tensors (a model's own cache classes,
remote code) still decode: requests then join only an empty batch and finished rows
stay in it, ignored, until the batch ends.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from chattune.inference.sampling import SamplingParams, sample
from chattune.inference.textstream import TextStream

BASE_ADAPTER = "__base__"


@dataclass
class Event:
    """What decoding reports for a request: ``text`` (a delta), ``done`` or ``error``."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Sequence:
    """One request being generated: prompt, settings, progress, and where its events go."""

    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    emit: Callable[[Event], None]
    adapter: str = BASE_ADAPTER
    stop_token_ids: frozenset[int] = frozenset()
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    length: int = 0
    next_token: int | None = None
    generator: torch.Generator | None = None
    anchors: tuple[int, int] | None = None  # ChatGLM-6B: its [gMASK] position and context length
    banned_ids: torch.Tensor | None = None
    """Ids never to sample (the ones the tokenizer cannot decode)."""
    error: str | None = None
    """Why the request failed, when it did (it then ended with an ``error`` event)."""
    images: list = field(default_factory=list)
    """The prompt's images (Pillow), in the order of their tokens (vision-language models)."""
    image_inputs: Callable[[list], dict] | None = None
    """The model's processor turning a batch's images into its pixel inputs."""

    def fail(self, message: str) -> bool:
        """End the request with an ``error`` event saying ``message``; False when it had ended already."""
        if self.finished:
            return False
        self.finished = True
        self.error = message
        self.emit(Event("error", text=message))
        return True


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each layer's (keys, values), ``[batch, heads, length, dim]``, of a full-attention
    DynamicCache; None for any other cache (it cannot be merged or trimmed row by row)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def make_cache(tensors: list[tuple[torch.Tensor, torch.Tensor]]):
    """A DynamicCache holding these (keys, values) per layer."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=tensors)


def _left_pad(tensors, mask: torch.Tensor, width: int):
    if width == 0:
        return tensors, mask
    pad = torch.nn.functional.pad
    return [(pad(k, (0, 0, width, 0)), pad(v, (0, 0, width, 0))) for k, v in tensors], pad(mask, (width, 0))


def prefix_length(model) -> int:
    """Virtual tokens of a P-Tuning v2 prefix on a peft model (0 for anything else)."""
    config = getattr(model, "active_peft_config", None)
    return config.num_virtual_tokens if getattr(config, "peft_type", None) == "PREFIX_TUNING" else 0


class Decoder:
    """A batch of :class:`Sequence` rows over one model and one KV cache.

    :meth:`prefill` admits rows, :meth:`step` decodes one token for every running row
    (and retires those that ended). Not thread-safe: one thread drives it.
    """

    def __init__(self, model, *, pad_token_id: int, use_adapters: bool = False):
        self.model = model
        self.pad_token_id = pad_token_id
        self.use_adapters = use_adapters
        self.device = next(model.parameters()).device
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(inner.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params
        self.prefix = prefix_length(model)
        self._forward_model = inner if self.prefix else model
        self._config = getattr(inner, "config", None)
        self._two_d = bool(getattr(self._config, "position_encoding_2d", False))
        self.rows: list[Sequence] = []
        self.counters = {"steps": 0, "peak_batch": 0, "completed": 0, "cancelled": 0, "failed": 0, "tokens": 0}
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._mergeable = True
        self._active: str | None = None

    @property
    def running(self) -> int:
        """Rows still generating."""
        return sum(not seq.finished for seq in self.rows)

    @property
    def can_join(self) -> bool:
        """Whether new rows may join now (always, unless the cache cannot be merged and rows run)."""
        return self._mergeable or not self.rows

    def clear(self) -> None:
        """Forget every row and the cache."""
        self.rows, self._cache, self._mask = [], None, None

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence], joining: Callable[[], AbstractContextManager] = nullcontext) -> None:
        """Run the prompts of ``seqs`` (left-padded together), add them to the batch and pick
        each one's first token. The rows join the batch inside ``joining()`` (the engine's
        lock, so that a request counts as either admitting or running, never both)."""
        for seq in seqs:
            if seq.cancelled and not seq.finished:
                seq.finished = True
                self.counters["cancelled"] += 1
        for seq in seqs:
            if not seq.finished:
                try:
                    seed = seq.params.seed if seq.params.seed is not None else random.getrandbits(63)
                    seq.generator = torch.Generator(device=self.device).manual_seed(seed)
                except Exception as exc:  # (a seed out of the generator's range) this row alone
                    self.fail_row(seq, f"seed {seq.params.seed}: {exc}")
        seqs = [seq for seq in seqs if not seq.finished]
        if not seqs:
            return
        shared = self._shared_prompts(seqs)
        if shared is not None:
            return self._prefill_shared(seqs, *shared, joining)
        for seq in seqs:
            seq.length = len(seq.prompt_ids)
        ids, mask, positions = self._left_padded(seqs)
        longest = ids.shape[1]
        if self._two_d:
            positions = self._two_d_prefill(ids, mask, positions, seqs)
        else:
            positions = positions + self.prefix
        from transformers import DynamicCache

        cache = DynamicCache()
        if self.prefix:
            cache = self.model.get_prompt(len(seqs), max_cache_len=self.prefix + longest)
            mask = torch.cat([mask.new_ones((len(seqs), self.prefix)), mask], 1)
        logits, cache = self._forward(ids, mask, positions, cache, seqs, image_inputs(seqs, self.device))
        for seq in seqs:
            seq.images = []  # read once, at the prefill: let them go
        with joining():
            self._join(cache, mask, seqs)
        self._pick(logits, seqs)

    def _left_padded(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts of ``seqs`` left-padded together on the device: ids, mask, positions."""
        longest = max(len(seq.prompt_ids) for seq in seqs)
        ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            ids[i, longest - n:] = torch.as_tensor(seq.prompt_ids)
            mask[i, longest - n:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)

    def _shared_prompts(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor] | None:
        """Where rows repeat a prompt (the same ids and adapter: a group of samples of one prompt),
        the rows to run once and, for every row, the one whose keys and values it takes; None when
        every prompt differs, or the cache cannot be split row by row (a P-Tuning v2 prefix,
        ChatGLM-6B's 2D positions, images)."""
        keys = [(tuple(seq.prompt_ids), seq.adapter) for seq in seqs]
        if len(set(keys)) == len(keys) or self.prefix or self._two_d or any(seq.images for seq in seqs):
            return None
        first: dict = {}
        for key in keys:
            first.setdefault(key, len(first))
        unique = [seqs[keys.index(key)] for key in first]
        return unique, torch.as_tensor([first[key] for key in keys], device=self.device)

    def _prefill_shared(self, seqs: list[Sequence], unique: list[Sequence], owner: torch.Tensor,
                        joining: Callable[[], AbstractContextManager]) -> None:
        """Prefill each distinct prompt once and give every row its prompt's keys, values and
        last logits (the same numbers as a prefill of every row: the rows are independent)."""
        for seq in seqs:
            seq.length = len(seq.prompt_ids)
        ids, mask, positions = self._left_padded(unique)
        from transformers import DynamicCache

        logits, cache = self._forward(ids, mask, positions, DynamicCache(), unique)
        tensors = cache_tensors(cache)
        if tensors is None:  # a model's own cache: rows cannot be copied out of it; run every row
            logits, cache = self._forward(ids.index_select(0, owner), mask.index_select(0, owner),
                                          positions.index_select(0, owner), DynamicCache(), seqs)
        else:
            cache = make_cache([(k.index_select(0, owner), v.index_select(0, owner)) for k, v in tensors])
            logits = logits.index_select(0, owner)
        with joining():
            self._join(cache, mask.index_select(0, owner), seqs)
        self._pick(logits, seqs)

    @torch.no_grad()
    def step(self) -> None:
        """One decode step for every running row."""
        rows = self.rows
        ids = torch.as_tensor([[seq.next_token if seq.next_token is not None else self.pad_token_id]
                               for seq in rows], device=self.device)
        if self._two_d:
            positions = self._two_d_step(rows)
        else:
            positions = torch.as_tensor([[seq.length + self.prefix] for seq in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], 1)
        logits, self._cache = self._forward(ids, mask, positions, self._cache, rows)
        self._mask = mask
        self.counters["steps"] += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], self.running)
        for seq in rows:
            if not seq.finished:  # (an opaque cache keeps ended rows, ignored, until the batch ends)
                seq.length += 1
        self._pick(logits, rows)

    def retire(self) -> None:
        """Drop finished and cancelled rows from the batch, and cache columns no row uses."""
        rows = self.rows
        for seq in rows:
            if seq.cancelled and not seq.finished:
                seq.finished = True
                self.counters["cancelled"] += 1
        keep = [i for i, seq in enumerate(rows) if not seq.finished]
        if not keep:
            self.clear()
            return
        tensors = cache_tensors(self._cache)
        if len(keep) == len(rows) or tensors is None:  # an opaque cache keeps ended rows, ignored
            return
        index = torch.as_tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(0).int().argmax())
        tensors = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                   for k, v in tensors]
        self._cache, self._mask = make_cache(tensors), mask[:, first:]
        self.rows = [rows[i] for i in keep]

    def _two_d_prefill(self, ids, mask, positions, seqs):
        """ChatGLM-6B's 2D positions for the prompts; each row keeps its anchors for the steps.
        (A P-Tuning v2 prefix does not shift them, as in THUDM's P-Tuning v2.)"""
        from chattune.chatglm.glm6b import context_anchors, two_d_positions

        mask_position, context = context_anchors(ids, mask.bool(), self._config)
        for seq, anchor, length in zip(seqs, mask_position.tolist(), context.tolist(), strict=True):
            seq.anchors = (anchor, length)
        return two_d_positions(positions, mask_position, context)

    def _two_d_step(self, rows):
        from chattune.chatglm.glm6b import two_d_positions

        anchors = torch.as_tensor([seq.anchors or (0, 0) for seq in rows], device=self.device)
        lengths = torch.as_tensor([[seq.length] for seq in rows], device=self.device)
        return two_d_positions(lengths, anchors[:, 0], anchors[:, 1])

    def _forward(self, ids, mask, positions, cache, seqs, images: dict | None = None):
        kwargs = {self._cache_arg: cache, "use_cache": True, **(images or {})}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        kwargs.update(self._adapter_kwargs(seqs))
        out = self._forward_model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        new_cache = getattr(out, "cache", None)
        return out.logits[:, -1, :], (new_cache if new_cache is not None else out.past_key_values)

    def _adapter_kwargs(self, seqs: list[Sequence]) -> dict:
        """One adapter for every row: make it the active one (cheaper); else name each row's."""
        if not self.use_adapters:
            return {}
        names = {seq.adapter for seq in seqs}
        if len(names) == 1 and BASE_ADAPTER not in names:
            name = names.pop()
            if self._active != name:
                self.model.set_adapter(name)
                self._active = name
            return {}
        return {"adapter_names": [seq.adapter for seq in seqs]}

    def _join(self, cache, mask: torch.Tensor, seqs: list[Sequence]) -> None:
        if not self.rows:
            self._cache, self._mask, self.rows = cache, mask, list(seqs)
            self._mergeable = cache_tensors(cache) is not None
            return
        old_tensors, new_tensors = cache_tensors(self._cache), cache_tensors(cache)
        if old_tensors is None or new_tensors is None:
            raise RuntimeError("rows can join a running batch only with a full-attention DynamicCache")
        width = max(mask.shape[1], self._mask.shape[1])
        old, old_mask = _left_pad(old_tensors, self._mask, width - self._mask.shape[1])
        new, new_mask = _left_pad(new_tensors, mask, width - mask.shape[1])
        merged = [(torch.cat([ok, nk]), torch.cat([ov, nv])) for (ok, ov), (nk, nv) in zip(old, new, strict=True)]
        self._cache, self._mask = make_cache(merged), torch.cat([old_mask, new_mask])
        self.rows = self.rows + list(seqs)

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        live = [(i, seq) for i, seq in enumerate(seqs) if not seq.finished]
        if not live:
            return
        rows = [(seq.params, seq.prompt_ids + seq.generated if seq.params.repetition_penalty != 1.0 else [],
                 seq.generator) for _, seq in live]
        picked = logits if len(live) == len(seqs) else logits[[i for i, _ in live]]
        ban(picked, [seq for _, seq in live])
        tokens = sample(picked, rows, on_error=lambda i, exc: self.fail_row(live[i][1], f"sampling failed: {exc}"))
        for (_, seq), token in zip(live, tokens, strict=True):
            if token is None:
                continue
            try:
                self._accept(seq, token)
            except Exception as exc:  # (decoding its text) this row alone
                self.fail_row(seq, f"decoding the answer failed: {exc}")

    def fail_row(self, seq: Sequence, message: str) -> None:
        """End one row with an ``error`` event; the rest of the batch goes on (it leaves at :meth:`retire`)."""
        if seq.fail(message):
            self.counters["failed"] += 1

    def _accept(self, seq: Sequence, token: int) -> None:
        """Record a sampled token; send the text it makes safe; end the request when due."""
        seq.generated.append(token)
        self.counters["tokens"] += 1
        if token in seq.stop_token_ids and not seq.params.ignore_eos:
            delta, reason = seq.text.finish(seq.generated[:-1]), "stop"
        else:
            delta = seq.text.update(seq.generated)
            if seq.text.stopped:
                reason = "stop"
            elif len(seq.generated) >= seq.params.max_tokens:
                delta, reason = delta + seq.text.finish(seq.generated), "length"
            else:
                seq.next_token = token
                if delta:
                    seq.emit(Event("text", text=delta))
                return
        if delta:
            seq.emit(Event("text", text=delta))
        seq.finished = True
        self.counters["completed"] += 1
        seq.emit(Event("done", finish_reason=reason, prompt_tokens=len(seq.prompt_ids),
                       completion_tokens=len(seq.generated)))


def image_inputs(seqs: list[Sequence], device) -> dict:
    """The pixel inputs of the rows' images, in row order (their tokens' order in the batch):
    empty when no row has an image."""
    images = [image for seq in seqs for image in seq.images]
    if not images:
        return {}
    make = next(seq.image_inputs for seq in seqs if seq.images)
    return {key: value.to(device) for key, value in make(images).items()}


def ban(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Set each row's banned ids to -inf in ``logits`` (``[rows, vocabulary]``, one row per
    sequence), in place: no sampler can pick them."""
    for row, seq in enumerate(seqs):
        if seq.banned_ids is not None:
            logits[row].index_fill_(0, seq.banned_ids.to(logits.device), float("-inf"))


def run_to_end(decoder: Decoder, seqs: list[Sequence]) -> Iterator[None]:
    """Decode ``seqs`` together until every one has ended, yielding after the prefill and
    after each step (each sequence's events go where its ``emit`` sends them)."""
    decoder.prefill(seqs)
    decoder.retire()
    yield
    while decoder.rows:
        decoder.step()
        decoder.retire()
        yield


def decode_steps(model, seqs: list[Sequence], *, pad_token_id: int, use_adapters: bool = False) -> Iterator[None]:
    """Decode ``seqs`` together on ``model`` until each has ended, yielding after the prefill and
    after each step (for a caller that streams what the sequences' ``emit`` received)."""
    if seqs:
        yield from run_to_end(Decoder(model, pad_token_id=pad_token_id, use_adapters=use_adapters), seqs)


def decode_batch(model, seqs: list[Sequence], *, pad_token_id: int, use_adapters: bool = False) -> list[Sequence]:
    """The one way a batch is decoded to its end: ``seqs`` together on ``model`` (rows padded
    with ``pad_token_id``; ``use_adapters``: each row's peft adapter) until every one has ended.
    Returns ``seqs``, finished (``.generated`` the token ids, ``.text.text`` the answer)."""
    for _ in decode_steps(model, seqs, pad_token_id=pad_token_id, use_adapters=use_adapters):
        pass
    return seqs
