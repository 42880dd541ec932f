"""The generated world: enough facts, paraphrased questions, unique answers; BM25 finds them."""

from __future__ import annotations

import re

from chattune.kb import store
from tests.kb.world import fiction


def test_world_has_200_facts_in_two_languages_deterministically():
    documents, facts = fiction.world()
    assert len(facts) >= 200
    assert {f.language for f in facts} == {"en", "zh"}
    assert sum(f.language == "zh" for f in facts) >= 100
    assert len(documents) == 5 and all(f.file in documents for f in facts)
    assert all(text.count("\n\n") >= 10 for text in documents.values())  # paragraphs
    assert fiction.world() == (documents, facts)
    assert fiction.world(seed=1)[1] != facts


def test_each_answer_is_stated_once_and_questions_are_not_copied():
    documents, facts = fiction.world()
    corpus = "\n".join(documents.values())
    for fact in facts:
        assert corpus.count(fact.answer) == 1 and fact.answer in fact.sentence
        assert fact.question not in corpus
        # the question's words other than the subject's name are mostly not in its sentence
        words = set(re.findall(r"[a-z]+", fact.question.replace(fact.subject, "").lower())) - {"the", "of", "s"}
        if fact.language == "en":
            assert len(words & set(re.findall(r"[a-z]+", fact.sentence.lower()))) <= 1, fact


def test_bm25_finds_the_facts(tmp_path):
    facts = fiction.write_world(tmp_path / "docs")
    store.build([tmp_path / "docs"], tmp_path / "kb")
    kb = store.open_kb(tmp_path / "kb")
    found = sum(any(fact.answer in h.text for h in store.search(kb, fact.question, threshold=0.0))
                for fact in facts)
    assert found / len(facts) >= 0.9  # hit@3; benchmarks/kb_retrieval.py prints the table
    rejected = sum(not store.search(kb, q) for q in fiction.UNANSWERABLE)
    assert rejected / len(fiction.UNANSWERABLE) >= 0.9
