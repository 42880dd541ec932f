"""Generated tokens to text that is safe to send: stop strings cut, nothing retracted.

A stream may only send text that the final answer will begin with. So the
text held back is: a tail that could still become a stop string, an
incomplete UTF-8 character (decoded as U+FFFD), for chat answers (which
are stripped) leading and trailing whitespace, and with a ``reply``
(:class:`chattune.inference.replytext.ReplyText`, steps that rewrite the decoded
text) the text after the last place where its rewrite cannot change any more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chattune.inference.replytext import ReplyText


def first_stop(text: str, stops: list[str]) -> int:
    """Where the earliest stop string begins in ``text``, or -1."""
    found = [at for at in (text.find(s) for s in stops if s) if at >= 0]
    return min(found, default=-1)


def stop_prefix_length(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Turns a growing list of generated token ids into text deltas.

    ``decode`` maps token ids to text; ``stops`` are the stop strings; with
    ``strip`` the whole answer is stripped of surrounding whitespace; ``reply``
    turns the decoded text (cut at a stop string) into the reply text. While
    tokens come, only the newest few are decoded (each with a little context
    before it, so that tokenizers which drop a leading space decode alike; a
    context is never only blanks, which such a tokenizer drops whole);
    the final answer is one decode of them all.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], strip: bool,
                 reply: ReplyText | None = None):
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.strip = strip
        self.reply = reply
        self._cut = 0  # with a reply: the decoded text up to here is rewritten, into _replied
        self._replied = ""
        self._checked = 0  # and the places up to here were looked at for a cut
        self.sent = ""
        self.stopped = False
        self._decoded = ""
        self._prefix = self._read = 0

    def update(self, ids: list[int]) -> str:
        """The new text safe to send after ``ids``; sets ``stopped`` (and sends the rest of
        the answer) when a stop string appears."""
        before = self.decode(ids[self._prefix:self._read])
        after = self.decode(ids[self._prefix:])
        if after.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            return ""
        new = after[len(before):]
        self._decoded += new
        if new.strip():  # else the newest ids would be a context of blanks, which decodes as nothing
            self._prefix = self._read
        self._read = len(ids)
        if first_stop(self._decoded, self.stops) >= 0:
            self.stopped = True
            return self.finish(ids)
        held = stop_prefix_length(self._decoded, self.stops)
        return self._advance(self._decoded[:len(self._decoded) - held])

    def finish(self, ids: list[int]) -> str:
        """The rest of the answer once generation has ended: all of ``ids`` decoded, cut at
        the first stop string."""
        text = self.decode(ids)
        at = first_stop(text, self.stops)
        return self._advance(text[:at] if at >= 0 else text, final=True)

    @property
    def text(self) -> str:
        """All the text sent so far."""
        return self.sent

    def _advance(self, visible: str, final: bool = False) -> str:
        if self.reply is not None:
            visible = self.reply.apply(visible) if final else self._rewritten(visible)
        if self.strip:  # trailing whitespace waits: more text may follow it
            visible = visible.strip()
        if len(visible) <= len(self.sent) or not visible.startswith(self.sent):
            return ""
        delta = visible[len(self.sent):]
        self.sent = visible
        return delta

    def _rewritten(self, visible: str) -> str:
        """The reply text of ``visible`` up to its last place that later text cannot change
        (:meth:`chattune.inference.replytext.ReplyText.cut`), rewritten a part at a time."""
        start = max(self._cut, self._checked)
        cut = self.reply.cut(visible, start)
        self._checked = max(start, len(visible) - 1)
        if cut > start:
            self._replied += self.reply.apply(visible[self._cut:cut])
            self._cut = cut
        return self._replied
