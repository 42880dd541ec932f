"""The one sampler: how the next token of each row is picked, and the settings that say how.

Greedy (temperature 0), or temperature with top-k and top-p (nucleus) sampling, each
row with its own seeded generator (a filtered row draws among the tokens it keeps, by the
exponential race ``torch.multinomial`` itself runs); a repetition penalty is applied first, as
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


CANDIDATES = 2048
"""How many of the best tokens top-p looks at before it sorts the whole vocabulary: a nucleus
is almost always far smaller, and sorting 49k-151k scores per row per step cost more than the
forward pass of a small model."""


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row's (already penalized) float logits."""
    if params.temperature <= 0:
        return int(logits.argmax())
    scores = logits / params.temperature
    vocab = scores.shape[0]
    top_k = params.top_k if 0 < params.top_k < vocab else 0
    if not top_k and params.top_p >= 1.0:
        return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
    ids, weights = nucleus(scores, top_k, params.top_p)
    return int(ids[(weights / torch.empty_like(weights).exponential_(generator=generator)).argmax()])


def nucleus(scores: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens top-k (``top_k`` > 0; ties at the k-th score stay) then top-p keep, best first,
    with their probabilities among the top-k (or the whole vocabulary).

    Top-p keeps the smallest set of best tokens whose mass reaches ``top_p``: a token stays while
    the mass of the tokens before it is below ``top_p``. Only the ``CANDIDATES`` best are sorted
    unless the nucleus runs past them."""
    vocab = scores.shape[0]
    values, ids = scores.topk(top_k or min(vocab, CANDIDATES))
    if top_k and (ties := int((scores >= values[-1]).sum())) > top_k:
        values, ids = scores.topk(ties)
    total = values.logsumexp(0) if top_k else scores.logsumexp(0)
    if not torch.isfinite(total):
        raise RuntimeError(f"no token has a finite probability (the scores' log-sum is {float(total)})")
    probs = (values - total).exp()
    if top_p >= 1.0:
        return ids, probs
    cumulative = probs.cumsum(0)
    if not top_k and len(ids) < vocab and cumulative[-1] < top_p:  # the nucleus runs past the candidates
        values, ids = scores.sort(descending=True)
        probs = (values - total).exp()
        cumulative = probs.cumsum(0)
    keep = cumulative - probs < top_p
    keep[0] = True  # (a top_p below float32's least value compares as 0)
    return ids[keep], probs[keep]


def sample(logits: torch.Tensor, rows: list[tuple[SamplingParams, list[int], torch.Generator | None]],
           on_error: Callable[[int, Exception], None] | None = None) -> list[int | None]:
    """The next token of each row of ``logits`` (``[rows, vocabulary]``); each row comes with its
    settings, the tokens it has seen so far (prompt and generated, for the penalty) and its
    generator. With ``on_error``, a row whose own settings break the sampler gets None and
    ``on_error(row, exception)``; the other rows are sampled as if it were not there.

    Rows that share a temperature, top-k and top-p and have no penalty are filtered together
    (:func:`sample_alike`); each still draws from its own generator exactly as it would alone."""
    logits = logits.float()
    tokens: list[int | None] = logits.argmax(-1).tolist()  # greedy rows without a penalty need nothing more
    alone: list[int] = []
    alike: dict[tuple[float, int, float], list[int]] = {}
    for i, (params, _, _) in enumerate(rows):
        if params.repetition_penalty != 1.0:
            alone.append(i)
        elif params.temperature > 0:
            alike.setdefault((params.temperature, params.top_k, params.top_p), []).append(i)
    for (temperature, top_k, top_p), members in alike.items():
        if len(members) == 1:
            alone += members
            continue
        picked = sample_alike(logits[members], temperature, top_k, top_p, [rows[i][2] for i in members])
        for i, token in zip(members, picked, strict=True):
            if token is None:
                alone.append(i)
            else:
                tokens[i] = token
    for i in sorted(alone):
        params, seen, generator = rows[i]
        try:
            row = penalize_repeats(logits[i], seen, params.repetition_penalty)
            tokens[i] = sample_row(row, params, generator)
        except Exception as exc:
            if on_error is None:
                raise
            tokens[i] = None
            on_error(i, exc)
    return tokens


def sample_alike(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generators: list[torch.Generator | None]) -> list[int | None]:
    """:func:`sample_row` for rows with the same settings (temperature > 0, no penalty), the
    filtering done once for all: the same nucleus and the same draws from each row's generator.
    A row this path does not settle (top-k ties, a nucleus past the candidates, scores that
    are not finite, no filter at all) is None, for :func:`sample_row` to take alone."""
    scores = logits / temperature
    rows, vocab = scores.shape
    top_k = top_k if 0 < top_k < vocab else 0
    if not top_k and top_p >= 1.0:
        return [None] * rows
    values, ids = scores.topk(top_k or min(vocab, CANDIDATES))
    total = values.logsumexp(-1) if top_k else scores.logsumexp(-1)
    probs = (values - total[:, None]).exp()
    settled = torch.isfinite(total)
    if top_k:
        settled &= (scores >= values[:, -1:]).sum(-1) == top_k
    kept = [values.shape[1]] * rows
    if top_p < 1.0:
        cumulative = probs.cumsum(-1)
        if not top_k and values.shape[1] < vocab:
            settled &= cumulative[:, -1] >= top_p
        dropped = cumulative - probs >= top_p  # the nucleus is a prefix of the candidates
        dropped[:, 0] = False
        probs = probs.masked_fill(dropped, 0.0)
        kept = (~dropped).sum(-1).tolist()
    settled_rows = settled.tolist()
    races = torch.ones_like(probs)
    for i, (count, generator, ok) in enumerate(zip(kept, generators, settled_rows, strict=True)):
        if ok:  # a row left to sample_row must not have drawn here
            races[i, :count].exponential_(generator=generator)
    picks = ids.gather(1, (probs / races).argmax(-1, keepdim=True)).flatten().tolist()
    return [pick if ok else None for pick, ok in zip(picks, settled_rows, strict=True)]
