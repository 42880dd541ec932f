"""The server against hostile requests: a bad request fails alone (its batch neighbours, a
running stream included, finish normally), every field is checked to what the engine can
take, text that is not valid Unicode is a 400, memory stays flat under a stream of distinct
large prompts, and a fuzzed chat body never gets a 5xx."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.helpers import ASK, KEY, health


def post_raw(server, body: str, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    """POST a JSON text as it is (httpx's ``json=`` cannot send a lone surrogate escape)."""
    return httpx.post(f"{server.url}{path}", content=body.encode("ascii"), timeout=60,
                      headers={"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


class Stream:
    """A streamed chat request of ``max_tokens`` tokens, its first event read. 80 tokens take at
    least 0.4 s under ``slow_steps``; :meth:`assert_running` checks that the stream was still
    being generated after what a test did beside it."""

    def __init__(self, server, max_tokens: int = 80):
        body = {"model": "base", "messages": ASK, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        self.engine = server.engine
        self.http = httpx.Client(timeout=60)
        self.response = self.http.send(self.http.build_request(
            "POST", f"{server.url}/v1/chat/completions", json=body), stream=True)
        self.lines = self.response.iter_lines()
        assert next(self.lines).startswith("data: ")

    def assert_running(self) -> None:
        assert self.engine.stats()["running"] == 1, "the stream had ended: nothing ran beside it"

    def rest(self) -> list[str]:
        """Every other event, to the end."""
        events = [line for line in self.lines if line]
        self.response.close()
        self.http.close()
        return events


def assert_finished_normally(events: list[str]) -> None:
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert not [c for c in chunks if "error" in c], chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.usefixtures("slow_steps")
@pytest.mark.parametrize("seed", [2**64, 2**64 + 5, -2**63 - 1, 10**40])
def test_a_seed_out_of_range_is_a_400_and_the_running_stream_finishes(server, seed):
    stream = Stream(server)
    reply = post_raw(server, json.dumps({"model": "base", "messages": ASK, "seed": seed, "max_tokens": 3}))
    assert reply.status_code == 400, reply.text
    stream.assert_running()
    assert reply.json()["error"]["param"] == "seed"
    assert_finished_normally(stream.rest())


@pytest.mark.parametrize("seed", [2**64 - 1, -2**63, 0])
def test_a_seed_at_the_edge_of_the_range_is_taken(server, seed):
    reply = post_raw(server, json.dumps({"model": "a", "messages": ASK, "seed": seed, "max_tokens": 3,
                                         "temperature": 1.0}))
    assert reply.status_code == 200, reply.text


@pytest.mark.usefixtures("slow_steps")
@pytest.mark.parametrize("where", [
    '{"model": "a", "messages": [{"role": "user", "content": "\\ud800 hi"}], "max_tokens": 3}',
    '{"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udfff"}]}]}',
    '{"model": "a", "messages": [{"role": "user", "content": "hi", "input": "\\udc00"}]}',
    '{"model": "a\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    '{"model": "a", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
])
def test_text_that_is_not_unicode_is_a_400_and_the_running_stream_finishes(server, where):
    stream = Stream(server)
    reply = post_raw(server, where)
    assert reply.status_code == 400, reply.text
    stream.assert_running()
    assert "Unicode" in reply.json()["error"]["message"]
    assert_finished_normally(stream.rest())


def test_a_completion_prompt_that_is_not_unicode_is_a_400(server):
    reply = post_raw(server, '{"model": "a", "prompt": "hi \\ud83d", "max_tokens": 2}', "/v1/completions")
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("field, value", [
    ("temperature", "NaN"), ("top_p", "NaN"), ("repetition_penalty", "Infinity"),
    ("repetition_penalty", "NaN"), ("presence_penalty", "NaN"), ("temperature", "1e400"),
])
def test_floats_must_be_finite(server, field, value):
    reply = post_raw(server, f'{{"model": "a", "messages": [{{"role": "user", "content": "hi"}}], '
                             f'"max_tokens": 2, "{field}": {value}}}')
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field


def test_an_integer_too_long_to_parse_is_a_400(server):
    reply = post_raw(server, '{"model": "a", "messages": [{"role": "user", "content": "hi"}], '
                             f'"max_tokens": {"9" * 5000}}}')
    assert reply.status_code == 400, reply.text


def _rss_mb() -> float:
    """This process's resident memory (the server runs in it, as a thread)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_memory_stays_flat_under_distinct_large_rejected_prompts(server):
    """Each ~100 KB prompt is too long for the model (a 400); none of it may stay behind."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(4000)]
    http = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"})

    def ask(i: int) -> None:
        text = f"{i} " + " ".join(rng.choices(words, k=16_000))  # ~ 100 KB
        reply = http.post(f"{server.keyed_url}/v1/chat/completions",
                          json={"model": "a", "messages": [{"role": "user", "content": text}], "max_tokens": 2})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"

    for i in range(20):  # the allocator's arenas settle
        ask(i)
    before = _rss_mb()
    for i in range(20, 120):
        ask(i)
    grown = _rss_mb() - before
    http.close()
    print(f"RSS {before:.0f} MB -> {before + grown:.0f} MB over 100 distinct rejected prompts")
    # 0.4 MB a prompt, as over 200 prompts before (80 MB); measured: about 1 MB in all
    assert grown < 40, f"RSS grew {grown:.0f} MB over 100 distinct rejected prompts"


# -- a fuzzed chat body ------------------------------------------------------------------------

ODD_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "x\udfff y", "\x00", "\ufffd", "🙂"]))
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), ODD_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(ODD_TEXT, inner, max_size=3)),
    max_leaves=6)
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), JSON),
     "content": st.one_of(ODD_TEXT, st.lists(st.fixed_dictionaries(
         {"type": st.one_of(st.just("text"), JSON), "text": st.one_of(ODD_TEXT, JSON)}), max_size=2), JSON)},
    optional={"input": st.one_of(ODD_TEXT, JSON), "name": JSON})
USER = st.fixed_dictionaries({"role": st.just("user"), "content": ODD_TEXT})
EDGE_FLOATS = st.sampled_from([0.0, 5e-324, 1e-300, 1e300, float("inf"), float("-inf"), float("nan"), -0.0])
EDGE_INTS = st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63 - 1, 10**30])
FIELDS = {  # each field's plausible values, edges included
    "model": st.sampled_from(["a", "b", "base", "tpl-chatml", "nope", "a\ud800"]),
    "max_tokens": st.one_of(st.integers(1, 4), EDGE_INTS),
    "max_completion_tokens": st.one_of(st.integers(1, 4), EDGE_INTS),
    "temperature": st.one_of(st.floats(0, 2), EDGE_FLOATS),
    "top_p": st.one_of(st.floats(0, 1), EDGE_FLOATS),
    "top_k": st.one_of(st.integers(0, 100), EDGE_INTS),
    "repetition_penalty": st.one_of(st.floats(0, 3), EDGE_FLOATS),
    "seed": st.one_of(st.integers(-2**65, 2**65), EDGE_INTS),
    "n": st.one_of(st.just(1), EDGE_INTS),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=3)),
    "presence_penalty": st.one_of(st.just(0.0), EDGE_FLOATS),
    "ignore_eos": st.booleans(),
    "user": ODD_TEXT,
}
MESSAGES = st.one_of(st.lists(USER, min_size=1, max_size=2), st.lists(MESSAGE, max_size=3))
JUNK = st.one_of(st.just({}), st.dictionaries(
    st.sampled_from([*FIELDS, "messages", "logprobs", "tools", "response_format"]), JSON, min_size=1, max_size=1))


def draw_body(data) -> dict:
    """A chat body: mostly valid, up to three fields at the edges of their range, maybe one junk field."""
    body = {"model": data.draw(st.one_of(st.just("a"), FIELDS["model"])),
            "messages": data.draw(st.one_of(st.just([{"role": "user", "content": "hi"}]), MESSAGES))}
    for name in data.draw(st.lists(st.sampled_from(list(FIELDS)), max_size=3, unique=True)):
        body[name] = data.draw(FIELDS[name])
    return {**body, **data.draw(JUNK)}


def _small(body: dict) -> dict:
    """No answer longer than 4 tokens: a valid but large ``max_tokens`` is cut to 4."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value < 10**9):
            body[name] = 4 if name == "max_tokens" else value
        elif value > 4:
            body[name] = 4
    if body.get("max_completion_tokens") is None:
        body.pop("max_completion_tokens", None)
    return body


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_fuzzed_chat_body_never_gets_a_5xx(server, data):
    body = draw_body(data)
    text = json.dumps(_small(body))  # (ASCII, with \u escapes and NaN/Infinity as Python writes them)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", content=text.encode("ascii"), timeout=60,
                      headers={"Content-Type": "application/json"}) as reply:
        events = [line for line in reply.iter_lines() if line]
    assert reply.status_code < 500, (reply.status_code, events, text)
    if reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream"):
        assert events[-1] == "data: [DONE]" and not [e for e in events if e.startswith('data: {"error"')], (events, text)
    else:
        json.loads("\n".join(events))
    assert health(server)["status"] == "ok"
