"""``chattune serve``'s HTTP side: the real server on a loopback port over a tiny fine-tuned
model with two adapters, the official ``openai`` client (httpx for raw bodies), and the
``chattune serve`` command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from chattune.data.encode import EncodeOptions, PieceEncoder, encode_conversation, encode_prompt
from chattune.inference.generate import generate
from chattune.inference.runs import load_run
from tests.serve.helpers import ASK, KEY, TEMPLATES, chat, health, long_stream, wait_for

# -- the API with the official client ------------------------------------------------------


def test_chat_completion(client, server):
    reply = chat(client, max_tokens=8)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "a"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(server.served.prompt_ids(ASK, server.served.profiles["a"]))
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_greedy_answers_equal_generate(client, runs):
    run = load_run(str(runs["a"]))
    for question in ["Who are you?", "What is the capital of Veloria?", "你好"]:
        messages = [{"role": "user", "content": question}]
        expected = generate(run, [messages], max_new_tokens=12)[0]
        assert chat(client, messages=messages, max_tokens=12).choices[0].message.content == expected


@pytest.mark.parametrize("model", ["a", "b", "base"])
def test_stream_reassembles_to_the_non_streamed_text(client, model):
    whole = chat(client, model, max_tokens=16)
    chunks = list(chat(client, model, max_tokens=16, stream=True, stream_options={"include_usage": True}))
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
    answers = {m: chat(client, m, max_tokens=8, extra_body={"ignore_eos": True}).choices[0].message.content
               for m in ("a", "b", "base")}
    assert answers["a"] != answers["b"] and answers["b"] != answers["base"]
    assert answers["b"] and set(answers["b"]) <= set("Beep boop.")  # what b was taught to say
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "no-such-model", max_tokens=2)
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
        return chat(client, "base", max_tokens=12, temperature=1.0, seed=seed,
                    extra_body={"ignore_eos": True}).choices[0].message.content

    assert sampled(123) == sampled(123)


@pytest.mark.parametrize("model", ["a", "base"])
def test_top_k_1_samples_the_greedy_answer(client, model):
    greedy = chat(client, model, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    for seed in (1, 2):
        sampled = chat(client, model, max_tokens=12, temperature=1.0, seed=seed,
                       extra_body={"ignore_eos": True, "top_k": 1}).choices[0].message.content
        assert sampled == greedy


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
def test_the_prompt_is_what_training_encodes(client, server, prefilled, template):
    """The ids the engine feeds the model equal encode_prompt's and training's prefix up to the answer."""
    messages = [{"role": "system", "content": "You are Lumi."},
                {"role": "user", "content": "Summarise this.", "input": "A long text."},
                {"role": "assistant", "content": "A summary."},
                {"role": "user", "content": "Who are you?"}]
    name = f"tpl-{template}"
    profile = server.served.profiles[name]
    assert profile.template == template
    reply = chat(client, name, messages=messages, max_tokens=1)
    fed = [ids for adapter, ids in prefilled if adapter == profile.adapter]
    assert len(fed) == 1 and reply.usage.prompt_tokens == len(fed[0])
    encoder = PieceEncoder(server.served.tokenizer)
    assert fed[0] == encode_prompt(messages, template, encoder)
    trained = encode_conversation([*messages, {"role": "assistant", "content": "I am Lumi."}], template, encoder,
                                  EncodeOptions(max_seq_length=4096))
    n = len(fed[0])
    assert trained.input_ids[:n] == fed[0]
    assert trained.labels[n - 1] == -100 and trained.labels[n] != -100  # the answer starts right there


# -- clients that leave, and a full queue ------------------------------------------------------

def test_a_gone_non_streaming_client_frees_its_slot(server, slow_steps):
    cancelled = server.engine.counters["cancelled"]
    body = {"model": "base", "messages": ASK, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    wait_for(lambda: health(server)["running"] == 0)
    assert server.engine.counters["cancelled"] == cancelled + 1


def test_a_stream_is_not_blocked_and_a_gone_client_frees_its_slot(client, server, slow_steps):
    cancelled = server.engine.counters["cancelled"]
    long = long_stream(server)
    wait_for(lambda: health(server)["running"] == 1)
    started = time.monotonic()
    chunks = list(chat(client, max_tokens=8, stream=True, extra_body={"ignore_eos": True}))
    assert len(chunks) > 2 and time.monotonic() - started < 5
    assert health(server)["running"] == 1  # the long one is still going
    long.close()
    wait_for(lambda: health(server)["running"] == 0, 10)
    assert server.engine.counters["cancelled"] == cancelled + 1


def test_past_the_queue_429_with_retry_after(server, slow_steps):
    engine = server.engine
    limits = engine.max_batch, engine.max_waiting
    engine.max_batch, engine.max_waiting = 1, 1
    streams = []
    try:
        streams.append(long_stream(server))
        streams.append(long_stream(server))
        wait_for(lambda: health(server)["waiting"] == 1)
        reply = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "a", "messages": ASK})
        assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            chat(openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0), max_tokens=2)
    finally:
        for stream in streams:
            stream.close()
        engine.max_batch, engine.max_waiting = limits
    wait_for(lambda: health(server)["running"] == health(server)["waiting"] == 0)


# -- long conversations ------------------------------------------------------------------------

HEALTH_WITHIN = 0.5
"""Seconds /health may take while a long conversation is built: at most about 80 ms measured on two
busy cores (the whole minute of the rendering, when it was rendered on the event loop)."""
STREAM_SILENT_AT_MOST = 1.0
"""Seconds a running stream may go without a chunk meanwhile (at most about 60 ms measured)."""


def test_a_long_conversation_holds_up_no_stream_and_no_health_check(server, slow_steps, scripted):
    """5,000 messages whose users' text alone fits the context, so the server renders them all:
    meanwhile a running stream's tokens keep coming and /health answers at once."""
    url, key = server.keyed_url, {"Authorization": f"Bearer {KEY}"}  # 180 KB: past the open server's limit
    scripted(" hello" * 1500)  # a chunk of text every step
    http = httpx.Client(timeout=600, headers=key)
    streamed = {"model": "base", "messages": ASK, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    stream = http.send(http.build_request("POST", f"{url}/v1/chat/completions", json=streamed), stream=True)
    lines = stream.iter_lines()
    assert next(lines).startswith("data: ")
    arrivals, done = [], threading.Event()

    def read():
        for _ in lines:
            arrivals.append(time.monotonic())
            if done.is_set():
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(4999)]
    reply = {}
    big = threading.Thread(target=lambda: reply.update(answer=http.post(
        f"{url}/v1/chat/completions", json={"model": "a", "messages": messages, "max_tokens": 4})))
    waits = []
    started = time.monotonic()
    big.start()
    while True:
        asked = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=600).json()["status"] == "ok"
        waits.append(time.monotonic() - asked)
        if not big.is_alive():
            break
        time.sleep(0.02)
    ended = time.monotonic()
    big.join()
    done.set()
    reader.join(30)
    stream.close()
    http.close()
    error = reply["answer"].json()["error"]
    assert reply["answer"].status_code == 400 and (error["code"], error["param"]) == ("context_length_exceeded",
                                                                                      "messages")
    assert "the prompt is at least" in error["message"]  # counted as far as the context, then refused
    heard = [started, *(t for t in arrivals if started < t < ended), ended]
    silent = max(later - earlier for earlier, later in zip(heard, heard[1:], strict=False))
    assert max(waits) < HEALTH_WITHIN and silent < STREAM_SILENT_AT_MOST, (waits, silent)
    wait_for(lambda: health(server)["running"] == 0)


def test_users_text_past_the_context_is_refused_before_rendering(server, monkeypatch):
    served = server.served
    rendered = []
    monkeypatch.setattr(served, "prompt_ids", lambda *args, **kwargs: rendered.append(args))
    text = "x" * (served.encoder.widest_token * served.context_length)  # no token has more of them
    reply = httpx.post(f"{server.url}/v1/chat/completions",
                       json={"model": "a", "messages": [{"role": "user", "content": text}]})
    error = reply.json()["error"]
    assert reply.status_code == 400 and (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert f"at least {served.context_length} tokens" in error["message"] and rendered == []


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
    "top_k negative": ("chat", {"messages": MSG, "top_k": -1}, "top_k"),
    "top_k not an integer": ("chat", {"messages": MSG, "top_k": 1.5}, "top_k"),
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
    "completion top_k negative": ("completions", {"prompt": "hi", "top_k": -3}, "top_k"),
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
    assert health(server)["status"] == "ok"


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
    assert chat(good, max_tokens=2).choices[0].message.content is not None
    assert [m.id for m in good.models.list()][0] == "a"
    with pytest.raises(openai.AuthenticationError) as caught:
        chat(bad, max_tokens=2)
    assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.keyed_url}/v1/models").status_code == 401
    assert httpx.get(f"{server.keyed_url}/health").status_code == 200


# -- the command -------------------------------------------------------------------------------

def test_chattune_serve_command(runs):
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

        wait_for(up, 90)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["a", "b", "base"]
        assert httpx.get(f"{url}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("template", ["moss", "alpaca", "tutorial-alpaca", "gpt4all"])
def test_the_server_stops_at_the_templates_stop_string(server, client, monkeypatch, template):
    """MOSS's ``<eom>``, Alpaca's next ``### Instruction:``, the tutorial's ``END``, GPT4All's
    ``### Human``: the served answer ends before them, finish reason ``stop``."""
    from chattune.templates.registry import NAMED_TEMPLATES

    tokenizer = server.served.tokenizer
    stop = NAMED_TEMPLATES[template].stop_strings[0]
    plan = (tokenizer("Hello there", add_special_tokens=False)["input_ids"]
            + tokenizer(stop, add_special_tokens=False)["input_ids"]
            + tokenizer(" and more", add_special_tokens=False)["input_ids"])
    decoder = server.engine.decoder
    forward = decoder._forward
    steps = [0]

    def forced(*args, **kwargs):
        logits, cache = forward(*args, **kwargs)
        logits[:, plan[min(steps[0], len(plan) - 1)]] += 1e4
        steps[0] += 1
        return logits, cache

    monkeypatch.setattr(decoder, "_forward", forced)
    reply = chat(client, model=f"tpl-{template}", max_tokens=len(plan) + 4)
    assert reply.choices[0].message.content.strip() == "Hello there"
    assert reply.choices[0].finish_reason == "stop"
