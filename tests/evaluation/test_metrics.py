"""chattune.evaluation.metrics: ROUGE-1/2/L and BLEU-4 exactly as LLaMA-Factory's ComputeSimilarity.

Conventions used in the hand computations below:

* ROUGE runs on jieba tokens with whitespace tokens dropped. rouge_chinese counts
  DISTINCT n-grams (sets), P = overlap/|hyp n-grams|, R = overlap/|ref n-grams|
  (0 when a side has none), F = 2PR / (P + R + 1e-8). The 1e-8 only moves F by
  ~1e-8 relative, i.e. below the 4th decimal of F*100, so e.g. F = 0.75 -> 75.0.
  ROUGE-L: LCS over the word lists, P = LCS/len(hyp), R = LCS/len(ref).
* BLEU-4 runs on characters (spaces included): p_n = clipped matches / hyp n-grams
  (denominator at least 1); NLTK method3 replaces the k-th zero p_n by 1/(2^k * den);
  BP = 1 if len(hyp) > len(ref) else exp(1 - len(ref)/len(hyp));
  BLEU = BP * (p1 p2 p3 p4)^(1/4); no unigram match at all -> 0.
* Every value is x100 and rounded to 4 decimals; ``average`` is the mean of rows.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections import Counter

import pytest

from chattune.evaluation.metrics import METRIC_NAMES, average, exact_match, similarity


def _jieba_words(text: str) -> list[str]:
    import jieba

    from chattune.evaluation.metrics import _jieba

    _jieba()  # initialise quietly
    return " ".join(jieba.cut(text)).split()


def test_api_names():
    assert METRIC_NAMES == ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
    row = similarity("你好世界", "你好世界")
    assert tuple(row) == METRIC_NAMES
    assert all(type(v) is float for v in row.values())


# (1) identical strings ------------------------------------------------------------


def test_identical_chinese_is_100_everywhere():
    # jieba: 今天天气 / 很 / 好 on both sides.
    # ROUGE-1: 3 of 3 unigrams -> P = R = 1, F = 2/(2 + 1e-8) = 0.999999995 -> 99.9999995 -> 100.0
    # ROUGE-2: 2 of 2 bigrams, ROUGE-L: LCS 3 of 3 -> same, 100.0
    # BLEU: 6 chars; p1..p4 = 6/6, 5/5, 4/4, 3/3; BP = exp(1 - 6/6) = 1 -> 100.0
    assert _jieba_words("今天天气很好") == ["今天天气", "很", "好"]
    assert similarity("今天天气很好", "今天天气很好") == {
        "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}


def test_identical_single_token_is_not_100():
    # "猫" vs "猫": one word, so no bigram on either side -> ROUGE-2 P = R = 0 -> F = 0.
    # BLEU: p1 = 1/1; p2, p3, p4 = 0/1 -> method3: 1/2, 1/4, 1/8; BP = 1
    #   (1 * 1/2 * 1/4 * 1/8)^(1/4) = 2^(-6/4) = 0.35355339 -> 35.3553
    assert similarity("猫", "猫") == {
        "rouge-1": 100.0, "rouge-2": 0.0, "rouge-l": 100.0, "bleu-4": 35.3553}


# (2) Chinese pairs computed by hand -------------------------------------------------


def test_chinese_shorter_prediction_brevity_penalty_and_smoothing():
    pred, ref = "我喜欢苹果", "我喜欢吃苹果"
    assert _jieba_words(pred) == ["我", "喜欢", "苹果"]
    assert _jieba_words(ref) == ["我", "喜欢", "吃", "苹果"]
    # ROUGE-1: hyp {我, 喜欢, 苹果} (3), ref {我, 喜欢, 吃, 苹果} (4), overlap 3
    #   P = 3/3, R = 3/4, F = 2 * 0.75 / 1.75 = 6/7 = 0.857142857 -> 85.7143
    # ROUGE-2: hyp {我喜欢, 喜欢苹果} (2), ref {我喜欢, 喜欢吃, 吃苹果} (3), overlap 1
    #   P = 1/2, R = 1/3, F = 2 * (1/6) / (5/6) = 0.4 -> 40.0
    # ROUGE-L: LCS(我 喜欢 苹果, 我 喜欢 吃 苹果) = 3; P = 3/3, R = 3/4 -> 6/7 -> 85.7143
    # BLEU on characters, hyp 我喜欢苹果 (5), ref 我喜欢吃苹果 (6):
    #   1-grams: 我 喜 欢 苹 果 all in ref          -> 5/5
    #   2-grams: 我喜 喜欢 欢苹 苹果; 欢苹 missing    -> 3/4
    #   3-grams: 我喜欢 喜欢苹 欢苹果; only 我喜欢    -> 1/3
    #   4-grams: 我喜欢苹 喜欢苹果; none              -> 0/2 -> method3 k=1: 1/(2*2) = 1/4
    #   geometric mean (1 * 3/4 * 1/3 * 1/4)^(1/4) = (1/16)^(1/4) = 0.5
    #   BP = exp(1 - 6/5) = exp(-0.2) = 0.8187307531
    #   BLEU = 0.5 * 0.8187307531 = 0.4093653765 -> 40.9365
    assert 0.5 * math.exp(-0.2) == pytest.approx(0.4093653765)
    assert similarity(pred, ref) == {
        "rouge-1": 85.7143, "rouge-2": 40.0, "rouge-l": 85.7143, "bleu-4": 40.9365}


def test_chinese_same_length_substitution():
    pred, ref = "我喜欢吃苹果", "我喜欢吃香蕉"
    assert _jieba_words(pred) == ["我", "喜欢", "吃", "苹果"]
    assert _jieba_words(ref) == ["我", "喜欢", "吃", "香蕉"]
    # ROUGE-1: 3 of 4 words shared both ways -> P = R = 3/4 -> 75.0
    # ROUGE-2: {我喜欢, 喜欢吃, 吃苹果} vs {我喜欢, 喜欢吃, 吃香蕉}: 2 of 3 -> 66.6667
    # ROUGE-L: LCS 我 喜欢 吃 = 3 of 4 -> 75.0
    # BLEU, 6 chars each (BP = 1): p1 = 4/6 (我喜欢吃), p2 = 3/5 (我喜 喜欢 欢吃),
    #   p3 = 2/4 (我喜欢 喜欢吃), p4 = 1/3 (我喜欢吃)
    #   (4/6 * 3/5 * 2/4 * 1/3)^(1/4) = (24/360)^(1/4) = (1/15)^(1/4) = 0.5081327 -> 50.8133
    assert (1 / 15) ** 0.25 == pytest.approx(0.5081327, abs=1e-7)
    assert similarity(pred, ref) == {
        "rouge-1": 75.0, "rouge-2": 66.6667, "rouge-l": 75.0, "bleu-4": 50.8133}


# (3) English ------------------------------------------------------------------------


def test_english_distinct_ngrams_and_char_bleu():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    # jieba keeps English words whole and emits the spaces as tokens; they vanish on split.
    assert _jieba_words(pred) == ["the", "cat", "sat", "on", "the", "mat"]
    assert _jieba_words(ref) == ["the", "cat", "is", "on", "the", "mat"]
    # ROUGE-1 uses DISTINCT unigrams: {the, cat, sat, on, mat} vs {the, cat, is, on, mat}
    #   overlap 4, P = R = 4/5 -> 80.0   (counting "the" twice would give 5/6 = 83.3333)
    # ROUGE-2: {the cat, cat sat, sat on, on the, the mat} vs {the cat, cat is, is on, on the,
    #   the mat}: overlap 3 of 5 each -> 60.0
    # ROUGE-L: LCS "the cat on the mat" = 5, P = R = 5/6 -> 83.3333
    # BLEU on characters ("_" = space), hyp 22 chars, ref 21 chars -> BP = 1:
    #   1-grams hyp t5 h2 e2 _5 c1 a3 s1 o1 n1 m1 (22); ref t4 h2 e2 _5 c1 a2 i1 s1 o1 n1 m1
    #     clipped 4+2+2+5+1+2+1+1+1+1 = 20 -> 20/22
    #   2-grams (21): th2 he2 e_2 _c ca at3 t_2 _s sa _o on n_ _t _m ma; ref has at2 t_1, no _s/sa
    #     clipped 2+2+2+1+1+2+1+0+0+1+1+1+1+1+1 = 17 -> 17/21
    #   3-grams (20): the2 he_2 e_c _ca cat at_2 t_s _sa sat t_o _on on_ n_t _th e_m _ma mat;
    #     ref has at_ once, none of t_s _sa sat t_o -> 2+2+1+1+1+1+1+1+1+1+1+1+1 = 15 -> 15/20
    #   4-grams (19): the_2 he_c e_ca _cat cat_ at_s t_sa _sat sat_ at_o t_on _on_ on_t n_th _the
    #     he_m e_ma _mat; matched the_2 + he_c e_ca _cat cat_ _on_ on_t n_th _the he_m e_ma _mat
    #     = 2 + 11 = 13 -> 13/19
    #   BLEU = (20/22 * 17/21 * 15/20 * 13/19)^(1/4) = (66300/175560)^(1/4) = 0.7839204 -> 78.392
    assert (66300 / 175560) ** 0.25 == pytest.approx(0.7839204, abs=1e-7)
    assert similarity(pred, ref) == {
        "rouge-1": 80.0, "rouge-2": 60.0, "rouge-l": 83.3333, "bleu-4": 78.392}


def test_english_short_prediction():
    # words [big, dog] vs [big, dogs]: ROUGE-1 1 of 2 -> 50.0; ROUGE-2 {big dog} vs {big dogs}
    #   -> 0.0; ROUGE-L LCS 1 of 2 -> 50.0
    # BLEU: "big dog" (7) is a prefix of "big dogs" (8): p1..p4 = 7/7, 6/6, 5/5, 4/4;
    #   BP = exp(1 - 8/7) = exp(-1/7) = 0.8668779 -> 86.6878
    assert math.exp(-1 / 7) == pytest.approx(0.8668779, abs=1e-7)
    assert similarity("big dog", "big dogs") == {
        "rouge-1": 50.0, "rouge-2": 0.0, "rouge-l": 50.0, "bleu-4": 86.6878}


# (4) mixed Chinese / English ----------------------------------------------------------


def test_mixed_chinese_english():
    pred, ref = "我用Python写代码", "我用Java写代码"
    assert _jieba_words(pred) == ["我用", "Python", "写", "代码"]
    assert _jieba_words(ref) == ["我用", "Java", "写", "代码"]
    # ROUGE-1: 3 of 4 each way -> 75.0
    # ROUGE-2: {我用 Python, Python 写, 写 代码} vs {我用 Java, Java 写, 写 代码}: 1 of 3 -> 33.3333
    # ROUGE-L: LCS 我用 写 代码 = 3 of 4 -> 75.0
    # BLEU, hyp 11 chars (我 用 P y t h o n 写 代 码), ref 9 chars -> BP = 1:
    #   p1 = 5/11 (我 用 写 代 码), p2 = 3/10 (我用 写代 代码), p3 = 1/9 (写代码),
    #   p4 = 0/8 -> method3 k=1: 1/(2*8) = 1/16
    #   (5/11 * 3/10 * 1/9 * 1/16)^(1/4) = (1/1056)^(1/4) = 0.1754220 -> 17.5422
    assert (1 / 1056) ** 0.25 == pytest.approx(0.1754220, abs=1e-7)
    assert similarity(pred, ref) == {
        "rouge-1": 75.0, "rouge-2": 33.3333, "rouge-l": 75.0, "bleu-4": 17.5422}


# (5) empty and whitespace-only ------------------------------------------------------------

ZERO = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}


@pytest.mark.parametrize("pred, ref", [
    ("", "你好"),        # no token in the prediction -> ROUGE 0; no character -> BLEU 0
    ("你好", ""),        # no token in the reference -> ROUGE 0; nothing to match -> BLEU 0
    ("", ""),
    ("  ", "你好"),      # whitespace tokens only -> ROUGE 0; " " not in the reference -> BLEU 0
    ("你好", " \n "),
    ("\t", "a b"),       # "\t" is not " " -> no unigram match -> BLEU 0
])
def test_empty_sides_score_zero(pred, ref):
    assert similarity(pred, ref) == ZERO


def test_whitespace_only_on_both_sides_still_gets_bleu():
    # LLaMA-Factory zeroes ROUGE (no word on either side) but calls sentence_bleu anyway:
    # " " vs " ": p1 = 1/1, p2..p4 = 0/1 -> 1/2, 1/4, 1/8, BP = 1 -> 2^(-1.5) = 0.3535534 -> 35.3553
    assert similarity(" ", " ") == {
        "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 35.3553}
    # a space in the prediction matching one in the reference counts too:
    # "   " vs "a b": p1 = 1/3 (three spaces, clipped to the reference's one),
    #   p2 = 0/2 -> k=1: 1/(2*2) = 1/4, p3 = 0/1 -> k=2: 1/(4*1) = 1/4,
    #   p4 = 0/1 (no 4-gram; denominator floored at 1) -> k=3: 1/(8*1) = 1/8
    #   BP = exp(1 - 3/3) = 1 -> (1/3 * 1/4 * 1/4 * 1/8)^(1/4) = 384^(-1/4) = 0.2259005 -> 22.5901
    assert 384 ** -0.25 == pytest.approx(0.2259005, abs=1e-7)
    assert similarity("   ", "a b") == {
        "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 22.5901}


def test_strings_are_not_stripped():
    # A trailing space changes BLEU (characters) but not ROUGE (whitespace tokens vanish):
    # "big dog " (8 chars) vs "big dog" (7): p1 = 7/8 (" " clipped to 1), p2 = 6/7, p3 = 5/6,
    #   p4 = 4/5; BP = 1 -> (7/8 * 6/7 * 5/6 * 4/5)^(1/4) = (1/2)^(1/4) = 0.8408964 -> 84.0896
    assert similarity("big dog ", "big dog") == {
        "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 84.0896}


# (6) average -----------------------------------------------------------------------------


def test_average_is_plain_mean_of_rounded_rows():
    rows = [similarity("我喜欢吃苹果", "我喜欢吃香蕉"), similarity("我用Python写代码", "我用Java写代码")]
    # rouge-1 (75 + 75)/2 = 75; rouge-2 (66.6667 + 33.3333)/2 = 50; rouge-l 75;
    # bleu-4 (50.8133 + 17.5422)/2 = 34.17775 (not re-rounded)
    got = average(rows)
    assert list(got) == list(METRIC_NAMES)
    assert got == pytest.approx({"rouge-1": 75.0, "rouge-2": 50.0, "rouge-l": 75.0,
                                 "bleu-4": 34.17775}, abs=1e-12)
    assert all(type(v) is float for v in got.values())


def test_average_matches_numpy_mean_and_edge_cases():
    import numpy as np

    rows = [{"rouge-1": 1.1, "rouge-2": 0.0, "rouge-l": 2.0, "bleu-4": 35.3553},
            {"rouge-1": 2.2, "rouge-2": 0.0, "rouge-l": 3.0, "bleu-4": 0.0},
            {"rouge-1": 3.3, "rouge-2": 1.0, "rouge-l": 4.0, "bleu-4": 100.0}]
    assert average(rows) == {k: float(np.mean([r[k] for r in rows])) for k in METRIC_NAMES}
    assert average(rows[:1]) == rows[0]
    assert average([]) == {}


# (7) exact match --------------------------------------------------------------------------


@pytest.mark.parametrize("pred, ref, want", [
    ("你好", "你好", 100.0),
    ("  你好\n", "你好", 100.0),   # surrounding whitespace is stripped
    ("你 好", "你好", 0.0),        # inner whitespace is not
    ("Hello", "hello", 0.0),       # case matters
    ("", "  ", 100.0),
    ("", "a", 0.0),
])
def test_exact_match(pred, ref, want):
    assert exact_match(pred, ref) == want


# independent re-implementation ---------------------------------------------------------------


def _rouge_f(hyp: list[str], ref: list[str], n: int) -> float:
    h = {tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1)}
    r = {tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)}
    both = len(h & r)
    p = both / len(h) if h else 0.0
    rec = both / len(r) if r else 0.0
    return 2.0 * ((p * rec) / (p + rec + 1e-8))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _bleu4(pred: str, ref: str) -> float:
    h, r = list(pred), list(ref)
    parts = []
    for n in range(1, 5):
        hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        parts.append((sum(min(c, rc[g]) for g, c in hc.items()), max(1, sum(hc.values()))))
    if parts[0][0] == 0:
        return 0.0
    k, logs = 1, []
    for matched, total in parts:
        if matched == 0:
            value = 1 / (2 ** k * total)
            k += 1
        else:
            value = matched / total
        logs.append(0.25 * math.log(value))
    bp = 1.0 if len(h) > len(r) else math.exp(1 - len(r) / len(h))
    return bp * math.exp(math.fsum(logs))


def _reference_row(pred: str, ref: str) -> dict[str, float]:
    hyp, gold = _jieba_words(pred), _jieba_words(ref)
    if not hyp or not gold:
        r1 = r2 = rl = 0.0
    else:
        r1, r2 = _rouge_f(hyp, gold, 1), _rouge_f(hyp, gold, 2)
        lcs = _lcs(hyp, gold)
        p, rec = lcs / len(hyp), lcs / len(gold)
        rl = 2.0 * ((p * rec) / (p + rec + 1e-8))
    values = {"rouge-1": r1, "rouge-2": r2, "rouge-l": rl, "bleu-4": _bleu4(pred, ref)}
    return {k: round(v * 100, 4) for k, v in values.items()}


_VOCAB = ["我们", "今天", "天气", "很好", "喜欢", "吃", "苹果", "香蕉", "模型", "训练", "数据",
          "的", "了", "是", "不", "，", "。", "？", "！", "Python", "LoRA", " ", "model",
          " fine tune ", "微调", "参数", "学习率", "0.001", "GPU", "“好的”"]


def _pairs(seed: int, count: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ref_words = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 14))]
        pred_words = []
        for w in ref_words:
            roll = rng.random()
            if roll < 0.6:
                pred_words.append(w)
            elif roll < 0.75:
                pred_words.append(rng.choice(_VOCAB))
            elif roll < 0.9:
                pred_words += [w, w]        # repeats exercise distinct n-grams and clipping
        if rng.random() < 0.3:
            pred_words += [rng.choice(_VOCAB) for _ in range(rng.randint(1, 4))]
        out.append(("".join(pred_words), "".join(ref_words)))
    return out


HAND_PAIRS = [
    ("模型训练好了。我们开始微调吧！", "我们开始微调模型。训练好了吗？"),
    ("好的好的好的", "好的"),
    ("天气很好，天气很好", "今天天气很好"),
    ("the the the the", "the cat"),
    ("LoRA rank 8, alpha 16", "LoRA rank 16, alpha 32"),
    ("", "模型"), ("模型", ""), (" ", " "), ("   ", "a b"), ("。", "。"),
]


@pytest.mark.parametrize("pred, ref", HAND_PAIRS + _pairs(20240601, 40))
def test_matches_independent_reimplementation(pred, ref):
    assert similarity(pred, ref) == _reference_row(pred, ref)


# import cost, logging, no downloads ------------------------------------------------------------


def test_import_is_cheap_and_jieba_is_quiet():
    code = (
        "import sys\n"
        "import chattune.evaluation.metrics as m\n"
        "heavy = [k for k in ('jieba', 'nltk', 'rouge_chinese', 'numpy') if k in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import nltk\n"
        "def no_download(*a, **k):\n"
        "    raise AssertionError('nltk.download called')\n"
        "nltk.download = no_download\n"
        "print(m.similarity('我喜欢吃苹果', '我喜欢吃香蕉'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no "Building prefix dict ..." / "Loading model from cache ..."
    assert "50.8133" in done.stdout
