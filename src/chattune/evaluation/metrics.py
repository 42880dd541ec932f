"""Text-similarity metrics (ROUGE-1/2/L, BLEU-4) as the published fine-tuning tables compute them,
row for row equal to LLaMA-Factory's ``ComputeSimilarity`` (jieba words for ROUGE, characters
for BLEU-4 with method3 smoothing, x100 rounded to 4 decimals, the mean over rows), and the
tool-call scores. The sources, the exact rules and how older ChatGLM-6B tables differ:
``docs/design/metrics.md``. jieba, rouge_chinese, nltk and numpy are imported on first use.
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
