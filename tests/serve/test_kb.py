"""Answers from a knowledge base over the API (``chattune serve RUN --kb NAME=KB``), with the
official ``openai`` client: the ``MODEL+NAME`` twins, sources and markers (whole and
streamed), the exact prompt the model gets, the cannot-answer reply without a model call,
and the errors (400s naming ``messages``; one-line startup errors).

The session ``server``'s model and engine are served again by another app that has a KB of
the generated fictional world. A random tiny model answers nonsense, so the answer tests
script its output (the ``scripted`` fixture) and check what the server makes of it."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from chattune.cli import main
from chattune.errors import ConfigError
from chattune.kb import store
from chattune.kb.prompt import CANNOT_ANSWER_EN, CANNOT_ANSWER_ZH, TEMPLATE_EN, kb_prompt
from chattune.serve.app import create_app
from chattune.serve.retrieval import open_kbs, parse_kb
from tests.kb.world import fiction
from tests.serve.server_thread import ServerThread

ANSWER = "Oren Tal, a shipwright."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The fictional world's documents built into a BM25 KB; (KB folder, facts)."""
    root = tmp_path_factory.mktemp("kb-world")
    facts = fiction.write_world(root / "docs")
    store.build([root / "docs"], root / "kb")
    return root / "kb", facts


@pytest.fixture(scope="module")
def kb_server(server, world):
    """The session's models, each also as ``MODEL+docs``, answering from the world's KB."""
    thread = ServerThread(create_app(server.served, server.engine, kbs=open_kbs([f"docs={world[0]}"]),
                                     ui=False)).start()
    yield thread.url
    thread.stop()


@pytest.fixture
def client(kb_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{kb_server}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, question: str, model: str = "a+docs", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          **{"temperature": 0, "max_tokens": 40, **kw})


def first_fact(world, language: str):
    """The first fact in ``language`` whose best hit states it, and the hits for its question."""
    kb, facts = world
    for fact in facts:
        hits = store.search(kb, fact.question) if fact.language == language else []
        if hits and fact.answer in hits[0].text:
            return fact, hits
    raise AssertionError(f"no {language} fact found first")


# -- the models --------------------------------------------------------------------------------

def test_every_model_has_a_kb_twin(client, server, world):
    ids = [m.id for m in client.models.list()]
    assert ids == ["a", "b", *[f"tpl-{n}" for n in _templates()], "base",
                   "a+docs", "b+docs", *[f"tpl-{n}+docs" for n in _templates()], "base+docs"]
    card = client.models.retrieve("a+docs")
    assert card.id == "a+docs" and card.model_extra["template"] == server.served.profiles["a"].template
    assert card.model_extra["knowledge_base"] == {"name": "docs", "path": str(world[0]), "top_k": store.TOP_K,
                                                  "threshold": store.THRESHOLD}
    assert httpx.get(str(client.base_url).replace("/v1/", "/health")).json()["models"] == ids
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "Who?", model="a+nothing")
    assert "a+docs" in caught.value.body["message"]


def _templates():
    from tests.serve.helpers import TEMPLATES

    return TEMPLATES


# -- answers -----------------------------------------------------------------------------------

def test_an_answer_carries_sources_and_markers(client, server, world, scripted, prefilled):
    fact, hits = first_fact(world, "en")
    scripted(ANSWER)
    reply = ask(client, fact.question)
    markers = "".join(f"[{n}]" for n in range(1, len(hits) + 1))
    assert reply.model == "a+docs" and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == f"{ANSWER} {markers}"
    assert reply.model_extra["sources"] == [h.source() for h in hits]
    assert [set(s) for s in reply.model_extra["sources"]] == [{"file", "chunk", "score"}] * len(hits)
    [(adapter, ids)] = prefilled
    profile = server.served.profiles["a"]
    expected = kb_prompt(fact.question, hits).content
    assert adapter == profile.adapter
    assert ids == server.served.prompt_ids([{"role": "user", "content": expected}], profile)
    shown = server.served.tokenizer.decode(ids)
    assert hits[0].text in shown and fact.answer in shown
    assert TEMPLATE_EN.split("{context}")[0] in shown and f"<question>{fact.question}</question>" in shown


def test_the_earlier_turns_are_kept_and_only_the_question_is_replaced(client, server, world, scripted, prefilled):
    fact, hits = first_fact(world, "zh")
    scripted("林墨")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
               {"role": "assistant", "content": "你好！"}, {"role": "user", "content": fact.question}]
    reply = client.chat.completions.create(model="b+docs", messages=history, temperature=0, max_tokens=20)
    assert reply.choices[0].message.content.endswith(" " + "".join(f"[{n}]" for n in range(1, len(hits) + 1)))
    [(_, ids)] = prefilled
    sent = [*history[:-1], {"role": "user", "content": kb_prompt(fact.question, hits).content}]
    assert ids == server.served.prompt_ids(sent, server.served.profiles["b"])
    assert "<指令>根据已知信息" in server.served.tokenizer.decode(ids)


def test_a_streamed_answer_has_sources_first_and_markers_last(client, world, scripted):
    fact, hits = first_fact(world, "en")
    scripted(ANSWER, ANSWER)
    whole = ask(client, fact.question)
    chunks = list(ask(client, fact.question, stream=True, stream_options={"include_usage": True}))
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion()
    assert final.choices[0].message.content == whole.choices[0].message.content
    assert chunks[0].model_extra["sources"] == whole.model_extra["sources"] == [h.source() for h in hits]
    assert all("sources" not in c.model_extra for c in chunks[1:])
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents[-1] == " " + "".join(f"[{n}]" for n in range(1, len(hits) + 1))
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].delta.content is None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize(("question", "reply"), [(fiction.UNANSWERABLE[0], CANNOT_ANSWER_EN),
                                                 (fiction.UNANSWERABLE[10], CANNOT_ANSWER_ZH)])
def test_nothing_relevant_gets_the_cannot_answer_reply_without_the_model(client, server, prefilled, question,
                                                                         reply):
    steps = server.engine.counters["steps"]
    whole = ask(client, question)
    assert whole.choices[0].message.content == reply and whole.choices[0].finish_reason == "stop"
    assert whole.model_extra["sources"] == [] and whole.usage.total_tokens == 0
    assert whole.model == "a+docs" and whole.id.startswith("chatcmpl-")
    chunks = list(ask(client, question, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model_extra["sources"] == []
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert prefilled == [] and server.engine.counters["steps"] == steps


# -- errors ------------------------------------------------------------------------------------

def test_a_question_over_the_limit_is_a_400_naming_messages(client):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "x" * (store.MAX_QUERY_CHARS + 1))
    body = caught.value.body
    assert body["param"] == "messages"
    assert body["message"] == (f"messages[0].content: {store.MAX_QUERY_CHARS + 1} characters, more than the "
                               f"limit of {store.MAX_QUERY_CHARS}; expected a shorter question")


def test_a_prompt_longer_than_the_context_is_a_400_naming_messages(client, server, world):
    fact, _ = first_fact(world, "en")
    history = [{"role": "user", "content": "lorem ipsum " * server.served.context_length},
               {"role": "assistant", "content": "ok"}, {"role": "user", "content": fact.question}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="a+docs", messages=history, max_tokens=5)
    assert caught.value.body["param"] == "messages" and caught.value.body["code"] == "context_length_exceeded"


def test_a_kb_model_takes_no_tools_and_answers_the_users_question(kb_server):
    tools = [{"type": "function", "function": {"name": "f"}}]
    response = httpx.post(f"{kb_server}/v1/chat/completions",
                          json={"model": "a+docs", "messages": [{"role": "user", "content": "Hi"}], "tools": tools})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


def test_startup_errors_are_one_line(tmp_path, world):
    (tmp_path / "plain").mkdir()
    cases = {
        "docs": "--kb: expected NAME=KB (a name and a knowledge-base folder), got 'docs'",
        "=x": "--kb: expected NAME=KB (a name and a knowledge-base folder), got '=x'",
        f"docs={tmp_path / 'plain'}": f"--kb docs: {tmp_path / 'plain'}: no kb.json in it; expected a "
                                       "knowledge-base folder made by `chattune kb build`",
        "a+b=x": "--kb a+b=x: the name 'a+b' may not hold spaces or '+'; expected a plain name like docs "
                 "(served as MODEL+docs)",
    }
    for given, message in cases.items():
        with pytest.raises(ConfigError) as caught:
            open_kbs([given])
        assert str(caught.value) == message
    with pytest.raises(ConfigError, match=r"^--kb docs=.*: the name 'docs' is given twice"):
        open_kbs([f"docs={world[0]}", f"docs={world[0]}"])
    with pytest.raises(ConfigError, match=r"^--kb-threshold: 1.5; expected a relevance in \[0, 1\]"):
        open_kbs([f"docs={world[0]}"], threshold=1.5)
    with pytest.raises(ConfigError, match=r"^--kb-top-k: 0; expected at least 1$"):
        open_kbs([f"docs={world[0]}"], top_k=0)
    assert parse_kb(" docs = some/kb ") == ("docs", "some/kb")
    assert open_kbs([]) is None


def test_an_empty_kb_is_refused_at_startup(tmp_path, world):
    kb = tmp_path / "kb"
    (tmp_path / "one.txt").write_text("Just one line.", encoding="utf-8")
    store.build([tmp_path / "one.txt"], kb)
    store.remove(kb, [str(tmp_path / "one.txt")])
    with pytest.raises(ConfigError) as caught:
        open_kbs([f"docs={kb}"])
    assert str(caught.value) == (f"--kb docs: {kb}: the knowledge base holds no chunks; add documents with "
                                 "`chattune kb add`")


def test_the_serve_command_stops_at_a_bad_kb_before_loading(tmp_path, capsys):
    code = main(["serve", str(tmp_path / "no-run"), "--kb", f"docs={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"chattune: error: --kb docs: {tmp_path}: no kb.json in it; expected a "
                                 "knowledge-base folder made by `chattune kb build`\n")


def test_a_kb_twin_may_not_take_a_served_models_name(server, world):
    from chattune.serve.retrieval import kb_profiles

    kbs = open_kbs([f"docs={world[0]}"])
    profile = server.served.profiles["a"]
    with pytest.raises(ConfigError) as caught:
        kb_profiles({"a": profile, "a+docs": profile}, kbs)
    assert str(caught.value) == ("--kb docs: the model name 'a+docs' is taken by a served run; expected another "
                                 "KB name")
    assert list(kb_profiles({"a": profile}, kbs)) == ["a+docs"] and kb_profiles({"a": profile}, None) == {}
