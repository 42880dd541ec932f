"""Answer conversations with a loaded run: in a batch (predict, demo, eval) or streamed (chat).

A request becomes a :class:`chattune.inference.decoding.Sequence` in one place, :func:`sequence`
(prompt ids with the served model's stop strings, stop tokens, adapter and answer decoding;
:func:`conversation_sequence` renders a conversation into those prompt ids first), for the
batches here, generation metrics during training and the server alike; a batch is then
decoded by :func:`chattune.inference.decoding.decode_batch`, on the server's decoder, with
the run's template, generation defaults and stop tokens
(:class:`chattune.inference.runs.ServedModel`), so an answer here has the tokens the server
gives the same request. The prompt is cut to leave room for the answer (oldest turns dropped
first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from chattune.errors import ChattuneError
from chattune.inference.decoding import Event, Sequence, decode_batch, decode_steps
from chattune.inference.replytext import reply_text
from chattune.inference.runs import LoadedRun, ServedModel
from chattune.inference.sampling import SamplingParams, params_from_defaults
from chattune.inference.textstream import TextStream
from chattune.vision.images import ImageError


class AnswerFailed(ChattuneError):
    """An answer stopped part way with an error (what came before it was already given)."""


def sampling_params(served: ServedModel, *, max_new_tokens: int | None = None, **overrides) -> SamplingParams:
    """The served model's generation defaults with the caller's overrides (None: the default)."""
    return params_from_defaults(served.generation, max_new_tokens, **overrides)


def _ignore(event: Event) -> None:
    """Events of a batch whose answers are read when it ends."""


def sequence(run: LoadedRun, served: ServedModel, prompt_ids: list[int], params: SamplingParams,
             emit: Callable[[Event], None] | None = None, *, stop_strings: list[str] | None = None,
             stop_token_ids: frozenset[int] = frozenset(), keep: frozenset[int] = frozenset(),
             strip: bool = True) -> Sequence:
    """The sequence that decodes an answer to ``prompt_ids`` as ``served`` answers: its adapter,
    its stop tokens (and ``stop_token_ids``), ``stop_strings`` (None: the served model's), never
    an id the tokenizer cannot decode, the answer's text decoded by the run's tokenizer (special
    tokens in ``keep`` written out) and, with ``strip`` (a chat answer), stripped of surrounding
    whitespace and written as the model's own code writes its replies (ChatGLM-6B's
    ``process_response``, :func:`chattune.inference.replytext.reply_text`)."""
    reply = reply_text(run.tokenizer, chat=strip)
    decode = partial(run.decode, keep=keep, clean_up=False if reply is not None and reply.cleans_up else None)
    stops = served.stop_strings if stop_strings is None else stop_strings
    emit = _ignore if emit is None else emit  # looked up now: a test may watch the events
    return Sequence(prompt_ids, params, TextStream(decode, stops, strip=strip, reply=reply), emit,
                    adapter=served.adapter, stop_token_ids=served.stop_token_ids | stop_token_ids,
                    banned_ids=run.banned_ids)


def conversation_sequence(run: LoadedRun, served: ServedModel, messages: list[dict], params: SamplingParams,
                          emit: Callable[[Event], None] | None = None, tools: list[dict] | None = None) -> Sequence:
    """:func:`sequence` for a conversation (ending with the user's message, or a tool's result)
    rendered with the served model's template and the ``tools`` it offers, cut to leave room for
    the answer (``params.max_tokens``, itself cut to the room the context leaves). Messages may
    carry ``images`` (see :meth:`LoadedRun.image_prompt`)."""
    budget = max(8, run.context_length - params.max_tokens)
    images = []
    if any(m.get("images") for m in messages):
        ids, images = run.image_prompt(messages, served, budget, tools)
    else:
        ids = run.prompt_ids(messages, served, budget, tools)
        if run.vision is not None and run.vision.image_token_id in ids:
            raise ImageError(f"the text holds the model's image token {run.vision.placeholder} but no image is "
                             "attached; attach one image per placeholder, or write it another way")
    params.max_tokens = max(1, min(params.max_tokens, run.context_length - len(ids)))
    seq = sequence(run, served, ids, params, emit)
    if images:
        seq.images, seq.image_inputs = images, run.vision.pixels
    return seq


def decode(run: LoadedRun, seqs: list[Sequence]) -> list[Sequence]:
    """``seqs`` decoded together on the run's model (:func:`chattune.inference.decoding.decode_batch`)."""
    return decode_batch(run.model, seqs, pad_token_id=run.tokenizer.pad_token_id, use_adapters=run.uses_adapters)


def answer(run: LoadedRun, conversations: list[list[dict]], profile: str | None = None, *,
           tools: list[list[dict] | None] | None = None, **overrides) -> list[Sequence]:
    """Decode an answer to every conversation (each ending with the user's message, or a tool's
    result), all in one batch; return the finished sequences (``.generated`` token ids,
    ``.text.text`` the answer, ``.error`` why it stopped part way, when it did). ``tools`` are
    the function objects each conversation offers (None: none; the prompt shows them as the
    template does). ``overrides`` are :func:`sampling_params`' (max_new_tokens, temperature,
    top_k, seed, ...)."""
    chosen = run.profile(profile)
    offered = tools if tools is not None else [None] * len(conversations)
    seqs = [conversation_sequence(run, chosen, messages, sampling_params(chosen, **overrides), tools=row_tools)
            for messages, row_tools in zip(conversations, offered, strict=True)]
    return decode(run, seqs)


def generate(run: LoadedRun, conversations: list[list[dict]], profile: str | None = None, *,
             tools: list[list[dict] | None] | None = None, **overrides) -> list[str]:
    """The answers' text, as :func:`answer` decodes them."""
    return [seq.text.text for seq in answer(run, conversations, profile, tools=tools, **overrides)]


def stream(run: LoadedRun, messages: list[dict], profile: str | None = None, **overrides) -> Iterator[str]:
    """Yield the answer's text piece by piece as it is generated (the pieces join to what
    :func:`generate` returns for the same conversation); AnswerFailed after the last piece
    when the answer stopped with an error (a token the tokenizer cannot decode, say)."""
    chosen = run.profile(profile)
    pieces: list[str] = []
    seq = conversation_sequence(run, chosen, messages, sampling_params(chosen, **overrides),
                                lambda event: pieces.append(event.text) if event.kind == "text" else None)
    for _ in decode_steps(run.model, [seq], pad_token_id=run.tokenizer.pad_token_id,
                          use_adapters=run.uses_adapters):
        yield from pieces
        pieces.clear()
    if seq.error is not None:
        raise AnswerFailed(seq.error)
