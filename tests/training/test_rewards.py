"""GRPO's rewards: the built-in ones, a user's function from a file, and the guard that names the
function that raised, returned NaN or the wrong count."""

from __future__ import annotations

import math

import pytest
import torch

from chattune.config import RlArgs
from chattune.errors import ConfigError, TrainingError
from chattune.training.rewards import (
    Reward,
    RewardSet,
    answer_match,
    build_rewards,
    format_match,
    load_function,
    overlong,
    same_answer,
    tagged_answer,
)


def test_tagged_answer_takes_the_last_tag_pair():
    assert tagged_answer("I think <answer>3</answer>, no: <answer> 4 </answer>.") == "4"
    assert tagged_answer("no tags") is None
    assert tagged_answer("<result>7</result>", "result") == "7"
    assert tagged_answer("<answer>7") is None


@pytest.mark.parametrize("given,expected,same", [("4", "4.0", True), ("1,000", "1000", True), ("-3", "-3", True),
                                                 ("3", "4", False), ("Paris", " paris ", True), ("4 apples", "4", False)])
def test_same_answer_compares_numbers_as_numbers(given, expected, same):
    assert same_answer(given, expected) is same


def test_answer_match_scores_the_tagged_answer_against_the_reference():
    reward = answer_match()
    completions = ["<answer>12</answer>", "12", "<answer>13</answer>", "<answer>12.0</answer>", "<answer>x</answer>"]
    assert reward(completions=completions, answer=["12", "12", "12", "12", None]) == [1.0, 0.0, 0.0, 1.0, None]


def test_format_reward_finds_the_pattern():
    assert format_match(None)(completions=["a <answer>1</answer>", "<answer>1", ""]) == [1.0, 0.0, 0.0]
    assert format_match(r"^Answer: \d+$")(completions=["Answer: 42", "Answer: x"]) == [1.0, 0.0]


def test_overlong_penalty_falls_linearly_over_the_buffer():
    reward = overlong(max_length=20, buffer=4)
    assert reward(completion_ids=[[0] * n for n in (10, 16, 17, 18, 20)]) == [0.0, 0.0, -0.25, -0.5, -1.0]


def test_a_user_function_is_loaded_from_its_file(tmp_path):
    (tmp_path / "mine.py").write_text("def brevity(completions, **kwargs):\n"
                                      "    return [1.0 / (1 + len(c)) for c in completions]\n")
    rewards = build_rewards(RlArgs(reward_funcs=["format", f"{tmp_path / 'mine.py'}:brevity"]))
    assert [r.name for r in rewards] == ["format", "brevity"]
    assert rewards[1].function(completions=["abc"]) == [0.25]


@pytest.mark.parametrize("spec,message", [
    ("nope", "neither a built-in reward"),
    ("missing.py:f", "no file"),
    ("{dir}/mine.py:absent", "has no function 'absent' \\(it has brevity\\)"),
    ("{dir}/broken.py:f", "importing .*broken.py failed: SyntaxError"),
])
def test_a_reward_that_cannot_be_had_names_what_is_wrong(tmp_path, spec, message):
    (tmp_path / "mine.py").write_text("def brevity(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(ConfigError, match=f"reward_funcs: .*{message}"):
        load_function(spec.format(dir=tmp_path))


def test_the_same_reward_twice_is_refused():
    with pytest.raises(ConfigError, match="format named twice"):
        build_rewards(RlArgs(reward_funcs=["format", "format"]))


def _set(function, name="mine") -> RewardSet:
    return RewardSet([Reward("answer_match", answer_match()), Reward(name, function)], [1.0, 0.5])


INPUTS = {"prompts": [[{"role": "user", "content": "q"}]] * 2, "completions": ["<answer>1</answer>", "2"],
          "completion_ids": [[1, 2], [3]], "answer": ["1", "1"]}


def test_a_reward_set_gives_one_column_per_function_nan_for_none():
    scores = _set(lambda completions, **kw: [None, 0.5]).score(7, **INPUTS)
    assert scores.shape == (2, 2)
    assert scores[:, 0].tolist() == [1.0, 0.0]
    assert math.isnan(scores[0, 1]) and scores[1, 1] == 0.5
    assert _set(lambda completions, **kw: [True, torch.tensor(2.0)]).score(0, **INPUTS)[:, 1].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("function,message", [
    (lambda **kw: 1 / 0, "step 7: reward function mine raised ZeroDivisionError: division by zero"),
    (lambda **kw: [1.0], "step 7: reward function mine returned 1 values for 2 completions"),
    (lambda **kw: [1.0, float("nan")], "step 7: reward function mine returned nan for completion 1"),
    (lambda **kw: [1.0, float("inf")], "returned inf for completion 1"),
    (lambda **kw: [1.0, "high"], "returned 'high' for completion 1 \\(a number or None expected\\)"),
    (lambda **kw: 3.0, "returned float, not a list of 2 numbers"),
])
def test_a_bad_reward_fails_the_step_naming_the_function(function, message):
    with pytest.raises(TrainingError, match=message):
        _set(function).score(7, **INPUTS)
