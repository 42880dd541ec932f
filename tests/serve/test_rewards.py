"""``chattune serve RM_RUN``: a reward model over HTTP. ``POST /v1/rewards`` scores one
conversation or several as the scorer does, a bad body is a 400 naming the field, the generating
routes say it is a reward model, and a chat model's server says it is not one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from chattune.errors import ConfigError
from tests.serve.server_thread import ServerThread


def _args(run_dir, **overrides) -> SimpleNamespace:
    values = {"run_dir": str(run_dir), "adapter": [], "name": None, "base_model": None, "force": False,
              "trust_remote_code": False, "api_key": None, "max_batch": 16, "max_queue": 64, "max_body_bytes": None,
              "threads": None, "no_ui": False, "runs_dir": None, "kb": [], "kb_top_k": 4, "kb_threshold": 0.0}
    values.update(overrides)
    return SimpleNamespace(**values)


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def rm_server(rm_run):
    from chattune.serve import build

    scorer, engine, app = build(_args(rm_run.output_dir, name="judge"), warn=lambda *_: None)
    assert engine is None
    thread = ServerThread(app).start()
    yield SimpleNamespace(url=thread.url, scorer=scorer)
    thread.stop()


def _post(server, body, path="/v1/rewards", **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def test_rewards_score_conversations_as_the_scorer_does(rm_server, reward_pairs):
    pairs = json.loads(reward_pairs["held"].read_text())[:6]
    conversations = [_conversation(p["instruction"], p[side]) for p in pairs for side in ("chosen", "rejected")]
    response = _post(rm_server, {"model": "judge", "messages": conversations})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "judge" and body["usage"]["prompt_tokens"] > 0
    assert [d["index"] for d in body["data"]] == list(range(12))
    rewards = [d["reward"] for d in body["data"]]
    assert rewards == pytest.approx(rm_server.scorer.score(conversations), abs=1e-5)
    assert all(rewards[2 * i] > rewards[2 * i + 1] for i in range(6))
    single = _post(rm_server, {"messages": conversations[0]}).json()  # one conversation, no model: the default
    assert single["data"] == [{"object": "reward", "index": 0, "reward": pytest.approx(rewards[0], abs=1e-5)}]


@pytest.mark.parametrize("body,param,words", [
    ({}, "messages", "Field required"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [[{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]]}, "messages[0][1].role",
     "'assistant'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}, "messages[1].content",
     "valid string"),
    ({"messages": [_conversation("a", "b"), [{"role": "user", "content": "hi"}]]}, "messages[1]",
     "expected a conversation"),
    ({"messages": [_conversation("a", "b"), [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]]},
     "messages[1][1].role", "expected 'assistant'"),
    ({"messages": [_conversation("a", "b")], "model": "other"}, "model", "does not exist"),
])
def test_a_bad_body_is_a_400_naming_the_field(rm_server, body, param, words):
    response = _post(rm_server, body)
    assert response.status_code == (404 if param == "model" else 400), response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_a_reward_model_generates_nothing(rm_server):
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = _post(rm_server, {"model": "judge", "messages": [{"role": "user", "content": "hi"}],
                                     "prompt": "hi"}, path)
        assert response.status_code == 400
        assert "is a reward model" in response.json()["error"]["message"]
    models = httpx.get(f"{rm_server.url}/v1/models").json()["data"]
    assert [(m["id"], m["reward_model"]) for m in models] == [("judge", True)]
    assert httpx.get(f"{rm_server.url}/health").json()["status"] == "ok"


def test_a_chat_model_is_not_a_reward_model(tiny_models):
    from chattune.inference.runs import load_run
    from chattune.serve.app import create_app
    from chattune.serve.engine import Engine

    served = load_run(str(tiny_models("llama")))
    engine = Engine(served.model, pad_token_id=served.tokenizer.pad_token_id)  # not started: nothing generates
    thread = ServerThread(create_app(served, engine, ui=False)).start()
    try:
        response = httpx.post(f"{thread.url}/v1/rewards", json={"messages": [_conversation("a", "b")]}, timeout=30)
    finally:
        thread.stop()
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "not_a_reward_model" and "is not a reward model" in error["message"]


def test_a_reward_model_is_served_alone_and_keyed(rm_run):
    from chattune.serve import build

    with pytest.raises(ConfigError, match="--adapter: .* is a reward model"):
        build(_args(rm_run.output_dir, adapter=[f"other={rm_run.output_dir}"]))
    _, _, app = build(_args(rm_run.output_dir, api_key="k3y"), warn=lambda *_: None)
    thread = ServerThread(app).start()
    try:
        body = {"messages": _conversation("a", "b")}
        assert httpx.post(f"{thread.url}/v1/rewards", json=body, timeout=30).status_code == 401
        keyed = httpx.post(f"{thread.url}/v1/rewards", json=body, headers={"Authorization": "Bearer k3y"}, timeout=30)
        assert keyed.status_code == 200 and len(keyed.json()["data"]) == 1
    finally:
        thread.stop()
