"""ChatGLM-6B's replies as THUDM's ``chat()`` returns them.

THUDM's ``chat()`` and ``stream_chat()`` (``modeling_chatglm.py``) pass the decoded answer
through ``process_response``: the text is stripped, ``[[训练时间]]`` becomes ``2023年``, and
each of ``, ! : ; ?`` next to a Chinese character (U+4E00 to U+9FFF) becomes its full-width
form (``，！：；？``). The model cannot write those forms itself: its tokenizer normalises
text (NFKC) before encoding, so ``，`` was trained as ``,``. :func:`process_response` is the
same function: :func:`rewrite` of the stripped text. For streaming, :func:`separable` says
where :func:`rewrite` treats the text before and after a place on its own.
"""

from __future__ import annotations

import re

TRAINING_TIME = "[[训练时间]]"
"""A marker in ChatGLM-6B's answers that ``process_response`` replaces with :data:`TRAINED_IN`."""
TRAINED_IN = "2023年"
FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
"""The ASCII marks ``process_response`` writes full width next to a Chinese character."""
CHINESE = "\u4e00-\u9fff"
_BEFORE = {mark: re.compile(f"([{CHINESE}]){re.escape(mark)}") for mark in FULL_WIDTH}
_AFTER = {mark: re.compile(f"{re.escape(mark)}([{CHINESE}])") for mark in FULL_WIDTH}
_MARKER_PAIRS = frozenset(TRAINING_TIME[i:i + 2] for i in range(len(TRAINING_TIME) - 1))


def rewrite(text: str) -> str:
    """``process_response`` without its strip: ``[[训练时间]]`` -> ``2023年``, then ``, ! : ; ?``
    after or before a Chinese character -> ``，！：；？`` (one mark at a time, in that order)."""
    text = text.replace(TRAINING_TIME, TRAINED_IN)
    for mark, wide in FULL_WIDTH.items():
        text = _BEFORE[mark].sub(lambda m, wide=wide: m.group(1) + wide, text)
        text = _AFTER[mark].sub(lambda m, wide=wide: wide + m.group(1), text)
    return text


def process_response(text: str) -> str:
    """THUDM's ``process_response``: the text stripped, then :func:`rewrite` (which leaves the
    ends alone, so stripping before or after it is the same)."""
    return rewrite(text.strip())


def separable(before: str, after: str) -> bool:
    """Whether :func:`rewrite` of a text with the character ``before`` followed by ``after``
    somewhere is the rewrite of the text up to that place followed by that of the rest: neither
    is one of ``, ! : ; ?`` (which take the full width from a neighbour) and the two are not
    inside a ``[[训练时间]]`` marker."""
    return before not in FULL_WIDTH and after not in FULL_WIDTH and before + after not in _MARKER_PAIRS
