"""The batching engine: one worker thread owns the model and decodes every request together.

Iteration-level scheduling: each step the worker admits waiting requests
(prefilled together, left-padded, into their own KV cache that is then merged
into the running batch) and runs one decode step for all running requests.
Each request leaves the batch the step it ends (end token, stop string,
``max_tokens``, or its client gone), so a short request never waits for a long
one and a new one starts at the next step.

The running batch is one left-padded KV cache: ``mask`` marks the real
positions of each row and each row's positions are passed explicitly, so a
row's keys and values are exactly those it would have alone. Rows may use
different LoRA adapters: peft's ``adapter_names`` picks one per row
(``__base__`` for none); a batch of one adapter just makes it the active one.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chattune.serve.text import TextStream

BASE_ADAPTER = "__base__"
log = logging.getLogger("chattune.serve")


class QueueFull(RuntimeError):
    """The engine holds as many requests as it may; the caller should retry later."""


@dataclass
class SamplingParams:
    """How one request is decoded. ``temperature`` 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    ignore_eos: bool = False


@dataclass
class Event:
    """What the engine reports for a request: ``text`` (a delta), ``done`` or ``error``."""

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


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """The next token of each row: greedy where temperature is 0, else temperature + top-p
    sampling with the row's own generator; repetition penalty first, as transformers does."""
    logits = logits.float()
    for i, seq in enumerate(seqs):
        penalty = seq.params.repetition_penalty
        if penalty != 1.0:
            seen = torch.as_tensor(seq.prompt_ids + seq.generated, device=logits.device)
            score = logits[i].gather(0, seen)
            logits[i] = logits[i].scatter(0, seen, torch.where(score < 0, score * penalty, score / penalty))
    tokens = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        if seq.params.temperature > 0:
            tokens[i] = _sample_row(logits[i], seq.params.temperature, seq.params.top_p, seq.generator)
    return tokens


def _sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    scores = logits / temperature
    if top_p < 1.0:
        sorted_scores, order = scores.sort()
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), ``[batch, heads, length, dim]``, of a full-attention DynamicCache."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        raise RuntimeError(f"the batching engine needs a full-attention DynamicCache, got {type(cache).__name__}")
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


class Engine:
    """Owns the model in one worker thread; requests are submitted as :class:`Sequence` objects.

    At most ``max_batch`` requests decode together and ``max_waiting`` more may
    wait; past that :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, model, *, pad_token_id: int, max_batch: int = 16, max_waiting: int = 64,
                 use_adapters: bool = False):
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.use_adapters = use_adapters
        self.device = next(model.parameters()).device
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(inner.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params
        config = getattr(model, "active_peft_config", None)
        # P-Tuning v2: every row's cache starts with the prefix keys/values, positions after them
        self.prefix = config.num_virtual_tokens if getattr(config, "peft_type", None) == "PREFIX_TUNING" else 0
        self._forward_model = inner if self.prefix else model
        self.observer: Callable[[Sequence, list[int]], None] | None = None
        self.counters = {"steps": 0, "peak_batch": 0, "completed": 0, "cancelled": 0, "tokens": 0}
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._admitting = 0
        self._rows: list[Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._active: str | None = None

    # -- the request side (any thread) ------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="chattune-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still held end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, *seqs: Sequence) -> None:
        """Queue requests (all or none); they join the batch at the next step."""
        with self._cond:
            if self._stopping or self._thread is None:
                raise QueueFull("the engine is not running")
            held = len(self._rows) + self._admitting + len(self._waiting)
            if held + len(seqs) > self.max_batch + self.max_waiting:
                raise QueueFull(f"{len(self._rows) + self._admitting} requests running and "
                                f"{len(self._waiting)} waiting, the most this server holds")
            self._waiting.extend(seqs)
            self._cond.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """Drop a request (its client is gone): at once if waiting, else at the next step."""
        with self._cond:
            if seq.finished:
                return
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                seq.finished = True
                self.counters["cancelled"] += 1

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        """Running and waiting requests, limits and counters."""
        with self._cond:
            return {"running": len(self._rows) + self._admitting, "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_waiting": self.max_waiting, **self.counters}

    # -- the worker ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    break
                joining = []
                while self._waiting and len(self._rows) + len(joining) < self.max_batch:
                    joining.append(self._waiting.popleft())
                self._admitting = len(joining)
            try:
                with torch.no_grad():
                    self._retire()
                    if joining:
                        self._prefill(joining)
                    if self._rows:
                        self._decode()
            except Exception as exc:  # a failed step fails its requests, not the server
                log.exception("generation step failed")
                self._fail([*self._rows, *joining], f"generation failed: {exc}")
            finally:
                with self._cond:
                    self._admitting = 0
        with self._cond:
            left = [*self._rows, *self._waiting]
            self._waiting.clear()
        self._fail(left, "the server is shutting down")

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            if not seq.finished:
                seq.finished = True
                seq.emit(Event("error", text=message))
        self._rows, self._cache, self._mask = [], None, None

    def _forward(self, ids, mask, positions, cache, seqs):
        kwargs = {self._cache_arg: cache, "use_cache": True}
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

    def _prefill(self, seqs: list[Sequence]) -> None:
        seqs = [seq for seq in seqs if not seq.cancelled]
        if not seqs:
            return
        longest = max(len(seq.prompt_ids) for seq in seqs)
        ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            ids[i, longest - n:] = torch.as_tensor(seq.prompt_ids)
            mask[i, longest - n:] = 1
            seq.length = n
            seed = seq.params.seed if seq.params.seed is not None else random.getrandbits(63)
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
            if self.observer:
                self.observer(seq, ids[i, longest - n:].tolist())
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0) + self.prefix
        from transformers import DynamicCache

        cache = DynamicCache()
        if self.prefix:
            cache = self.model.get_prompt(len(seqs), max_cache_len=self.prefix + longest)
            mask = torch.cat([mask.new_ones((len(seqs), self.prefix)), mask], 1)
        logits, cache = self._forward(ids, mask, positions, cache, seqs)
        with self._cond:  # from waiting to running in one move, as submit() counts them
            self._join(cache_tensors(cache), mask, seqs)
            self._admitting = 0
        for seq, token in zip(seqs, sample(logits, seqs), strict=True):
            self._accept(seq, token)
        self._retire()

    def _join(self, tensors, mask: torch.Tensor, seqs: list[Sequence]) -> None:
        if not self._rows:
            self._cache, self._mask, self._rows = make_cache(tensors), mask, list(seqs)
            return
        width = max(mask.shape[1], self._mask.shape[1])
        old, old_mask = _left_pad(cache_tensors(self._cache), self._mask, width - self._mask.shape[1])
        new, new_mask = _left_pad(tensors, mask, width - mask.shape[1])
        merged = [(torch.cat([ok, nk]), torch.cat([ov, nv])) for (ok, ov), (nk, nv) in zip(old, new, strict=True)]
        self._cache, self._mask = make_cache(merged), torch.cat([old_mask, new_mask])
        self._rows = self._rows + list(seqs)

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.as_tensor([[seq.next_token] for seq in rows], device=self.device)
        positions = torch.as_tensor([[seq.length + self.prefix] for seq in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], 1)
        logits, self._cache = self._forward(ids, mask, positions, self._cache, rows)
        self._mask = mask
        self.counters["steps"] += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(rows))
        for seq, token in zip(rows, sample(logits, rows), strict=True):
            seq.length += 1
            self._accept(seq, token)
        self._retire()

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

    def _retire(self) -> None:
        """Drop finished and cancelled rows from the batch, and cache columns no row uses."""
        rows = self._rows
        keep = [i for i, seq in enumerate(rows) if not seq.finished and not seq.cancelled]
        if len(keep) == len(rows):
            return
        for seq in rows:
            if seq.cancelled and not seq.finished:
                seq.finished = True
                self.counters["cancelled"] += 1
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.as_tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(0).int().argmax())
        tensors = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                   for k, v in cache_tensors(self._cache)]
        self._cache, self._mask = make_cache(tensors), mask[:, first:]
        self._rows = [rows[i] for i in keep]
