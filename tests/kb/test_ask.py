"""A conversation's last question put to a KB: the messages sent, or the reply; citing; opening."""

from __future__ import annotations

import pytest

from chattune.errors import ConfigError, DataError
from chattune.kb import store
from chattune.kb.ask import ask, check_settings, cited, open_for_answers
from chattune.kb.prompt import CANNOT_ANSWER_EN, CANNOT_ANSWER_ZH, kb_prompt


@pytest.fixture()
def kb(tmp_path):
    (tmp_path / "veldmoor.md").write_text("Veldmoor was founded by Oren Tal in 812.", encoding="utf-8")
    (tmp_path / "qinglan.txt").write_text("青岚港由渔夫林墨于公元620年创建。", encoding="utf-8")
    store.build([tmp_path / "veldmoor.md", tmp_path / "qinglan.txt"], tmp_path / "kb")
    return open_for_answers(tmp_path / "kb")


def test_the_last_question_is_replaced_by_the_kb_prompt(kb):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Who founded Veldmoor?"}]
    asked = ask(kb, history)
    hits = store.search(kb, "Who founded Veldmoor?")
    assert asked.reply is None and asked.question == "Who founded Veldmoor?"
    assert asked.messages == [*history[:2], {"role": "user", "content": kb_prompt(asked.question, hits).content}]
    assert asked.sources == [h.source() for h in hits] and len(hits) == 1
    assert asked.cite("Oren Tal.") == "Oren Tal. [1]"
    assert history[2]["content"] == "Who founded Veldmoor?"  # the caller's list is left alone


@pytest.mark.parametrize(("question", "reply"), [("What is the capital of France?", CANNOT_ANSWER_EN),
                                                 ("法国的首都是哪里？", CANNOT_ANSWER_ZH)])
def test_nothing_relevant_is_the_reply_in_the_questions_language(kb, question, reply):
    asked = ask(kb, [{"role": "user", "content": question}])
    assert (asked.messages, asked.prompt, asked.reply, asked.sources) == (None, None, reply, [])
    assert asked.cite(reply) == reply


def test_a_higher_threshold_or_fewer_chunks(kb):
    question = [{"role": "user", "content": "谁创建了青岚港？"}]
    assert ask(kb, question, threshold=1.0).reply == CANNOT_ANSWER_ZH
    assert len(ask(kb, question, top_k=1, threshold=0.0).sources) == 1


def test_bad_questions_and_settings(kb, tmp_path):
    with pytest.raises(DataError, match="^messages: the last message must be the user's question"):
        ask(kb, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    with pytest.raises(DataError, match="^query: 1001 characters, more than the limit of 1000"):
        ask(kb, [{"role": "user", "content": "x" * 1001}])
    with pytest.raises(ConfigError, match=r"^--kb-top-k: 0; expected at least 1$"):
        check_settings(0, 0.5)
    with pytest.raises(ConfigError, match=r"^--kb-threshold: -0.1; expected a relevance in \[0, 1\]"):
        check_settings(3, -0.1)
    with pytest.raises(ConfigError) as caught:
        open_for_answers(tmp_path)
    assert str(caught.value) == (f"--kb: {tmp_path}: no kb.json in it; expected a knowledge-base folder made "
                                 "by `chattune kb build`")
    assert cited("answer", "") == "answer" and cited("answer", "[1][2]") == "answer [1][2]"


def test_a_dense_kb_answers_the_same_way(tmp_path, tiny_embedder):
    (tmp_path / "veldmoor.md").write_text("Veldmoor was founded by Oren Tal in 812.", encoding="utf-8")
    store.build([tmp_path / "veldmoor.md"], tmp_path / "kb", embedding=tiny_embedder)
    kb = open_for_answers(tmp_path / "kb")
    asked = ask(kb, [{"role": "user", "content": "who founded veldmoor"}], threshold=0.0)
    assert asked.reply is None and asked.sources[0]["file"].endswith("veldmoor.md")
    assert "Veldmoor was founded by Oren Tal in 812." in asked.messages[0]["content"]
