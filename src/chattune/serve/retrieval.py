"""Answers from knowledge bases in the API: ``chattune serve RUN --kb NAME=KB``.

Each served model ``M`` gets a twin ``M+NAME`` per KB (listed in ``/v1/models``). A chat
request to it is answered through :func:`chattune.kb.ask.ask`: the last user message is
the question; with no chunk above the threshold the reply is the "cannot answer from the
known information" sentence in the question's language, sent as a normal (or streamed)
completion without asking the model (``usage`` all zero); otherwise the message becomes
Langchain-Chatchat's instruction prompt over the retrieved chunks, rendered with the
model's template as any chat request, and the answer ends with the footnote markers
(`` [1][2]``; streamed, they are the last content delta before the finish chunk).

The sources, ``[{"file", "chunk", "score"}]`` (the n-th cited by ``[n]``; empty for the
reply), are a top-level ``sources`` field of the completion, and of the *first* chunk of a
stream (the one carrying the role), so a client can show them before the answer arrives.

KBs are opened once, at startup (:func:`open_kbs`); a question over the length limit is a
400 naming ``messages``, as is a KB prompt too long for the model's context.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from fastapi.responses import StreamingResponse

from chattune.errors import ChattuneError, ConfigError
from chattune.inference.runs import ServedModel
from chattune.kb.ask import Asked, ask, check_settings, cited, open_for_answers
from chattune.kb.store import THRESHOLD, TOP_K, KnowledgeBase
from chattune.serve.schema import APIError, sse_event

SEPARATOR = "+"


@dataclass
class KbServing:
    """The KBs a server answers from (by name), opened once, and the retrieval settings."""

    bases: dict[str, KnowledgeBase]
    top_k: int = TOP_K
    threshold: float = THRESHOLD
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def parse_kb(text: str) -> tuple[str, str]:
    """``NAME=KB`` from the command line: the name models are suffixed with, and the KB folder."""
    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ConfigError(f"--kb: expected NAME=KB (a name and a knowledge-base folder), got {text!r}")
    if SEPARATOR in name or any(c.isspace() for c in name):
        raise ConfigError(f"--kb {text}: the name {name!r} may not hold spaces or {SEPARATOR!r}; "
                          f"expected a plain name like docs (served as MODEL{SEPARATOR}docs)")
    return name, path


def open_kbs(specs: list[str], top_k: int = TOP_K, threshold: float = THRESHOLD) -> KbServing | None:
    """Open each ``NAME=KB`` once (None for none); one-line errors for a bad value, a folder that
    is not a KB, an empty KB, a repeated name or settings out of range."""
    if not specs:
        return None
    check_settings(top_k, threshold)
    bases: dict[str, KnowledgeBase] = {}
    for text in specs:
        name, path = parse_kb(text)
        if name in bases:
            raise ConfigError(f"--kb {text}: the name {name!r} is given twice; expected one KB per name")
        bases[name] = open_for_answers(path, f"--kb {name}")
    return KbServing(bases, top_k, threshold)


def kb_profiles(profiles: dict[str, ServedModel], kbs: KbServing | None) -> dict[str, tuple[ServedModel, str]]:
    """``{"M+NAME": (profile answering as M+NAME, NAME)}`` for every served model ``M`` and KB ``NAME``."""
    if kbs is None:
        return {}
    out = {}
    for model, profile in profiles.items():
        for name in kbs.bases:
            served = f"{model}{SEPARATOR}{name}"
            if served in profiles:
                raise ConfigError(f"--kb {name}: the model name {served!r} is taken by a served run; "
                                  "expected another KB name")
            out[served] = (replace(profile, name=served), name)
    return out


def card_extra(kbs: KbServing, name: str) -> dict:
    """What /v1/models adds to a KB model's card: its KB folder and retrieval settings."""
    return {"knowledge_base": {"name": name, "path": str(kbs.bases[name].root), "top_k": kbs.top_k,
                               "threshold": kbs.threshold}}


async def retrieve(kbs: KbServing, name: str, messages: list[dict]) -> Asked:
    """Search KB ``name`` for the conversation's question (off the event loop); 400s naming ``messages``."""
    if messages[-1]["role"] != "user":
        raise APIError(400, f"messages[{len(messages) - 1}].role: a knowledge-base model answers the user's "
                       "question; the last message must be the user's", param="messages")

    def run() -> Asked:
        with kbs.lock:
            return ask(kbs.bases[name], messages, top_k=kbs.top_k, threshold=kbs.threshold)

    try:
        return await asyncio.to_thread(run)
    except ChattuneError as exc:
        text = str(exc).removeprefix("query: ")
        raise APIError(400, f"messages[{len(messages) - 1}].content: {text}", param="messages") from exc


def _head(model: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def direct_reply(model: str, asked: Asked, stream: bool, include_usage: bool = False):
    """The reply (the cannot-answer sentence) as a chat completion, or as its stream; no model call."""
    head, usage = _head(model), {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not stream:
        message = {"role": "assistant", "content": asked.reply}
        return {**head, "object": "chat.completion", "system_fingerprint": None,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                "usage": usage, "sources": []}
    head = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish: str | None = None, more: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse_event({**head, "choices": [choice], **extra, **(more or {})})

    async def events():
        yield chunk({"role": "assistant", "content": ""}, more={"sources": []})
        yield chunk({"content": asked.reply})
        yield chunk({}, "stop")
        if include_usage:
            yield sse_event({**head, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})



@dataclass(frozen=True)
class Citation:
    """What a KB answer carries: the sources (a ``sources`` field) and the markers after its text."""

    sources: list[dict]
    markers: str

    @property
    def suffix(self) -> str:
        """The text appended to the answer: a space and the markers (`` [1][2]``)."""
        return cited("", self.markers)


def citation(asked: Asked) -> Citation:
    """The citation of a question the model answers from retrieved chunks."""
    return Citation(asked.sources, asked.prompt.markers)

