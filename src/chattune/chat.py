"""``chattune chat``: a multi-turn conversation in the terminal, answers streamed."""

from __future__ import annotations

import sys

from chattune import generate
from chattune.runs import LoadedRun


def chat_loop(run: LoadedRun, stdin=None, stdout=None, **overrides) -> None:
    """Interactive multi-turn chat: streamed answers; ``/clear`` forgets, ``/exit`` quits.
    ``overrides`` are generation settings (max_new_tokens, temperature, ...)."""
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
        stdout.write("Assistant: ")
        answer = ""
        for piece in generate.stream(run, history, **overrides):
            answer += piece
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": answer})
