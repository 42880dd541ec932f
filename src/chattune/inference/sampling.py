"""The one sampler: how the next token of each row is picked, and the settings that say how.

Greedy (temperature 0), or temperature with top-k and top-p (nucleus) sampling, each
row with its own seeded generator; a repetition penalty is applied first, as
transformers does (a seen token's logit is divided by the penalty when positive,
multiplied when negative). The terminal chat, predict, the demo and the server's
engine all decode through :func:`sample`, so one request gets the same tokens
wherever it is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How one request is decoded. ``temperature`` 0 is greedy; ``top_k`` 0 keeps every token."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


def params_from_defaults(generation, max_tokens: int | None = None, *, temperature: float | None = None,
                         top_p: float | None = None, top_k: int | None = None,
                         repetition_penalty: float | None = None, do_sample: bool | None = None,
                         seed: int | None = None, ignore_eos: bool = False) -> SamplingParams:
    """A request's settings over a run's generation defaults (:class:`chattune.config.GenerateArgs`).

    Unset (None) values take the run's; the run samples only if its ``do_sample`` is on,
    unless the request says otherwise (``do_sample``, or a temperature of its own).
    """
    sampled = generation.do_sample if do_sample is None else do_sample
    if temperature is None:
        temperature = generation.temperature if sampled else 0.0
    elif do_sample is False:
        temperature = 0.0
    return SamplingParams(
        max_tokens=generation.max_new_tokens if max_tokens is None else max_tokens,
        temperature=temperature,
        top_p=top_p if top_p is not None else generation.top_p,
        top_k=0 if top_k is None else top_k,
        repetition_penalty=generation.repetition_penalty if repetition_penalty is None else repetition_penalty,
        seed=seed,
        ignore_eos=ignore_eos,
    )


def penalize_repeats(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """``logits`` (one row) with every token of ``seen`` penalized (transformers' rule)."""
    if penalty == 1.0 or not seen:
        return logits
    index = torch.as_tensor(seen, device=logits.device)
    score = logits.gather(0, index)
    return logits.scatter(0, index, torch.where(score < 0, score * penalty, score / penalty))


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row's (already penalized) float logits."""
    if params.temperature <= 0:
        return int(logits.argmax())
    scores = logits / params.temperature
    if 0 < params.top_k < scores.shape[0]:
        kth = scores.topk(params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort()
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - params.top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def sample(logits: torch.Tensor, rows: list[tuple[SamplingParams, list[int], torch.Generator | None]],
           on_error: Callable[[int, Exception], None] | None = None) -> list[int | None]:
    """The next token of each row of ``logits`` (``[rows, vocabulary]``); each row comes with its
    settings, the tokens it has seen so far (prompt and generated, for the penalty) and its
    generator. With ``on_error``, a row whose own settings break the sampler gets None and
    ``on_error(row, exception)``; the other rows are sampled as if it were not there."""
    logits = logits.float()
    tokens: list[int | None] = logits.argmax(-1).tolist()  # greedy rows without a penalty need nothing more
    for i, (params, seen, generator) in enumerate(rows):
        if params.temperature > 0 or params.repetition_penalty != 1.0:
            try:
                row = penalize_repeats(logits[i], seen, params.repetition_penalty)
                tokens[i] = sample_row(row, params, generator)
            except Exception as exc:
                if on_error is None:
                    raise
                tokens[i] = None
                on_error(i, exc)
    return tokens
