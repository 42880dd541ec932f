"""Text-similarity metrics (ROUGE-1/2/L, BLEU-4) as the published fine-tuning tables compute them.

The numbers match, row for row, LLaMA-Factory's ``ComputeSimilarity``
(hiyouga/LLaMA-Factory, ``src/llamafactory/train/sft/metric.py``, read at commits
65ea7a0d7c37e82f0b46f3808ec336604f18a5e9 and 158f4cb57744439811013639661ebd103e07d742,
which agree; its ``scripts/eval_bleu_rouge.py`` does the same per row), which itself
descends from ChatGLM-6B's p-tuning ``compute_metrics`` (THUDM/ChatGLM-6B,
``ptuning/main.py``, commit 90f2e47f5456cfef637e2d7a5e2f88334d603e14).

For one (prediction, reference) pair:

* ROUGE: both strings are segmented with ``jieba.cut`` (default mode, HMM on), the
  tokens joined with single spaces and handed to ``rouge_chinese.Rouge().get_scores``;
  the ``"f"`` of ``rouge-1``, ``rouge-2`` and ``rouge-l`` is kept. rouge_chinese
  counts *distinct* n-grams for ROUGE-N (sets, not multisets), uses plain LCS over
  all words for ROUGE-L, and computes ``F = 2PR / (P + R + 1e-8)`` -- so an identical
  pair scores 99.9999995, which rounds to 100.0. If either side has no token once
  whitespace is dropped (``" ".join(tokens).split()`` is empty), all three ROUGE
  values are 0.0 (LLaMA-Factory's rule; rouge_chinese itself would raise).
* BLEU-4: NLTK ``sentence_bleu([list(reference)], list(prediction),
  smoothing_function=SmoothingFunction().method3)`` on *characters* (spaces count as
  characters), uniform weights (0.25,) * 4. There is no special case: NLTK returns 0
  when no character matches (so an empty prediction or an empty reference gives 0.0),
  and a whitespace-only prediction against a whitespace-only reference does score
  (e.g. " " vs " " gives 35.3553).
* Every value is multiplied by 100 and then ``round(value, 4)``; the corpus figure is
  the plain ``np.mean`` of the rounded rows.

Strings are used exactly as given: nothing is stripped or normalised.

Differences between the two sources, for readers of older tables:

* ChatGLM-6B has no empty-text rule, so an empty (or whitespace-only) prediction or
  reference makes its ``compute_metrics`` raise rouge_chinese's ``ValueError``
  ("Hypothesis is empty." / "Reference is empty."); LLaMA-Factory (and this module)
  score such a row 0.0 for ROUGE and still compute BLEU-4.
* An earlier ChatGLM-6B ``ptuning/main.py`` (commit
  08d880141d7450099a579e00877e3318be26da5f) called ``sentence_bleu`` without
  smoothing (NLTK's method0), which gives 0 BLEU-4 to any row without a matching
  character 4-gram; later ChatGLM-6B and LLaMA-Factory use method3.
* Rounding (×100 then 4 decimals per row) and the mean over rows are the same in both.

For a row whose reference answer is a tool call (:func:`call_scores`): ``tool_name_match``
(the predicted calls name the reference's functions) and ``tool_args_match`` (each call's
name and arguments too, the arguments compared as JSON, :func:`same_json`), 100.0 or 0.0.

jieba, rouge_chinese, nltk and numpy are imported on first use only, so importing
this module is cheap; jieba's "Building prefix dict ..." messages are silenced. No
NLTK data is needed (nothing here calls ``nltk.download``).
"""

from __future__ import annotations

import functools
import logging

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
CALL_METRIC_NAMES = ("tool_name_match", "tool_args_match")

_ROUGE_NAMES = METRIC_NAMES[:3]


@functools.lru_cache(maxsize=1)
def _jieba():
    """Import jieba and build its prefix dictionary once, without its stderr chatter."""
    import jieba

    logger = jieba.default_logger
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        jieba.initialize()
    finally:
        logger.setLevel(previous)
    return jieba


@functools.lru_cache(maxsize=1)
def _bleu():
    """The NLTK pieces: (sentence_bleu, SmoothingFunction().method3)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return sentence_bleu, SmoothingFunction().method3


def _rouge_f(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F (fractions, not ×100) on jieba tokens; 0.0 when a side has no token."""
    jieba = _jieba()
    hypothesis = list(jieba.cut(prediction))
    ref_tokens = list(jieba.cut(reference))
    if not " ".join(hypothesis).split() or not " ".join(ref_tokens).split():
        return {name: 0.0 for name in _ROUGE_NAMES}

    from rouge_chinese import Rouge

    scores = Rouge().get_scores(" ".join(hypothesis), " ".join(ref_tokens))[0]
    return {name: scores[name]["f"] for name in _ROUGE_NAMES}


def _bleu4(prediction: str, reference: str) -> float:
    """Character-level sentence BLEU-4 with NLTK's method3 smoothing (a fraction)."""
    sentence_bleu, method3 = _bleu()
    return sentence_bleu([list(reference)], list(prediction), smoothing_function=method3)


def similarity(prediction: str, reference: str) -> dict[str, float]:
    """One row: ``{"rouge-1", "rouge-2", "rouge-l", "bleu-4"}``, each ×100 and rounded to 4.

    ``prediction`` is the model output (hypothesis), ``reference`` the label.
    """
    row = {name: float(round(f * 100, 4)) for name, f in _rouge_f(prediction, reference).items()}
    row["bleu-4"] = float(round(_bleu4(prediction, reference) * 100, 4))
    return {name: row[name] for name in METRIC_NAMES}


def average(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over ``rows`` (``float(np.mean(values))``, as LLaMA-Factory).

    The keys are those of the first row (normally :data:`METRIC_NAMES`); every row must
    have them. An empty list gives ``{}`` (there is nothing to average; LLaMA-Factory's
    ``np.mean([])`` would be NaN with a warning).
    """
    if not rows:
        return {}
    import numpy as np

    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def exact_match(prediction: str, reference: str) -> float:
    """100.0 when the two strings are equal after ``str.strip()``, else 0.0."""
    return 100.0 if prediction.strip() == reference.strip() else 0.0


def same_json(a, b) -> bool:
    """Whether two parsed JSON values are equal as JSON: objects whatever their key order,
    numbers by value (``1 == 1.0``), booleans only to booleans (``true != 1``), strings exactly."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def call_scores(predicted: list[dict] | None, reference: list[dict]) -> dict[str, float]:
    """A row whose reference answer is a tool call: ``{"tool_name_match", "tool_args_match"}``.

    ``tool_name_match`` is 100.0 when the predicted calls (``[{"name", "arguments"}]``)
    name the same functions as the reference's, as many calls (in any order: parallel calls
    have none); ``tool_args_match`` is 100.0 when, besides, each reference call has its own
    predicted call with its name and equal arguments (:func:`same_json`; predicted arguments
    that are not a JSON object, kept as the text the model wrote, never match). No calls, or
    None, score 0.0 on both.
    """
    predicted = predicted or []
    names = sorted(c["name"] for c in predicted) == sorted(c["name"] for c in reference)
    matched = False
    if names:
        left = list(predicted)
        for call in reference:
            found = next((i for i, mine in enumerate(left) if mine["name"] == call["name"]
                          and same_json(mine.get("arguments"), call.get("arguments", {}))), None)
            if found is None:
                break
            left.pop(found)
        else:
            matched = True
    return {"tool_name_match": 100.0 if names else 0.0, "tool_args_match": 100.0 if matched else 0.0}


__all__ = ["CALL_METRIC_NAMES", "METRIC_NAMES", "average", "call_scores", "exact_match", "same_json",
           "similarity"]
