"""The one decoder: the same request through ``chat``'s generator and through the server
(alone, and inside a batch of four with mixed adapters) gives the same tokens, for every
method; plus the decoder's own behaviour (caches that cannot be merged)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import chattune.inference.decoding
from chattune.inference.decoding import Decoder, Sequence, run_to_end
from chattune.inference.generate import answer, stream
from chattune.inference.runs import LoadOptions, load_run
from chattune.inference.sampling import SamplingParams
from chattune.inference.textstream import TextStream
from chattune.serve.app import create_app
from chattune.serve.engine import Engine
from tests.serve.helpers import train_run
from tests.serve.server_thread import ServerThread

QUESTION = [{"role": "user", "content": "Who are you?"}]
OTHERS = [[{"role": "user", "content": "What is the capital of Veloria?"}],
          [{"role": "user", "content": "你是谁？"}],
          [{"role": "user", "content": "Who rules Ostmark? Tell me more about it."}]]
SETTINGS = {  # request settings as (chat keyword arguments, HTTP body fields)
    "greedy, repetition penalty 1.3": ({"repetition_penalty": 1.3},
                                       {"temperature": 0, "repetition_penalty": 1.3}),
    "sampled, seeded, top-k": ({"temperature": 0.9, "top_k": 20, "seed": 3},
                               {"temperature": 0.9, "top_k": 20, "seed": 3}),
}
METHODS = {
    "lora": {"learning_rate": 5e-3},
    "freeze": {"learning_rate": 5e-3},
    "ptuning": {"pre_seq_len": 4, "learning_rate": 1e-2},
    "full": {"learning_rate": 1e-3},
}


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """One run per method on the demo's identity data, and a second LoRA run saying "Beep boop."."""
    from chattune.demo import demo_records

    root = tmp_path_factory.mktemp("parity")
    taught = demo_records()[0][:12]
    base = tiny_models("glm4")
    runs = {method: train_run(base, taught, root, method, method=method, max_steps=6, save_steps=6, **extra)
            for method, extra in METHODS.items()}
    runs["beep"] = train_run(base, [{**r, "output": "Beep boop."} for r in taught], root, "beep",
                             max_steps=6, save_steps=6, learning_rate=5e-3)
    return runs


class Server:
    """A loaded run served over HTTP; records the sequences the engine decodes and can hold
    admission until a number of requests wait, so that they share one batch."""

    def __init__(self, served):
        self.served = served
        self.engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, max_batch=8,
                             use_adapters=served.uses_adapters)
        self.seen: list[Sequence] = []
        self.prefills: list[int] = []
        self.hold = 0
        prefill, admit = self.engine.decoder.prefill, self.engine._admit

        def recording_prefill(seqs, *args):
            self.seen.extend(seqs)
            self.prefills.append(len(seqs))
            return prefill(seqs, *args)

        def held_admit():
            if len(self.engine._waiting) < self.hold:
                return []
            self.hold = 0
            return admit()

        self.engine.decoder.prefill = recording_prefill
        self.engine._admit = held_admit
        self.engine.start()
        self.thread = ServerThread(create_app(served, self.engine)).start()

    def ask(self, model: str, messages: list[dict], body: dict, max_tokens: int = 10) -> str:
        """One chat completion's text."""
        import httpx

        reply = httpx.post(f"{self.thread.url}/v1/chat/completions", timeout=120, json={
            "model": model, "messages": messages, "max_tokens": max_tokens, **body})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    def tokens_of(self, model: str, messages: list[dict]) -> list[list[int]]:
        """The generated tokens of every recorded request for this model and prompt."""
        profile = self.served.profiles[model]
        ids = self.served.prompt_ids(messages, profile)
        return [seq.generated for seq in self.seen if seq.adapter == profile.adapter and seq.prompt_ids == ids]

    def close(self) -> None:
        self.thread.stop()
        self.engine.stop()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", list(METHODS))
def test_chat_and_serve_give_the_same_tokens(trained, method, setting):
    chat_kw, body = SETTINGS[setting]
    run = load_run(str(trained[method]))
    name = run.default
    chat_seq = answer(run, [QUESTION], max_new_tokens=10, **chat_kw)[0]
    streamed = "".join(stream(run, QUESTION, max_new_tokens=10, **chat_kw))
    assert streamed == chat_seq.text.text
    assert len(chat_seq.generated) >= 1

    if method == "lora":  # the server holds this run, another adapter and the bare base model
        served = load_run(str(trained[method]), LoadOptions(name=name, adapters=[("beep", str(trained["beep"]))]))
        batch = [(name, QUESTION), ("beep", OTHERS[0]), ("base", OTHERS[1]), (name, OTHERS[2])]
        assert served.uses_adapters
    else:  # served alone: a batch of four of its own requests
        served = run
        batch = [(name, QUESTION), *((name, m) for m in OTHERS)]
        assert not served.uses_adapters
    server = Server(served)
    try:
        alone_text = server.ask(name, QUESTION, body)
        assert alone_text == streamed
        assert server.tokens_of(name, QUESTION) == [chat_seq.generated]
        server.seen.clear()
        server.prefills.clear()
        server.hold = 4
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(server.ask, model, messages, body) for model, messages in batch]
            texts = [f.result(timeout=120) for f in futures]
        assert texts[0] == streamed
        assert server.tokens_of(name, QUESTION) == [chat_seq.generated]
        assert server.prefills == [4]  # the four requests decoded as one batch
        assert len({seq.adapter for seq in server.seen}) == (3 if method == "lora" else 1)
    finally:
        server.close()


def _wait_until(condition, seconds: float = 30.0) -> None:
    import time

    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _seq(ids, max_tokens=6):
    return Sequence(list(ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                    TextStream(lambda t: "", [], False), lambda event: None)


def test_rows_of_a_cache_that_cannot_be_merged_stay_until_the_batch_ends(trained, monkeypatch):
    """With a cache that is not plain per-layer tensors (sliding windows, remote code), rows
    join only an empty batch and ended rows stay in it, ignored: the tokens are the same."""
    run = load_run(str(trained["full"]))
    prompts = [run.prompt_ids(m) for m in [QUESTION, *OTHERS]]

    def tokens(max_tokens: list[int]) -> list[list[int]]:
        decoder = Decoder(run.model, pad_token_id=run.tokenizer.pad_token_id)
        seqs = [_seq(p, n) for p, n in zip(prompts, max_tokens, strict=True)]
        for _ in run_to_end(decoder, seqs):
            pass
        return [s.generated for s in seqs]

    lengths = [2, 7, 4, 5]
    merged = tokens(lengths)
    monkeypatch.setattr(chattune.inference.decoding, "cache_tensors", lambda cache: None)
    opaque = tokens(lengths)
    assert opaque == merged and [len(t) for t in opaque] == lengths
    decoder = Decoder(run.model, pad_token_id=run.tokenizer.pad_token_id)
    decoder.prefill([_seq(prompts[0], 1), _seq(prompts[1])])
    assert not decoder.can_join
    decoder.retire()
    assert len(decoder.rows) == 2 and decoder.running == 1  # the ended row stays, and is not counted


def test_an_engine_with_such_a_cache_admits_requests_once_the_batch_is_empty(trained, monkeypatch):
    monkeypatch.setattr(chattune.inference.decoding, "cache_tensors", lambda cache: None)
    run = load_run(str(trained["full"]))
    engine = Engine(run.model, pad_token_id=run.tokenizer.pad_token_id, max_batch=4)
    done = threading.Semaphore(0)
    seqs = [Sequence(run.prompt_ids(m), SamplingParams(max_tokens=5, ignore_eos=True),
                     TextStream(lambda t: "", [], False), lambda e: e.kind == "done" and done.release())
            for m in [QUESTION, *OTHERS]]
    engine.start()
    try:
        engine.submit(seqs[0])
        engine.submit(*seqs[1:])
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    alone = [answer(run, [m], max_new_tokens=5, ignore_eos=True)[0].generated for m in [QUESTION, *OTHERS]]
    assert [s.generated for s in seqs] == alone


def test_a_prefix_seeds_every_row_s_cache(trained):
    run = load_run(str(trained["ptuning"]))
    decoder = Decoder(run.model, pad_token_id=run.tokenizer.pad_token_id)
    assert decoder.prefix == 4
    ids = torch.tensor([run.prompt_ids(QUESTION)])
    with torch.no_grad():  # the first token equals the one peft's own forward (prefix in place) predicts
        expected = int(run.model(input_ids=ids).logits[0, -1].argmax())
    seq = _seq(ids[0].tolist(), 1)
    decoder.prefill([seq])
    assert seq.generated == [expected]


# -- one row's failure is that row's alone ---------------------------------------------------


@pytest.fixture(scope="module")
def bare(tiny_models):
    """A tiny base model and its tokenizer, no run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models("glm4")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _row(tokenizer, events, name, decode=None, max_tokens=6, **params):
    emit = lambda event: events.setdefault(name, []).append(event)  # noqa: E731
    text = TextStream(decode or (lambda ids: tokenizer.decode(ids)), [], strip=False)
    return Sequence(tokenizer("hello there")["input_ids"], SamplingParams(max_tokens=max_tokens, **params), text,
                    emit, stop_token_ids=frozenset())


@pytest.mark.parametrize("fault", ["seed", "decode", "sample"])
def test_a_row_that_fails_ends_alone_and_its_neighbours_get_their_tokens(bare, fault):
    model, tokenizer = bare
    events: dict[str, list] = {}
    alone = _row(tokenizer, {}, "alone", temperature=0.8, seed=5)
    list(run_to_end(Decoder(model, pad_token_id=tokenizer.pad_token_id or 0), [alone]))
    calls = []

    def broken_decode(ids):
        calls.append(ids)
        if len(calls) > 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "boom")
        return tokenizer.decode(ids)

    bad = {"seed": lambda: _row(tokenizer, events, "bad", temperature=0.8, seed=2**64),
           "decode": lambda: _row(tokenizer, events, "bad", decode=broken_decode),
           "sample": lambda: _row(tokenizer, events, "bad", temperature=5e-324)}[fault]()
    good = [_row(tokenizer, events, "greedy"), _row(tokenizer, events, "seeded", temperature=0.8, seed=5)]
    list(run_to_end(Decoder(model, pad_token_id=tokenizer.pad_token_id or 0), [good[0], bad, good[1]]))
    assert [e.kind for e in events["bad"]][-1] == "error" and bad.finished
    for name in ("greedy", "seeded"):
        assert events[name][-1].kind == "done" and events[name][-1].completion_tokens == 6
    assert good[1].generated == alone.generated  # the same tokens as alone, generator untouched


def test_rows_that_repeat_a_prompt_prefill_it_once_and_sample_as_if_alone(trained, monkeypatch):
    """A group of samples of one prompt (GRPO's, or identical requests) runs the prompt once; every row still
    gets its own seeded tokens, the same as decoded alone, also with an opaque cache."""
    run = load_run(str(trained["lora"]))
    prompts = [run.prompt_ids(m) for m in (QUESTION, OTHERS[0])]

    def seq(ids, seed):
        return Sequence(list(ids), SamplingParams(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True),
                        TextStream(lambda t: "", [], False), lambda event: None)

    def decode(rows):
        decoder = Decoder(run.model, pad_token_id=run.tokenizer.pad_token_id)
        widths = []
        forward = decoder._forward
        decoder._forward = lambda ids, *args, **kwargs: widths.append(ids.shape[0]) or forward(ids, *args, **kwargs)
        seqs = [seq(prompts[p], s) for p, s in rows]
        for _ in run_to_end(decoder, seqs):
            pass
        return [s.generated for s in seqs], widths[0]

    rows = [(0, 1), (0, 2), (1, 3), (0, 4), (1, 5)]
    together, prefilled = decode(rows)
    assert prefilled == 2  # two distinct prompts run, for five rows
    assert together == [decode([row])[0][0] for row in rows]
    assert len({tuple(t) for t in together}) == 5  # each row sampled with its own seed
    monkeypatch.setattr(chattune.inference.decoding, "cache_tensors", lambda cache: None)
    assert decode(rows)[0] == together
