"""Answer conversations with a loaded run: in a batch (predict, demo, eval) or streamed (chat).

Both decode through :class:`chattune.inference.decoding.Decoder`, the server's decoder, with
the run's template, generation defaults and stop tokens (:class:`chattune.inference.runs.Profile`),
so an answer here has the tokens the server gives the same request. The prompt is
cut to leave room for the answer (oldest turns dropped first).
"""

from __future__ import annotations

from collections.abc import Iterator

from chattune.inference.decoding import Decoder, Event, Sequence, run_to_end
from chattune.inference.runs import LoadedRun, Profile
from chattune.inference.sampling import SamplingParams, params_from_defaults
from chattune.inference.textstream import TextStream


def sampling_params(profile: Profile, *, max_new_tokens: int | None = None, **overrides) -> SamplingParams:
    """The profile's generation defaults with the caller's overrides (None: the default)."""
    return params_from_defaults(profile.generation, max_new_tokens, **overrides)


def _sequence(run: LoadedRun, profile: Profile, messages: list[dict], params: SamplingParams, emit,
              tools: list[dict] | None = None) -> Sequence:
    budget = max(8, run.context_length - params.max_tokens)
    ids = run.prompt_ids(messages, profile, budget, tools)
    params.max_tokens = max(1, min(params.max_tokens, run.context_length - len(ids)))
    return Sequence(ids, params, TextStream(run.decode, profile.stop_strings, strip=True), emit,
                    adapter=profile.adapter, stop_token_ids=profile.stop_token_ids)


def _decoder(run: LoadedRun) -> Decoder:
    return Decoder(run.model, pad_token_id=run.tokenizer.pad_token_id, use_adapters=run.uses_adapters)


def answer(run: LoadedRun, conversations: list[list[dict]], profile: str | None = None, *,
           tools: list[list[dict] | None] | None = None, **overrides) -> list[Sequence]:
    """Decode an answer to every conversation (each ending with the user's message, or a tool's
    result), all in one batch; return the finished sequences (``.generated`` token ids,
    ``.text.text`` the answer). ``tools`` are the function objects each conversation offers (None:
    none; the prompt shows them as the template does). ``overrides`` are :func:`sampling_params`'
    (max_new_tokens, temperature, top_k, seed, ...)."""
    chosen = run.profile(profile)
    offered = tools if tools is not None else [None] * len(conversations)
    seqs = [_sequence(run, chosen, messages, sampling_params(chosen, **overrides), _ignore, row_tools)
            for messages, row_tools in zip(conversations, offered, strict=True)]
    if seqs:
        for _ in run_to_end(_decoder(run), seqs):
            pass
    return seqs


def generate(run: LoadedRun, conversations: list[list[dict]], profile: str | None = None, *,
             tools: list[list[dict] | None] | None = None, **overrides) -> list[str]:
    """The answers' text, as :func:`answer` decodes them."""
    return [seq.text.text for seq in answer(run, conversations, profile, tools=tools, **overrides)]


def stream(run: LoadedRun, messages: list[dict], profile: str | None = None, **overrides) -> Iterator[str]:
    """Yield the answer's text piece by piece as it is generated (the pieces join to what
    :func:`generate` returns for the same conversation)."""
    chosen = run.profile(profile)
    pieces: list[str] = []
    seq = _sequence(run, chosen, messages, sampling_params(chosen, **overrides),
                    lambda event: pieces.append(event.text) if event.kind == "text" else None)
    for _ in run_to_end(_decoder(run), [seq]):
        yield from pieces
        pieces.clear()


def _ignore(event: Event) -> None:
    """Events of a batch whose answers are read when it ends."""
