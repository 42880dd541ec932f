"""``chattune chat``: a multi-turn conversation in the terminal, answers streamed.

With a knowledge base (``--kb``), each question is answered from it as ``chattune serve``'s
``MODEL+KB`` models answer (:func:`chattune.kb.ask.ask`): the model sees the retrieved chunks
in the KB prompt, the answer ends with the footnote markers and the sources are printed under
it (``[n] FILE, chunk C (score S)``); with nothing relevant, the "cannot answer" reply is
printed without asking the model. The history keeps the questions as typed, not the prompts.
"""

from __future__ import annotations

import sys

from chattune.errors import ChattuneError
from chattune.inference import generate
from chattune.inference.runs import LoadedRun


def chat_loop(run: LoadedRun, stdin=None, stdout=None, *, kb=None, kb_top_k: int | None = None,
              kb_threshold: float | None = None, **overrides) -> None:
    """Interactive multi-turn chat: streamed answers; ``/clear`` forgets, ``/exit`` quits. An
    answer that stops with an error says so, and its turn is left out of the history.
    ``overrides`` are generation settings (max_new_tokens, temperature, ...); ``kb`` (an opened
    :class:`chattune.kb.store.KnowledgeBase`) answers from it with ``kb_top_k`` chunks at most and
    ``kb_threshold`` the least relevance (None: the defaults)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: list[dict] = []
    stdout.write("chattune chat: type a message; /clear to start over, /exit to quit.\n")
    while True:
        stdout.write("\nUser: ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/clear":
            history = []
            stdout.write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        asked = None
        if kb is not None:
            try:
                asked = _ask(kb, history, kb_top_k, kb_threshold)
            except ChattuneError as exc:
                history.pop()
                stdout.write(f"chattune: error: {exc}\n")
                continue
        stdout.write("Assistant: ")
        if asked is not None and asked.reply is not None:  # nothing relevant: the model is not asked
            answer = asked.reply
            stdout.write(answer)
        else:
            answer = ""
            try:
                for piece in generate.stream(run, asked.messages if asked else history, **overrides):
                    answer += piece
                    stdout.write(piece)
                    stdout.flush()
            except generate.AnswerFailed as exc:
                history.pop()
                stdout.write(f"\nchattune: error: {exc}; the answer stops there, and this turn is left out "
                             "of the history\n")
                continue
        if asked is not None and asked.prompt is not None:
            stdout.write(f"{asked.cite('')}\n{asked.prompt.footnotes}")
        stdout.write("\n")
        history.append({"role": "assistant", "content": answer})


def _ask(kb, history: list[dict], top_k: int | None, threshold: float | None):
    from chattune.kb.ask import ask
    from chattune.kb.store import THRESHOLD, TOP_K

    return ask(kb, history, top_k=TOP_K if top_k is None else top_k,
               threshold=THRESHOLD if threshold is None else threshold)
