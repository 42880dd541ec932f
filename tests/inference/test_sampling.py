"""The one sampler: greedy, repetition penalty as transformers applies it, top-k, top-p, seeds."""

from __future__ import annotations

import pytest
import torch

from chattune.config import GenerateArgs
from chattune.inference.sampling import (
    SamplingParams,
    params_from_defaults,
    penalize_repeats,
    sample,
    sample_row,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_greedy_takes_the_largest_logit_per_row():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    rows = [(SamplingParams(max_tokens=1), [], None)] * 2
    assert sample(logits, rows) == [1, 0]


def test_the_repetition_penalty_is_transformers_own():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 50, generator=_gen(0))
    seen = [3, 7, 7, 12, 40]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), logits.clone())[0]
    torch.testing.assert_close(penalize_repeats(logits[0].clone(), seen, 1.3), expected)
    assert torch.equal(penalize_repeats(logits[0], seen, 1.0), logits[0])


def test_the_penalty_changes_a_greedy_pick():
    logits = torch.tensor([[2.0, 1.8, -5.0]])
    params = SamplingParams(max_tokens=1, repetition_penalty=1.3)
    assert sample(logits, [(params, [0], None)]) == [1]  # 2.0 / 1.3 < 1.8
    assert sample(logits, [(params, [], None)]) == [0]


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([5.0, 4.9, 4.8, -1.0, -2.0])
    params = SamplingParams(max_tokens=1, temperature=5.0, top_k=2)
    picks = {sample_row(logits, params, _gen(s)) for s in range(200)}
    assert picks == {0, 1}
    assert sample_row(logits, SamplingParams(max_tokens=1, temperature=1.0, top_k=1), _gen(0)) == 0


def test_top_p_keeps_the_smallest_set_over_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.75)
    picks = {sample_row(probs.log(), params, _gen(s)) for s in range(300)}
    assert picks == {0, 1}


def test_a_seed_repeats_and_rows_are_independent():
    logits = torch.zeros(2, 1000)
    params = SamplingParams(max_tokens=1, temperature=1.0)
    first = sample(logits, [(params, [], _gen(1)), (params, [], _gen(2))])
    again = sample(logits, [(params, [], _gen(1)), (params, [], _gen(2))])
    assert first == again and first[0] != first[1]
    alone = sample(logits[:1], [(params, [], _gen(2))])
    assert alone == first[1:]  # a row's draw does not depend on its neighbours


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, (12, 0.0, 0.9, 0, 1.0)),
    ({"temperature": 0.5}, (12, 0.5, 0.9, 0, 1.0)),
    ({"temperature": 0.5, "do_sample": False}, (12, 0.0, 0.9, 0, 1.0)),
    ({"do_sample": True}, (12, 0.7, 0.9, 0, 1.0)),
    ({"top_k": 5, "top_p": 0.5, "repetition_penalty": 1.2}, (12, 0.0, 0.5, 5, 1.2)),
])
def test_request_settings_over_the_run_s_defaults(kw, expected):
    params = params_from_defaults(GenerateArgs(max_new_tokens=12), **kw)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.repetition_penalty) == expected
    sampled = params_from_defaults(GenerateArgs(do_sample=True, temperature=0.3), 4)
    assert (sampled.max_tokens, sampled.temperature) == (4, 0.3)


def test_a_row_that_breaks_the_sampler_fails_alone():
    logits = torch.zeros(3, 100)
    good = SamplingParams(max_tokens=1, temperature=1.0)
    broken = SamplingParams(max_tokens=1, temperature=1e-320)  # 0 in float32: logits / 0, no distribution
    failed = []
    tokens = sample(logits, [(good, [], _gen(1)), (broken, [], _gen(2)), (good, [], _gen(3))],
                    on_error=lambda i, exc: failed.append(i))
    assert failed == [1] and tokens[1] is None
    assert [tokens[0], tokens[2]] == [sample(logits[:1], [(good, [], _gen(s))])[0] for s in (1, 3)]
    with pytest.raises(RuntimeError):
        sample(logits, [(broken, [], _gen(2))])


def _kept_by_full_sort(scores, top_k, top_p):
    """The tokens top-k then top-p keep, by sorting the whole row (the sampler's former code)."""
    if 0 < top_k < scores.shape[0]:
        scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort()
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return set(torch.nonzero(scores > float("-inf")).flatten().tolist()), scores.softmax(-1)


@pytest.mark.parametrize(("spread", "top_k", "top_p"), [
    (3.0, 0, 0.9), (3.0, 0, 0.5), (3.0, 40, 0.95), (3.0, 5, 1.0),
    (0.01, 0, 0.9),  # nearly flat: the nucleus holds ~45k tokens, past the sorted candidates
    (8.0, 0, 0.99), (1.0, 3000, 0.9),
])
def test_the_nucleus_is_the_one_a_full_sort_finds(spread, top_k, top_p):
    from chattune.inference.sampling import CANDIDATES, nucleus

    for seed in range(5):
        scores = torch.randn(50_000, generator=_gen(seed)) * spread
        ids, probs = nucleus(scores, top_k, top_p)
        expected, full = _kept_by_full_sort(scores, top_k, top_p)
        assert set(ids.tolist()) == expected
        torch.testing.assert_close(probs / probs.sum(), full[ids])
    assert spread != 0.01 or len(expected) > CANDIDATES


def test_top_k_keeps_ties_with_the_kth_score():
    from chattune.inference.sampling import nucleus

    scores = torch.tensor([3.0, 2.0, 2.0, 2.0, -1.0, float("-inf")])
    assert sorted(nucleus(scores, 2, 1.0)[0].tolist()) == [0, 1, 2, 3]


def test_filtered_draws_follow_the_kept_probabilities():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.85)  # keeps the first four (0.9)
    generator = _gen(7)
    counts = torch.bincount(torch.tensor([sample_row(probs.log(), params, generator) for _ in range(6000)]),
                            minlength=6)
    assert counts[4:].sum() == 0
    torch.testing.assert_close(counts[:4] / 6000, probs[:4] / 0.9, atol=0.02, rtol=0)


def test_a_filtered_row_with_no_finite_score_is_refused():
    broken = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9)
    with pytest.raises(RuntimeError, match="no token has a finite probability"):
        sample_row(torch.full((10,), float("nan")), broken, _gen(0))


@pytest.mark.parametrize(("spread", "top_k", "top_p"), [
    (3.0, 0, 0.9), (8.0, 0, 0.5), (3.0, 40, 0.95), (3.0, 5, 1.0), (0.01, 0, 0.9), (1.0, 0, 1.0),
])
def test_rows_sampled_together_draw_what_each_draws_alone(spread, top_k, top_p):
    logits = torch.randn(6, 5000, generator=_gen(11)) * spread
    logits[2, :40] = logits[2, 0]  # ties at the k-th score: this row is left to sample_row
    logits[4] = float("nan")  # this one breaks, alone
    params = SamplingParams(max_tokens=1, temperature=0.8, top_k=top_k, top_p=top_p)
    failed = []
    for step in range(3):
        together = sample(logits, [(params, [], _gen(100 * step + i)) for i in range(6)],
                          on_error=lambda i, exc: failed.append(i))
        alone = [sample(logits[i:i + 1], [(params, [], _gen(100 * step + i))], on_error=lambda *_: None)[0]
                 for i in range(6)]
        assert together == alone and together[4] is None
    assert failed == [4, 4, 4]
    if spread >= 3.0:  # these rows are settled together, not one by one
        from chattune.inference.sampling import sample_alike

        assert None not in sample_alike(logits[[0, 1, 3, 5]], 0.8, top_k, top_p, [_gen(i) for i in range(4)])


def test_rows_with_a_penalty_or_other_settings_are_sampled_by_their_own():
    logits = torch.randn(4, 300, generator=_gen(5))
    settings = [SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9),
                SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, repetition_penalty=1.3),
                SamplingParams(max_tokens=1, temperature=0.5, top_p=0.9),
                SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9)]
    rows = [(params, [1, 2, 3], _gen(i)) for i, params in enumerate(settings)]
    alone = [sample(logits[i:i + 1], [(settings[i], [1, 2, 3], _gen(i))])[0] for i in range(4)]
    assert sample(logits, rows) == alone


def test_a_top_p_too_small_for_float32_keeps_the_best_token():
    logits = torch.tensor([[0.5, 3.0, 1.0], [2.0, 0.0, 1.0]])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=5e-324)  # 0.0 in float32
    assert sample(logits, [(params, [], _gen(0)), (params, [], _gen(1))]) == [1, 0]
    assert sample(logits[:1], [(params, [], _gen(0))]) == [1]
