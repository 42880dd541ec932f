"""An answer's decoded text into its reply text, as the model's own code writes it.

The text stream (:class:`chattune.inference.textstream.TextStream`) decodes the generated ids
without any of this, a few ids at a time; a :class:`ReplyText` then turns the decoded text
into the reply. Its steps rewrite text by what is next to it, so a partial answer's rewrite
may not begin the final one (``"你好,"`` stays as it is, ``"你好,世界"`` becomes
``"你好，世界"``): the stream sends the rewrite of the text up to the last place where every
step treats the text before and after on its own (:meth:`ReplyText.cut`), which no later text
can change. Two steps exist:

- the tokenizer's clean-up of spaces before punctuation (transformers'
  ``clean_up_tokenization``: ``" ,"`` -> ``","``, ``" n't"`` -> ``"n't"``, ...), for a
  python tokenizer whose ``clean_up_tokenization_spaces`` is on (ChatGLM-6B's is, as
  THUDM's was): the stream then decodes without it. (A fast tokenizer's decode is left as it
  is: transformers 5 skips the clean-up for BPE ones whatever the setting says.)
- ChatGLM-6B's ``process_response`` (:mod:`chattune.chatglm.replies`) for its chat answers
  (which the stream strips), as THUDM's ``chat()`` returns them: the model's, whatever the
  template, told by its tokenizer (chattune's port of ``ice_text.model``, which every
  ChatGLM-6B folder is converted to).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chattune.chatglm import replies

CLEAN_UPS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
"""What transformers' ``clean_up_tokenization`` rewrites, each beginning with the space it drops."""
_CLEAN_UP_PAIRS = frozenset(text[i:i + 2] for text in CLEAN_UPS for i in range(len(text) - 1))


def clean_up_separable(before: str, after: str) -> bool:
    """Whether the clean-up of a text with the character ``before`` followed by ``after``
    somewhere is the clean-up of the text up to that place followed by that of the rest:
    neither is a space (the only character it drops) and the two are not inside one of
    :data:`CLEAN_UPS`."""
    return before != " " and after != " " and before + after not in _CLEAN_UP_PAIRS


@dataclass(frozen=True)
class ReplyText:
    """Steps from decoded text to reply text (applied in order), and for each a function
    saying whether it treats the text on either side of two characters on its own;
    ``cleans_up``: the steps do the tokenizer's clean-up of spaces (so the text is decoded
    without it)."""

    steps: tuple[Callable[[str], str], ...]
    separable: tuple[Callable[[str, str], bool], ...]
    cleans_up: bool = False

    def apply(self, text: str) -> str:
        """The reply text of ``text`` (decoded, whole or a part cut at :meth:`cut`)."""
        for step in self.steps:
            text = step(text)
        return text

    def cut(self, text: str, start: int = 0) -> int:
        """The last place after ``start`` in ``text`` (between two of its characters) where
        ``apply(text[:place]) + apply(rest)`` is ``apply`` of the two together, whatever the
        rest turns out to be; ``start`` when there is none."""
        for place in range(len(text) - 1, start, -1):
            if all(separable(text[place - 1], text[place]) for separable in self.separable):
                return place
        return start


def is_chatglm6b(tokenizer) -> bool:
    """Whether ``tokenizer`` is ChatGLM-6B's."""
    from chattune.chatglm.glm6b_tokenizer import ChatGLM6BTokenizer

    return isinstance(tokenizer, ChatGLM6BTokenizer)


def reply_text(tokenizer, chat: bool) -> ReplyText | None:
    """The steps an answer's text goes through for this tokenizer (None: none): the clean-up of
    spaces of a python tokenizer that has it on, and for a chat answer of ChatGLM-6B THUDM's
    ``process_response`` (its strip is the stream's own)."""
    steps, separable = [], []
    cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)) \
        and not getattr(tokenizer, "is_fast", False)
    if cleans_up:
        steps.append(tokenizer.clean_up_tokenization)
        separable.append(clean_up_separable)
    if chat and is_chatglm6b(tokenizer):
        steps.append(replies.rewrite)
        separable.append(replies.separable)
    return ReplyText(tuple(steps), tuple(separable), cleans_up) if steps else None
