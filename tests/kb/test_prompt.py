"""The knowledge-base prompt (Langchain-Chatchat 0.2's), sources, footnotes and the cannot-answer reply."""

from __future__ import annotations

import pytest

from chattune.kb.prompt import (
    CANNOT_ANSWER_EN,
    CANNOT_ANSWER_ZH,
    cannot_answer,
    is_chinese,
    kb_prompt,
)
from chattune.kb.store import Hit

HITS = [Hit("docs/qinglan.txt", 0, "青岚港由渔夫林墨创建。", 0.91234),
        Hit("docs/veldmoor.md", 3, "Veldmoor stands on the Sel.", 0.5)]


def test_chinese_question_gets_langchain_chatchats_template():
    prompt = kb_prompt(" 谁建立了青岚港？ ", HITS)
    assert prompt.content == (
        "<指令>根据已知信息，简洁和专业的来回答问题。如果无法从中得到答案，请说 “根据已知信息无法回答该问题”，"
        "不允许在答案中添加编造成分，答案请使用中文。 </指令>\n"
        "<已知信息>青岚港由渔夫林墨创建。\nVeldmoor stands on the Sel.</已知信息>\n"
        "<问题>谁建立了青岚港？</问题>")


def test_english_question_gets_the_english_instruction():
    prompt = kb_prompt("Which river runs past Veldmoor?", HITS[1:])
    assert prompt.content == (
        "<instruction>Answer the question concisely and professionally from the known information. "
        "If the answer cannot be found in it, say \"The question cannot be answered from the known "
        "information\". Do not add anything made up. Answer in English. </instruction>\n"
        "<known_information>Veldmoor stands on the Sel.</known_information>\n"
        "<question>Which river runs past Veldmoor?</question>")


def test_sources_markers_and_footnotes():
    prompt = kb_prompt("谁建立了青岚港？", HITS)
    assert prompt.sources == [{"file": "docs/qinglan.txt", "chunk": 0, "score": 0.9123},
                              {"file": "docs/veldmoor.md", "chunk": 3, "score": 0.5}]
    assert prompt.markers == "[1][2]"
    assert prompt.footnotes == ("[1] docs/qinglan.txt, chunk 0 (score 0.91)\n"
                                "[2] docs/veldmoor.md, chunk 3 (score 0.50)")


def test_braces_in_chunks_are_kept_verbatim():
    prompt = kb_prompt("What is {x}?", [Hit("a.md", 0, "use {context} and {question}", 0.3)])
    assert "<known_information>use {context} and {question}</known_information>" in prompt.content
    assert "<question>What is {x}?</question>" in prompt.content


def test_cannot_answer_in_the_questions_language():
    assert cannot_answer("法国的首都是哪里？") == CANNOT_ANSWER_ZH == "根据已知信息无法回答该问题"
    assert cannot_answer("What is the capital of France?") == CANNOT_ANSWER_EN
    assert CANNOT_ANSWER_EN == "The question cannot be answered from the known information."
    assert is_chinese("Who founded 青岚港?") and not is_chinese("Who founded Veldmoor?")


def test_no_hits_is_a_programming_error():
    with pytest.raises(ValueError, match="no hits; reply with cannot_answer"):
        kb_prompt("Who?", [])
