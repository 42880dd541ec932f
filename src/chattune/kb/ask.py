"""A conversation's last question answered from a knowledge base: what to send the model, or the reply.

The serve route (``MODEL+KB``), ``chattune chat --kb`` and the example in ``examples/kb``
all go through :func:`ask`: the last user message is the question; the KB is searched;
with no chunk above the threshold the reply is :func:`chattune.kb.prompt.cannot_answer`
and the model is not asked; otherwise that message's content becomes
:func:`chattune.kb.prompt.kb_prompt`'s, and the answer is cited with its markers.
"""

from __future__ import annotations

from dataclasses import dataclass

from chattune.errors import ConfigError, DataError
from chattune.kb.prompt import KbPrompt, cannot_answer, kb_prompt
from chattune.kb.store import (
    MAX_QUERY_CHARS,
    THRESHOLD,
    TOP_K,
    KnowledgeBase,
    check_threshold,
    open_kb,
    search,
)

MARKER_SEPARATOR = " "
"""Between an answer and its markers: ``answer [1][2]``."""


@dataclass(frozen=True)
class Asked:
    """One question put to a KB.

    ``messages``: the conversation to send the model (its last user message replaced by the KB
    prompt), or None when ``reply`` is the answer already; ``prompt``: the KB prompt (sources,
    markers, footnotes), None when nothing was relevant; ``question``: the question as asked.
    """

    question: str
    messages: list[dict] | None
    prompt: KbPrompt | None
    reply: str | None

    @property
    def sources(self) -> list[dict]:
        """``[{"file", "chunk", "score"}]`` of the chunks the model was shown (none for the reply)."""
        return self.prompt.sources if self.prompt else []

    def cite(self, answer: str) -> str:
        """``answer`` with the footnote markers after it (the reply, when there is one, as it is)."""
        return cited(answer, self.prompt.markers if self.prompt else "")


def cited(answer: str, markers: str) -> str:
    """``answer`` followed by ``markers`` (``"[1][2]"``), a space between them; no markers, no change."""
    return f"{answer}{MARKER_SEPARATOR}{markers}" if markers else answer


def check_settings(top_k: int, threshold: float, option: str = "--kb") -> None:
    """One-line errors naming ``OPTION-top-k`` / ``OPTION-threshold`` for values out of range."""
    if top_k < 1:
        raise ConfigError(f"{option}-top-k: {top_k}; expected at least 1")
    try:
        check_threshold(threshold)
    except ConfigError as exc:
        raise ConfigError(f"{option}-{exc}") from None


def open_for_answers(path, option: str = "--kb") -> KnowledgeBase:
    """The KB folder ``path`` opened to answer from, its index built; a one-line error starting
    with ``option`` when it is not a KB or holds no chunks."""
    try:
        kb = open_kb(path)
    except (ConfigError, DataError) as exc:
        raise ConfigError(f"{option}: {exc}") from None
    if not kb.chunks:
        raise ConfigError(f"{option}: {path}: the knowledge base holds no chunks; add documents with "
                          "`chattune kb add`")
    kb.relevance("warm up")  # the index is built now, not by the first question
    return kb


def last_question(messages: list[dict]) -> int:
    """The index of the last message, which must be the user's (a KB answers a question)."""
    if not messages or messages[-1].get("role") != "user":
        raise DataError("messages: the last message must be the user's question to answer it from a "
                        "knowledge base")
    return len(messages) - 1


def ask(kb: KnowledgeBase, messages: list[dict], *, top_k: int = TOP_K, threshold: float = THRESHOLD,
        max_query_chars: int = MAX_QUERY_CHARS) -> Asked:
    """Search ``kb`` for the last user message of ``messages``; the conversation to send, or the reply.

    A question that is empty or longer than ``max_query_chars`` is a :class:`DataError`.
    """
    at = last_question(messages)
    question = messages[at]["content"]
    hits = search(kb, question, top_k=top_k, threshold=threshold, max_query_chars=max_query_chars)
    if not hits:
        return Asked(question, None, None, cannot_answer(question))
    prompt = kb_prompt(question, hits)
    sent = [*messages[:at], {**messages[at], "content": prompt.content}]
    return Asked(question, sent, prompt, None)
