"""The batching engine behind ``chattune serve``: rows of different adapters in one batch,
rows joining and leaving a running batch, load, failures and the queue's limits."""

from __future__ import annotations

import queue
import threading

import openai
import pytest
import torch

from chattune.inference.decoding import Sequence
from chattune.inference.sampling import SamplingParams
from chattune.inference.textstream import TextStream
from chattune.serve.engine import QueueFull
from tests.serve.helpers import ASK, chat, wait_for


def test_a_mixed_adapter_batch_equals_each_adapter_alone(server):
    served, engine = server.served, server.engine
    ids = served.prompt_ids(ASK, served.profiles["a"])
    batch = torch.tensor([ids] * 3)
    with torch.no_grad():
        mixed = served.model(input_ids=batch, adapter_names=["a0", "a1", "__base__"]).logits
        for row, adapter in enumerate(["a0", "a1", "__base__"]):
            alone = served.model(input_ids=batch[:1], adapter_names=[adapter]).logits
            torch.testing.assert_close(mixed[row], alone[0], rtol=1e-5, atol=1e-5)

    def run(models: list[str]) -> list[list[int]]:
        done = queue.Queue()
        seqs = [Sequence(ids, SamplingParams(max_tokens=6, ignore_eos=True), TextStream(lambda t: "", [], True),
                         lambda event, i=i: done.put((i, event)), adapter=served.profiles[m].adapter)
                for i, m in enumerate(models)]
        engine.submit(*seqs)
        finished = 0
        while finished < len(seqs):
            finished += done.get(timeout=30)[1].kind == "done"
        return [seq.generated for seq in seqs]

    together = run(["a", "b", "base"])
    assert together == [run([m])[0] for m in ("a", "b", "base")]
    assert together[0] != together[1]


def test_rows_joining_and_leaving_do_not_change_any_answer(server):
    """Requests join a running batch (longer and shorter prompts, other adapters) and leave it
    early; each greedy answer equals the same request run alone."""
    served, engine = server.served, server.engine
    long = [{"role": "user", "content": "Tell me about the kingdoms of Veloria and Zantor, please."}]

    def prompt(name, messages):
        return served.prompt_ids(messages, served.profiles[name])

    plan = [("a", prompt("a", ASK), 14), ("b", prompt("b", long), 4),
            ("base", prompt("base", ASK), 9), ("a", prompt("a", long), 6)]

    def run(steps: list[int], staggered: bool) -> list[list[int]]:
        done = queue.Queue()
        seqs: list[Sequence] = []

        def emit(i, event):
            if staggered and event.kind == "text" and i + 1 < len(steps) and len(seqs) == i + 1 and \
                    len(seqs[i].generated) == 2:
                seqs.append(make(i + 1))
                engine.submit(seqs[-1])  # joins while seq i is running
            if event.kind in ("done", "error"):
                done.put(event)

        def make(i):
            model, ids, max_tokens = plan[steps[i]]
            return Sequence(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                            TextStream(lambda t: "x" * len(t), [], False), lambda e: emit(i, e),
                            adapter=served.profiles[model].adapter)

        seqs.append(make(0))
        engine.submit(seqs[0])
        for _ in steps:
            assert done.get(timeout=30).kind == "done"
        return [seq.generated for seq in seqs]

    together = run([0, 1, 2, 3], staggered=True)
    assert together == [run([i], staggered=False)[0] for i in range(4)]


def test_concurrent_requests_are_batched(client, server):
    server.engine.counters["peak_batch"] = 0
    results = []

    def one(i):
        results.append(chat(client, ["a", "b", "base"][i % 3], max_tokens=24, extra_body={"ignore_eos": True}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 8 and all(r.usage.completion_tokens == 24 for r in results)
    assert server.engine.counters["peak_batch"] >= 4


def test_a_failed_step_fails_its_request_not_the_server(client, server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine.decoder, "_forward", broken)
    with pytest.raises(openai.InternalServerError, match="boom"):
        chat(client, max_tokens=2)
    monkeypatch.undo()
    assert server.engine.alive
    assert chat(client, max_tokens=2).choices[0].message.content is not None


def test_the_queue_holds_max_batch_plus_max_waiting_requests(server, slow_steps):
    """Past ``max_batch`` running and ``max_waiting`` waiting, submit refuses (all of a call's
    requests or none); cancelled requests free their places."""
    engine = server.engine
    ids = server.served.prompt_ids(ASK, server.served.profiles["base"])
    events = queue.Queue()

    def long_request():
        return Sequence(ids, SamplingParams(max_tokens=1500, ignore_eos=True), TextStream(lambda t: "", [], True),
                        events.put)

    limits = engine.max_batch, engine.max_waiting
    cancelled = engine.counters["cancelled"]
    engine.max_batch, engine.max_waiting = 1, 1
    running, waiting = long_request(), long_request()
    try:
        engine.submit(running)
        wait_for(lambda: engine.stats()["running"] == 1)
        with pytest.raises(QueueFull):
            engine.submit(waiting, long_request())  # one place left: neither is queued
        assert engine.stats()["waiting"] == 0
        engine.submit(waiting)
        assert engine.stats()["waiting"] == 1
        with pytest.raises(QueueFull, match="1 requests running and 1 waiting"):
            engine.submit(long_request())
    finally:
        engine.cancel(waiting)
        engine.cancel(running)
        engine.max_batch, engine.max_waiting = limits
    wait_for(lambda: engine.stats()["running"] == engine.stats()["waiting"] == 0)
    assert engine.counters["cancelled"] == cancelled + 2
    assert all(event.kind != "error" for event in list(events.queue))


def test_joining_requests_count_once_while_their_first_token_is_picked(server, monkeypatch):
    """A request counts as admitting or as running, never both: while the rows that just
    joined pick their first token, /health and the queue limit see each of them once."""
    served, engine = server.served, server.engine
    seen = []
    pick = engine.decoder._pick

    def watching_pick(logits, seqs):
        seen.append(engine.stats()["running"])
        return pick(logits, seqs)

    monkeypatch.setattr(engine.decoder, "_pick", watching_pick)
    done = queue.Queue()
    seqs = [Sequence(served.prompt_ids(ASK, served.profiles["a"]), SamplingParams(max_tokens=1, ignore_eos=True),
                     TextStream(lambda t: "", [], True), done.put, adapter=served.profiles["a"].adapter)
            for _ in range(2)]
    engine.submit(*seqs)
    assert [done.get(timeout=30).kind for _ in seqs] == ["done", "done"]
    wait_for(lambda: engine.stats()["running"] == 0)
    assert seen[0] == 2  # (the old engine said 4 here and could refuse requests with 429)
