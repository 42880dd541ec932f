"""``chattune chat``: a multi-turn conversation in the terminal, answers streamed.

With a knowledge base (``--kb``), each question is answered from it as ``chattune serve``'s
``MODEL+KB`` models answer (:func:`chattune.kb.ask.ask`): the model sees the retrieved chunks
in the KB prompt, the answer ends with the footnote markers and the sources are printed under
it (``[n] FILE, chunk C (score S)``); with nothing relevant, the "cannot answer" reply is
printed without asking the model. The history keeps the questions as typed, not the prompts.

With a vision-language model, ``/image PATH`` attaches an image to the next message (several
``/image`` lines before one message attach several, in order): the message is sent with one
``<image>`` placeholder per image before its text and the images (decoded once, when attached)
in its ``images``, and keeps them in the history (a file moved later does not break the chat). An image that cannot be used is a one-line error
when it is attached, and the chat goes on.
"""

from __future__ import annotations

import sys

from chattune.errors import ChattuneError
from chattune.inference import generate
from chattune.inference.runs import ImagesNotSupported, LoadedRun, PromptTooLong
from chattune.vision.images import PLACEHOLDER, ImageError, load_image, resolve_ref

IMAGE_COMMAND = "/image"


def chat_loop(run: LoadedRun, stdin=None, stdout=None, *, kb=None, kb_top_k: int | None = None,
              kb_threshold: float | None = None, **overrides) -> None:
    """Interactive multi-turn chat: streamed answers; ``/clear`` forgets, ``/exit`` quits,
    ``/image PATH`` attaches an image to the next message (vision-language models). An
    answer that stops with an error says so, and its turn is left out of the history.
    ``overrides`` are generation settings (max_new_tokens, temperature, ...); ``kb`` (an opened
    :class:`chattune.kb.store.KnowledgeBase`) answers from it with ``kb_top_k`` chunks at most and
    ``kb_threshold`` the least relevance (None: the defaults)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: list[dict] = []
    pending: list = []  # images attached to the next message (decoded: the history keeps them, not paths)
    stdout.write(greeting(run))
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
            history, pending = [], []
            stdout.write("(history cleared)\n")
            continue
        if text == IMAGE_COMMAND or text.startswith(IMAGE_COMMAND + " "):
            try:
                path = attach_image(run, text[len(IMAGE_COMMAND):], kb is not None)
                pending.append(load_image(path, IMAGE_COMMAND))
            except ChattuneError as exc:
                stdout.write(f"chattune: error: {exc}\n")
                continue
            count = len(pending)
            stdout.write(f"(image {count} attached to your next message: {path})\n")
            continue
        message = {"role": "user", "content": text}
        if pending:
            message = {"role": "user", "content": PLACEHOLDER * len(pending) + text, "images": pending}
            pending = []
        history.append(message)
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
            except (ImagesNotSupported, ImageError, PromptTooLong) as exc:
                history.pop()
                stdout.write(f"\nchattune: error: {exc}; this message is left out of the history\n")
                continue
        if asked is not None and asked.prompt is not None:
            stdout.write(f"{asked.cite('')}\n{asked.prompt.footnotes}")
        stdout.write("\n")
        history.append({"role": "assistant", "content": answer})


def greeting(run: LoadedRun) -> str:
    """The first line: how to chat, and the commands (``/image`` for a vision-language model)."""
    vision = getattr(run, "vision", None) is not None
    image = f" {IMAGE_COMMAND} PATH attaches an image to your next message;" if vision else ""
    return f"chattune chat: type a message;{image} /clear to start over, /exit to quit.\n"


def attach_image(run: LoadedRun, argument: str, with_kb: bool = False) -> str:
    """The image ``argument`` of ``/image`` names (a path, ``~`` and relative paths resolved from
    the current folder; a ``file://`` or base64 ``data:`` URL), read once to prove it usable.

    Raises ImagesNotSupported for a model that reads no images (and with a knowledge base,
    whose prompts are text), ImageError for a missing, remote or unreadable image."""
    if getattr(run, "vision", None) is None:
        raise ImagesNotSupported(f"{IMAGE_COMMAND}: this model reads no images (not a vision-language model); "
                                 "send text only")
    if with_kb:
        raise ImagesNotSupported(f"{IMAGE_COMMAND}: not with --kb (answers from a knowledge base are text only)")
    ref = argument.strip()
    if len(ref) > 1 and ref[0] == ref[-1] and ref[0] in "'\"":
        ref = ref[1:-1]
    if not ref:
        raise ImageError(f"{IMAGE_COMMAND}: expected an image path, e.g. {IMAGE_COMMAND} photo.jpg")
    resolved = resolve_ref(ref, None, IMAGE_COMMAND)
    load_image(resolved, IMAGE_COMMAND)
    return resolved


def _ask(kb, history: list[dict], top_k: int | None, threshold: float | None):
    from chattune.kb.ask import ask
    from chattune.kb.store import THRESHOLD, TOP_K

    return ask(kb, history, top_k=TOP_K if top_k is None else top_k,
               threshold=THRESHOLD if threshold is None else threshold)
