"""The batching engine: one worker thread owns the model and decodes every request together.

Iteration-level scheduling: each step the worker admits waiting requests (prefilled
together and merged into the running batch) and runs one decode step for all running
requests, through :class:`chattune.inference.decoding.Decoder`, the decoder ``chat`` and
``predict`` use too. Each request leaves the batch the step it ends (end token,
stop string, ``max_tokens``, or its client gone), so a short request never waits
for a long one and a new one starts at the next step. A request whose own work fails
(seeding, sampling, decoding its text) ends alone with an error; its neighbours go on.
Requests with images (a vision-language model's) join the same batch as text ones: their
pixels go in with their prefill. A prefill that fails before its rows join the batch (the
joining prompts' forward pass, their images' pixels) fails those rows alone; the running
rows go on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from contextlib import contextmanager

import torch

from chattune.inference.decoding import Decoder, Sequence

log = logging.getLogger("chattune.serve")


class QueueFull(RuntimeError):
    """The engine holds as many requests as it may; the caller should retry later."""


class Engine:
    """Owns the model in one worker thread; requests are submitted as :class:`Sequence` objects.

    At most ``max_batch`` requests decode together and ``max_waiting`` more may
    wait; past that :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, model, *, pad_token_id: int, max_batch: int = 16, max_waiting: int = 64,
                 use_adapters: bool = False):
        self.decoder = Decoder(model, pad_token_id=pad_token_id, use_adapters=use_adapters)
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._admitting = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def counters(self) -> dict:
        """Steps, peak batch, completed and cancelled requests, tokens generated."""
        return self.decoder.counters

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
            held = self.decoder.running + self._admitting + len(self._waiting)
            if held + len(seqs) > self.max_batch + self.max_waiting:
                raise QueueFull(f"{self.decoder.running + self._admitting} requests running and "
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
            return {"running": self.decoder.running + self._admitting, "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_waiting": self.max_waiting, **self.counters}

    # -- the worker ---------------------------------------------------------------------

    def _admit(self) -> list[Sequence]:
        joining: list[Sequence] = []
        if self.decoder.can_join:
            while self._waiting and self.decoder.running + len(joining) < self.max_batch:
                joining.append(self._waiting.popleft())
        self._admitting = len(joining)
        return joining

    @contextmanager
    def _joining(self):
        """From admitting to running in one move, as :meth:`submit` counts them."""
        with self._cond:
            yield
            self._admitting = 0

    def _run(self) -> None:
        decoder = self.decoder
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not decoder.rows:
                    self._cond.wait()
                if self._stopping:
                    break
                joining = self._admit()
            try:
                with torch.no_grad():
                    decoder.retire()
                    if joining:
                        self._prefill(joining)
                        decoder.retire()
                    if decoder.rows:
                        decoder.step()
                        decoder.retire()
            except Exception as exc:  # the shared forward pass failed: its requests fail, not the server
                log.exception("generation step failed")
                self._fail([*decoder.rows, *joining], f"generation failed: {exc}")
            finally:
                with self._cond:
                    self._admitting = 0
        with self._cond:
            left = [*decoder.rows, *self._waiting]
            self._waiting.clear()
        self._fail(left, "the server is shutting down")

    def _prefill(self, joining: list[Sequence]) -> None:
        """Prefill the joining rows; when that fails before any of them joined the batch (the
        running rows' cache untouched), those rows fail alone."""
        decoder = self.decoder
        try:
            decoder.prefill(joining, self._joining)
        except Exception as exc:
            joined = {id(seq) for seq in decoder.rows}
            if any(id(seq) in joined for seq in joining):
                raise
            log.exception("prefill failed")
            for seq in joining:
                decoder.fail_row(seq, f"generation failed: {exc}")

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            if seq.fail(message):
                self.counters["failed"] += 1
        self.decoder.clear()
