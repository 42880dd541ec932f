"""Tokens and relevance: BM25's normalized score and the dense cosine, both in [0, 1]."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chattune.kb.index import Bm25Index, DenseIndex, has_cjk, tokenize


def test_tokenize_chinese_by_jieba_english_by_lowercase_words_without_stopwords():
    assert tokenize("青岚港由渔夫林墨于公元620年创建。Veldmoor was Founded in 812, by Oren-Tal!") == [
        "青岚港", "由", "渔夫", "林墨于", "公元", "620", "年", "创建",
        "veldmoor", "founded", "812", "oren", "tal"]
    assert tokenize("是谁建立了青松港？") == ["建立", "青松", "港"]
    assert tokenize("What is the?") == []


def test_has_cjk():
    assert has_cjk("Who founded 青岚港?") and not has_cjk("Who founded Veldmoor?")


CORPUS = ["alpha beta gamma delta", "alpha epsilon zeta eta", "theta iota kappa lambda"]


def test_bm25_all_terms_once_in_an_average_chunk_is_one():
    index = Bm25Index(CORPUS)
    assert index.relevance("beta gamma") == pytest.approx([1.0, 0.0, 0.0])


def test_bm25_relevance_is_the_idf_weighted_share_of_the_query():
    index = Bm25Index(CORPUS)
    # beta and zeta are equally rare: a chunk holding one of the two gets half
    assert index.relevance("beta zeta") == pytest.approx([0.5, 0.5, 0.0])
    # a word no chunk has is never found, and weighs more than any word found (df = 0)
    beta, unseen = math.log(1 + 2.5 / 1.5), math.log(1 + 3.5 / 0.5)
    assert index.idf("beta") == pytest.approx(beta) and index.idf("unheardof") == pytest.approx(unseen)
    assert index.relevance("beta unheardof") == pytest.approx([beta / (beta + unseen), 0.0, 0.0])
    # a common word weighs less than a rare one
    common, rare = index.relevance("alpha theta")[[0, 2]]
    assert 0 < common < rare < 1


def test_bm25_relevance_capped_at_one_and_zero_for_nothing_in_common():
    index = Bm25Index(["beta beta beta", "gamma", "delta"])
    scores = index.relevance("beta")
    assert scores[0] == 1.0 and scores.dtype == np.float32
    assert index.relevance("omega").tolist() == [0.0, 0.0, 0.0]
    assert index.relevance("the what?").tolist() == [0.0, 0.0, 0.0]  # stopwords only


def test_bm25_repeated_query_words_count_once():
    index = Bm25Index(CORPUS)
    assert index.relevance("beta beta zeta").tolist() == index.relevance("beta zeta").tolist()


def test_dense_relevance_is_cosine_clamped_at_zero():
    vectors = np.array([[1, 0], [0, 1], [-1, 0], [0.6, 0.8]], dtype=np.float32)
    index = DenseIndex(vectors)
    assert index.relevance(np.array([1, 0], dtype=np.float32)) == pytest.approx([1.0, 0.0, 0.0, 0.6])
