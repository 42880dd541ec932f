"""Fixtures of the serve tests: two tiny fine-tuned runs (trained once a session), one server
over them (built once a session), and clients and hooks for each test."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch

from tests.serve.helpers import KEY, TEMPLATES, train_run, with_template
from tests.serve.server_thread import ServerThread


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_as_serve_sets_them():
    """As ``chattune serve`` does: torch's threads as given by ``--threads``, else torch's own
    default (here each test worker's ``OMP_NUM_THREADS``), and Python's switch interval."""
    from chattune.serve import set_threads

    before, interval = torch.get_num_threads(), sys.getswitchinterval()
    set_threads(None)
    yield
    torch.set_num_threads(before)
    sys.setswitchinterval(interval)


@pytest.fixture(scope="session")
def runs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Run ``a`` (the demo's identity data) and run ``b`` (every answer "Beep boop."), trained
    once for every serve test file."""
    from chattune.demo import demo_records

    root = tmp_path_factory.mktemp("serve")
    taught, _ = demo_records()
    beeps = [{**r, "output": "Beep boop."} for r in taught]
    base = tiny_models("glm4")
    return {"root": root,
            "a": train_run(base, taught, root, "a", max_steps=4, save_steps=4),
            "b": train_run(base, beeps, root, "b", max_steps=30, save_steps=30, learning_rate=1e-2,
                           lr_scheduler_type="constant", logging_steps=10)}


@pytest.fixture(scope="session")
def server(runs):
    """One process: base + adapter a + adapter b + one copy of a per template, served twice
    (without and with an API key) over the same engine; built once a session."""
    from transformers import AutoTokenizer

    from chattune.inference.runs import LoadOptions, load_run
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine

    tokenizer = AutoTokenizer.from_pretrained(runs["a"])
    copies = [(f"tpl-{name}", str(with_template(runs["a"], runs["root"] / f"tpl-{name}", name, tokenizer)))
              for name in TEMPLATES]
    served = load_run(str(runs["a"]), LoadOptions(name="a", adapters=[("b", str(runs["b"])), *copies]))
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, max_batch=16, max_waiting=16,
                    use_adapters=True)
    engine.start()
    open_server = ServerThread(create_app(served, engine, max_body_bytes=64 * 1024)).start()
    keyed = ServerThread(create_app(served, engine, api_key=KEY)).start()
    yield SimpleNamespace(url=open_server.url, keyed_url=keyed.url, served=served, engine=engine, runs=runs)
    open_server.stop()
    keyed.stop()
    engine.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Every model step takes at least 5 ms more, so a long answer stays long on any machine."""
    decoder = server.engine.decoder
    forward = decoder._forward

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(decoder, "_forward", slow)


@pytest.fixture
def prefilled(server, monkeypatch) -> list[tuple[str, list[int]]]:
    """(adapter, prompt ids) of each request the engine prefills during the test."""
    decoder = server.engine.decoder
    prefill = decoder.prefill
    seen: list[tuple[str, list[int]]] = []

    def recording(seqs, *args):
        seen.extend((seq.adapter, list(seq.prompt_ids)) for seq in seqs)
        return prefill(seqs, *args)

    monkeypatch.setattr(decoder, "prefill", recording)
    return seen


@pytest.fixture
def scripted(server, monkeypatch):
    """``script(text, ...)``: each next request's output is the tokens of one text, then EOS."""
    decoder, tokenizer = server.engine.decoder, server.served.tokenizer
    queued: list[list[int]] = []
    given: dict = {}

    def pick(logits, seqs):
        for seq in seqs:
            if seq.finished:
                continue
            if seq not in given:
                given[seq] = queued.pop(0) if queued else []
            plan, n = given[seq], len(seq.generated)
            decoder._accept(seq, plan[n] if n < len(plan) else tokenizer.eos_token_id)

    monkeypatch.setattr(decoder, "_pick", pick)

    def script(*texts: str) -> None:
        queued.extend(tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)

    return script
