"""``chattune serve``: the real server on a loopback port, a tiny fine-tuned model with two
adapters, and the official ``openai`` client (httpx for raw bodies)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from chattune.config import ConfigError
from chattune.data.encode import EncodeOptions, PieceEncoder, encode_conversation, encode_prompt
from chattune.data.templates import NAMED_TEMPLATES, template_provenance
from chattune.manifest import ManifestError
from chattune.serve import ServerThread
from chattune.serve.app import create_app
from chattune.serve.engine import Engine, SamplingParams, Sequence
from chattune.serve.registry import load_served, parse_adapter
from chattune.serve.text import TextStream
from tests.test_train import make_config

TEMPLATES = [*NAMED_TEMPLATES, "tokenizer"]
KEY = "sekret-key"
ASK = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_as_serve_sets_them():
    """As ``chattune serve`` does (``--threads``: one less than the cores): with every core in
    torch's thread team, any other busy thread (HTTP, clients, another process) stalls it."""
    from chattune.serve import set_threads

    before = torch.get_num_threads()
    set_threads(None)
    yield
    torch.set_num_threads(before)


def _train(base: Path, records: list[dict], root: Path, name: str, **overrides) -> Path:
    from chattune.train import train

    data = root / f"{name}.json"
    data.write_text(json.dumps(records, ensure_ascii=False))
    config = make_config(base, data, root / name, eval_fraction=0.0, report_to=["none"],
                         cache_dir=str(root / "cache"), **overrides)
    return train(config, log=lambda *_: None).output_dir


def _with_template(run: Path, dest: Path, template: str, tokenizer) -> Path:
    """A copy of a run folder whose manifest says it was trained with ``template``."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    manifest = json.loads((dest / "chattune.json").read_text())
    manifest["template"] = template_provenance(template, tokenizer)
    (dest / "chattune.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Run ``a`` (the demo's identity data) and run ``b`` (every answer "Beep boop.")."""
    from chattune.demo import demo_records

    root = tmp_path_factory.mktemp("serve")
    taught, _ = demo_records()
    beeps = [{**r, "output": "Beep boop."} for r in taught]
    base = tiny_models("glm4")
    return {"root": root,
            "a": _train(base, taught, root, "a", max_steps=4, save_steps=4),
            "b": _train(base, beeps, root, "b", max_steps=30, save_steps=30, learning_rate=1e-2,
                        lr_scheduler_type="constant", logging_steps=10)}


@pytest.fixture(scope="module")
def server(runs):
    """One process: base + adapter a + adapter b + one copy of a per template, served twice
    (without and with an API key) over the same engine."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runs["a"])
    copies = [(f"tpl-{name}", str(_with_template(runs["a"], runs["root"] / f"tpl-{name}", name, tokenizer)))
              for name in TEMPLATES]
    served = load_served(str(runs["a"]), [("b", str(runs["b"])), *copies], name="a")
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, max_batch=16, max_waiting=16,
                    use_adapters=True)
    engine.start()
    open_server = ServerThread(create_app(served, engine, max_body_bytes=64 * 1024)).start()
    keyed = ServerThread(create_app(served, engine, api_key=KEY)).start()
    seen: list[tuple[str, list[int]]] = []
    engine.observer = lambda seq, ids: seen.append((seq.adapter, ids))
    yield type("Server", (), {"url": open_server.url, "keyed_url": keyed.url, "served": served,
                              "engine": engine, "seen": seen, "runs": runs})
    open_server.stop()
    keyed.stop()
    engine.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Every model step takes at least 5 ms more, so a long answer stays long on any machine."""
    forward = server.engine._forward

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(server.engine, "_forward", slow)


def _chat(client, model="a", messages=ASK, **kw):
    return client.chat.completions.create(model=model, messages=messages, **{"temperature": 0, **kw})


def _wait_for(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _health(server) -> dict:
    return httpx.get(f"{server.url}/health").json()


# -- the API with the official client ------------------------------------------------------

def test_chat_completion(client, server):
    reply = _chat(client, max_tokens=8)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "a"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(server.served.models["a"].prompt_ids(ASK))
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_greedy_answers_equal_chat_model_generate(client, runs):
    from chattune.generate import load_chat_model

    chat = load_chat_model(str(runs["a"]))
    for question in ["Who are you?", "What is the capital of Veloria?", "你好"]:
        messages = [{"role": "user", "content": question}]
        expected = chat.generate([messages], max_new_tokens=12)[0]
        assert _chat(client, messages=messages, max_tokens=12).choices[0].message.content == expected


@pytest.mark.parametrize("model", ["a", "b", "base"])
def test_stream_reassembles_to_the_non_streamed_text(client, model):
    whole = _chat(client, model, max_tokens=16)
    chunks = list(_chat(client, model, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "a", "messages": ASK, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_models_lists_every_adapter_and_the_base(client, server):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "a" and set(ids) == {"a", "b", "base", *(f"tpl-{t}" for t in TEMPLATES)}
    assert client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_the_model_field_picks_the_adapter(client):
    answers = {m: _chat(client, m, max_tokens=8, extra_body={"ignore_eos": True}).choices[0].message.content
               for m in ("a", "b", "base")}
    assert answers["a"] != answers["b"] and answers["b"] != answers["base"]
    assert answers["b"] and set(answers["b"]) <= set("Beep boop.")  # what b was taught to say
    with pytest.raises(openai.NotFoundError) as caught:
        _chat(client, "no-such-model", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_plain_completions(client, server):
    prompt = "The quick brown"
    reply = client.completions.create(model="base", prompt=prompt, max_tokens=6, temperature=0)
    assert reply.object == "text_completion" and reply.usage.completion_tokens <= 6
    ids = server.served.tokenizer(prompt)["input_ids"]
    assert reply.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert streamed == reply.choices[0].text
    assert client.completions.create(model="base", prompt=ids, max_tokens=6,
                                     temperature=0).choices[0].text == reply.choices[0].text


def test_seeded_sampling_repeats(client):
    def sampled(seed):
        return _chat(client, "base", max_tokens=12, temperature=1.0, seed=seed,
                     extra_body={"ignore_eos": True}).choices[0].message.content

    assert sampled(123) == sampled(123)


def test_stop_strings_cut_the_text_and_never_stream(client):
    kw = {"model": "base", "prompt": "The quick brown", "max_tokens": 24, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kw).choices[0].text
    start = next(i for i in range(2, len(full) - 3) if "\ufffd" not in full[:i + 3])
    stop = full[start:start + 3]
    cut = full[:full.find(stop)]
    reply = client.completions.create(stop=[stop], **kw)
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw)]
    assert "".join(pieces) == cut


# -- what the model sees ---------------------------------------------------------------------

@pytest.mark.parametrize("template", TEMPLATES)
def test_the_prompt_is_what_training_encodes(client, server, template):
    """The ids the engine feeds the model equal encode_prompt's and training's prefix up to the answer."""
    messages = [{"role": "system", "content": "You are Lumi."},
                {"role": "user", "content": "Summarise this.", "input": "A long text."},
                {"role": "assistant", "content": "A summary."},
                {"role": "user", "content": "Who are you?"}]
    name = f"tpl-{template}"
    model = server.served.models[name]
    assert model.chat.template == template
    server.seen.clear()
    reply = _chat(client, name, messages=messages, max_tokens=1)
    fed = [ids for adapter, ids in server.seen if adapter == model.adapter]
    assert len(fed) == 1 and reply.usage.prompt_tokens == len(fed[0])
    encoder = PieceEncoder(server.served.tokenizer)
    assert fed[0] == encode_prompt(messages, template, encoder)
    trained = encode_conversation([*messages, {"role": "assistant", "content": "I am Lumi."}], template, encoder,
                                  EncodeOptions(max_seq_length=4096))
    n = len(fed[0])
    assert trained.input_ids[:n] == fed[0]
    assert trained.labels[n - 1] == -100 and trained.labels[n] != -100  # the answer starts right there


def test_a_mixed_adapter_batch_equals_each_adapter_alone(server):
    served, engine = server.served, server.engine
    ids = served.models["a"].prompt_ids(ASK)
    batch = torch.tensor([ids] * 3)
    with torch.no_grad():
        mixed = served.model(input_ids=batch, adapter_names=["a0", "a1", "__base__"]).logits
        for row, adapter in enumerate(["a0", "a1", "__base__"]):
            alone = served.model(input_ids=batch[:1], adapter_names=[adapter]).logits
            torch.testing.assert_close(mixed[row], alone[0], rtol=1e-5, atol=1e-5)

    def run(models: list[str]) -> list[list[int]]:
        done = queue.Queue()
        seqs = [Sequence(ids, SamplingParams(max_tokens=6, ignore_eos=True), TextStream(lambda t: "", [], True),
                         lambda event, i=i: done.put((i, event)), adapter=served.models[m].adapter)
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
    plan = [("a", served.models["a"].prompt_ids(ASK), 14), ("b", served.models["b"].prompt_ids(long), 4),
            ("base", served.models["base"].prompt_ids(ASK), 9), ("a", served.models["a"].prompt_ids(long), 6)]

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
                            adapter=served.models[model].adapter)

        seqs.append(make(0))
        engine.submit(seqs[0])
        for _ in steps:
            assert done.get(timeout=30).kind == "done"
        return [seq.generated for seq in seqs]

    together = run([0, 1, 2, 3], staggered=True)
    assert together == [run([i], staggered=False)[0] for i in range(4)]


def test_a_gone_non_streaming_client_frees_its_slot(server, slow_steps):
    cancelled = server.engine.counters["cancelled"]
    body = {"model": "base", "messages": ASK, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    _wait_for(lambda: _health(server)["running"] == 0)
    assert server.engine.counters["cancelled"] == cancelled + 1


# -- under load ------------------------------------------------------------------------------

def test_concurrent_requests_are_batched(client, server):
    server.engine.counters["peak_batch"] = 0
    results = []

    def one(i):
        results.append(_chat(client, ["a", "b", "base"][i % 3], max_tokens=24, extra_body={"ignore_eos": True}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 8 and all(r.usage.completion_tokens == 24 for r in results)
    assert server.engine.counters["peak_batch"] >= 4


def _long_stream(server, model="base"):
    body = {"model": model, "messages": ASK, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    http = httpx.Client(timeout=60)
    stream = http.send(http.build_request("POST", f"{server.url}/v1/chat/completions", json=body), stream=True)
    stream.keep = (http, stream.iter_lines())  # dropping either would close the stream
    assert next(stream.keep[1]).startswith("data: ")
    return stream


def test_a_stream_is_not_blocked_and_a_gone_client_frees_its_slot(client, server, slow_steps):
    cancelled = server.engine.counters["cancelled"]
    long = _long_stream(server)
    _wait_for(lambda: _health(server)["running"] == 1)
    started = time.monotonic()
    chunks = list(_chat(client, max_tokens=8, stream=True, extra_body={"ignore_eos": True}))
    assert len(chunks) > 2 and time.monotonic() - started < 5
    assert _health(server)["running"] == 1  # the long one is still going
    long.close()
    _wait_for(lambda: _health(server)["running"] == 0, 10)
    assert server.engine.counters["cancelled"] == cancelled + 1


def test_past_the_queue_429_with_retry_after(server, slow_steps):
    engine = server.engine
    limits = engine.max_batch, engine.max_waiting
    engine.max_batch, engine.max_waiting = 1, 1
    streams = []
    try:
        streams.append(_long_stream(server))
        streams.append(_long_stream(server))
        _wait_for(lambda: _health(server)["waiting"] == 1)
        reply = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "a", "messages": ASK})
        assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            _chat(openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0), max_tokens=2)
    finally:
        for stream in streams:
            stream.close()
        engine.max_batch, engine.max_waiting = limits
    _wait_for(lambda: _health(server)["running"] == _health(server)["waiting"] == 0)


def test_a_failed_step_fails_its_request_not_the_server(client, server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine, "_forward", broken)
    with pytest.raises(openai.InternalServerError, match="boom"):
        _chat(client, max_tokens=2)
    monkeypatch.undo()
    assert _chat(client, max_tokens=2).choices[0].message.content is not None


# -- bad requests ----------------------------------------------------------------------------

MSG = [{"role": "user", "content": "hi"}]
BAD = {
    "malformed JSON": ("chat", b'{"model": "a", "messages": [', None),
    "not an object": ("chat", [1, 2], None),
    "missing messages": ("chat", {"model": "a"}, "messages"),
    "messages not a list": ("chat", {"messages": "hi"}, "messages"),
    "content not text": ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "unknown role": ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    "temperature a string": ("chat", {"messages": MSG, "temperature": "hot"}, "temperature"),
    "stream not a bool": ("chat", {"messages": MSG, "stream": "yes"}, "stream"),
    "max_tokens a string": ("chat", {"messages": MSG, "max_tokens": "ten"}, "max_tokens"),
    "max_tokens zero": ("chat", {"messages": MSG, "max_tokens": 0}, "max_tokens"),
    "max_tokens past the context": ("chat", {"messages": MSG, "max_tokens": 2048}, "max_tokens"),
    "no messages": ("chat", {"messages": []}, "messages"),
    "empty user message": ("chat", {"messages": [{"role": "user", "content": " "}]}, "messages[0].content"),
    "roles out of order": ("chat", {"messages": [{"role": "assistant", "content": "x"}]}, "messages[0].role"),
    "ends with the answer": ("chat", {"messages": [*MSG, {"role": "assistant", "content": "x"}]},
                             "messages[1].role"),
    "n above 1": ("chat", {"messages": MSG, "n": 2}, "n"),
    "empty stop": ("chat", {"messages": MSG, "stop": [""]}, "stop"),
    "tools": ("chat", {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "empty prompt": ("completions", {"prompt": ""}, "prompt"),
    "no prompt tokens": ("completions", {"prompt": []}, "prompt"),
    "prompt past the context": ("completions", {"prompt": [5] * 2048}, "prompt"),
    "token id out of range": ("completions", {"prompt": [10 ** 6]}, "prompt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_4xx_naming_the_field(server, case):
    route, body, param = BAD[case]
    url = f"{server.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(url, content=content, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    if "context" in case:
        assert error["code"] == "context_length_exceeded"
    assert _health(server)["status"] == "ok"


def test_oversized_bodies_get_413(server):
    url = f"{server.url}/v1/chat/completions"
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    assert httpx.post(url, content=big).status_code == 413

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 1024

    reply = httpx.post(url, content=chunked())
    assert reply.status_code == 413 and reply.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_in_openai_format(server):
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["message"].startswith("Not Found")
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405


def test_the_api_key(server):
    good = openai.OpenAI(base_url=f"{server.keyed_url}/v1", api_key=KEY, max_retries=0)
    bad = openai.OpenAI(base_url=f"{server.keyed_url}/v1", api_key="wrong", max_retries=0)
    assert _chat(good, max_tokens=2).choices[0].message.content is not None
    assert [m.id for m in good.models.list()][0] == "a"
    with pytest.raises(openai.AuthenticationError) as caught:
        _chat(bad, max_tokens=2)
    assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.keyed_url}/v1/models").status_code == 401
    assert httpx.get(f"{server.keyed_url}/health").status_code == 200


# -- pieces ----------------------------------------------------------------------------------

def test_text_stream_holds_back_what_may_be_a_stop_string():
    stream = TextStream(lambda ids: "".join(map(chr, ids)), ["END", "\n\n"], strip=True)
    sent = [stream.update(list(map(ord, text))) for text in [" ab", " abE", " abEN", " abENx", " abENx\n"]]
    assert sent == ["ab", "", "", "ENx", ""]
    assert stream.update(list(map(ord, " abENx\n\nmore"))) == "" and stream.stopped
    assert stream.finish(list(map(ord, " abENx\n\nmore"))) == ""
    assert stream.text == "abENx"
    utf8 = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), [], strip=False)
    e_acute = list("é".encode())
    assert utf8.update([32]) == " " and utf8.update([32, e_acute[0]]) == ""  # half a character waits
    assert utf8.update([32, *e_acute]) == "é" and utf8.finish([32, *e_acute]) == ""


def test_adapters_must_share_the_base_model_and_names_must_be_clear(runs, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(runs["b"], other)
    manifest = json.loads((other / "chattune.json").read_text())
    manifest["base_model"]["config_sha256"] = "0" * 64
    (other / "chattune.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="different base model"):
        load_served(str(runs["a"]), [("other", str(other))])
    manifest["method"]["name"] = "ptuning"
    (other / "chattune.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="ptuning run.*serve it alone"):
        load_served(str(runs["a"]), [("other", str(other))])
    with pytest.raises(ConfigError, match="unique"):
        load_served(str(runs["a"]), [("base", str(runs["b"]))])
    with pytest.raises(ConfigError, match="NAME=RUN_DIR"):
        parse_adapter("just-a-path")


def test_a_freeze_run_is_served_alone(runs, tiny_models):
    from chattune.demo import demo_records

    frozen = _train(tiny_models("glm4"), demo_records()[0][:8], runs["root"], "frozen", method="freeze",
                    max_steps=2, save_steps=2)
    served = load_served(str(frozen))
    assert list(served.models) == ["frozen"] and not served.uses_adapters
    with pytest.raises(ManifestError, match="serve it alone"):
        load_served(str(runs["a"]), [("frozen", str(frozen))])


def test_chattune_serve_command(runs, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "chattune.cli", "serve", str(runs["a"]), "--name", "a",
               "--adapter", f"b={runs['b']}", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(command, env={**os.environ, "CHATTUNE_API_KEY": KEY},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(up, 90)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["a", "b", "base"]
        assert httpx.get(f"{url}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_ptuning_run_is_served_alone_with_its_prefix_in_the_cache(runs, tiny_models):
    """P-Tuning v2 through the engine (prefix keys/values seed each row's cache) gives the
    greedy answers of ChatModel.generate, alone and when rows share a batch."""
    from chattune.demo import demo_records
    from chattune.generate import load_chat_model

    prefixed = _train(tiny_models("glm4"), demo_records()[0][:8], runs["root"], "prefixed", method="ptuning",
                      pre_seq_len=4, learning_rate=1e-2, max_steps=3, save_steps=3)
    served = load_served(str(prefixed))
    assert list(served.models) == ["prefixed"] and not served.uses_adapters
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id, max_batch=4, max_waiting=4)
    assert engine.prefix == 4
    engine.start()
    app = ServerThread(create_app(served, engine)).start()
    try:
        client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=60)
        chat = load_chat_model(str(prefixed))
        questions = ["Who are you?", "What is the capital of Veloria?", "你好"]
        expected = [chat.generate([[{"role": "user", "content": q}]], max_new_tokens=8)[0] for q in questions]
        alone = [_chat(client, model="prefixed", messages=[{"role": "user", "content": q}], max_tokens=8)
                 .choices[0].message.content for q in questions]
        assert alone == expected
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda q: _chat(client, model="prefixed", max_tokens=8, messages=[
                {"role": "user", "content": q}]).choices[0].message.content, questions))
        assert together == expected
    finally:
        app.stop()
        engine.stop()
