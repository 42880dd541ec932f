"""Score chunks against a question: BM25 over jieba-segmented text, or dense embeddings.

Both backends give every chunk a **relevance in [0, 1], higher = more similar**, so a
threshold means the same whatever the backend (Langchain-Chatchat's users stumbled over a
threshold that was a distance in one version and a similarity in the next):

- **BM25** (``bm25s``, its default "lucene" variant, k1=1.5, b=0.75): the chunk's BM25
  score divided by the score that a chunk of average length containing every query term
  once would get, capped at 1. That is the IDF-weighted share of the question's terms
  found in the chunk: 1.0 = all of them, 0.5 = terms carrying half of the question's
  weight; words that occur in no chunk count with the largest IDF, so a question about
  things the knowledge base never mentions scores low. Rare words weigh more than
  common ones ("the", "的" weigh almost nothing).
- **dense**: the cosine similarity of the normalized embeddings (faiss ``IndexFlatIP``),
  negative values clamped to 0: 1.0 = same direction, 0 = unrelated.

Tokens: Chinese runs are segmented by jieba (its search mode, which also yields the
shorter words inside long ones); other text becomes lowercase words of letters and
digits; question and function words (:data:`STOPWORDS`) are left out.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter

import numpy as np

TOKENIZER = "jieba-search+lowercase-words+stopwords-v1"
K1 = 1.5
B = 0.75
METHOD = "lucene"

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK = re.compile(f"[{_HAN}]+")
_TOKEN = re.compile(f"[{_HAN}]+|(?:(?![{_HAN}])[^\\W_])+")

# Question and function words: left out of documents and questions alike, so that the
# words every question has ("what", "哪个") do not lower every chunk's relevance.
STOPWORDS = frozenset("""
a an the of in on at to for from by with and or but as is are was were be been being it its
this that these those there here do does did what which who whom whose when where why how
can could would should will shall may might i you he she we they me my your our their his her
about into than then so if not no yes please tell know any some
的 了 是 在 和 与 及 或 吗 呢 吧 啊 呀 么 什么 哪 哪个 哪些 哪里 哪儿 哪一 谁 几 多少 怎么 怎样 如何
为什么 为何 请问 请 告诉 我 你 他 她 它 我们 你们 他们 这 那 这个 那个 有 也 都 就 被 把 给 对 一个
""".split())


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds any CJK ideograph (then it is treated as Chinese)."""
    return bool(_CJK.search(text))


def tokenize(text: str) -> list[str]:
    """The BM25 tokens of ``text``: jieba words for Chinese runs, lowercase words for the rest."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    tokens: list[str] = []
    for match in _TOKEN.finditer(text.lower()):
        run = match.group()
        if _CJK.fullmatch(run):
            tokens.extend(word for word in jieba.lcut_for_search(run) if word not in STOPWORDS)
        elif run not in STOPWORDS:
            tokens.append(run)
    return tokens


class Bm25Index:
    """BM25 over chunk texts (re-indexed from the texts: cheap), scoring relevance in [0, 1]."""

    def __init__(self, texts: list[str], k1: float = K1, b: float = B):
        import bm25s

        self.k1, self.b = k1, b
        corpus = [tokenize(text) for text in texts]
        self.size = len(corpus)
        self.doc_freq = Counter(token for tokens in corpus for token in set(tokens))
        self.retriever = bm25s.BM25(k1=k1, b=b, method=METHOD)
        if corpus:
            self.retriever.index(corpus, show_progress=False)

    def idf(self, token: str) -> float:
        """The lucene IDF of ``token``: log(1 + (N - df + 0.5) / (df + 0.5)), df = 0 if unseen."""
        df = self.doc_freq.get(token, 0)
        return math.log(1 + (self.size - df + 0.5) / (df + 0.5))

    def relevance(self, query: str) -> np.ndarray:
        """Every chunk's relevance to ``query`` in [0, 1] (see the module doc)."""
        tokens = list(dict.fromkeys(tokenize(query)))
        if not tokens or not self.size:
            return np.zeros(self.size, dtype=np.float32)
        known = [t for t in tokens if t in self.doc_freq]
        scores = (np.asarray(self.retriever.get_scores(known), dtype=np.float64) if known
                  else np.zeros(self.size))
        # bm25s's lucene score of one term found once in a chunk of average length: idf / (1 + k1)
        reference = sum(self.idf(t) for t in tokens) / (1 + self.k1)
        return np.clip(scores / reference, 0.0, 1.0).astype(np.float32)


class DenseIndex:
    """Normalized embeddings in a faiss ``IndexFlatIP``, scoring max(cosine, 0)."""

    def __init__(self, embeddings: np.ndarray):
        import faiss

        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.size, self.dim = vectors.shape
        self.index = faiss.IndexFlatIP(self.dim)
        if self.size:
            self.index.add(vectors)

    def relevance(self, query_vector: np.ndarray) -> np.ndarray:
        """Every chunk's relevance to a normalized query embedding, in [0, 1]."""
        if not self.size:
            return np.zeros(0, dtype=np.float32)
        query = np.ascontiguousarray(query_vector, dtype=np.float32).reshape(1, self.dim)
        scores, ids = self.index.search(query, self.size)
        out = np.zeros(self.size, dtype=np.float32)
        out[ids[0]] = scores[0]
        return np.clip(out, 0.0, 1.0)
