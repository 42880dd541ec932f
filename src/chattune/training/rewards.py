"""GRPO's reward functions: the built-in ones, a user's own from a Python file, a reward model,
and the guard that checks what each returns.

A reward function is called with keyword arguments, as TRL calls its reward functions, so one
written for TRL's GRPOTrainer works here::

    def my_reward(prompts, completions, completion_ids, answer, **kwargs) -> list[float | None]

- ``prompts``: each completion's prompt, the conversation before the answer (a list of
  ``{"role", "content"}`` messages); one entry per completion (a prompt's group repeats it);
- ``completions``: the sampled answers' text;
- ``completion_ids``: their token ids (the end token included when one was sampled);
- ``answer``: the row's reference answer (its final assistant message; None when the row has none).

It returns one float per completion, or None where it does not apply (a completion that no
function scores gets no advantage). Built in:

- ``answer_match``: 1.0 when the text inside the completion's last ``<answer>...</answer>`` (the
  tag is ``answer_tag``) equals the reference answer, numbers compared as numbers, else 0.0;
- ``format``: 1.0 when ``format_pattern`` is found in the completion (default: an answer tag
  pair), else 0.0;
- ``overlong``: DAPO's soft overlong penalty: 0 up to ``max_completion_length - buffer`` tokens,
  then falling linearly to -1 at ``max_completion_length``.

:class:`RewardSet` calls every function on a batch and refuses, naming the function, one that
raises, returns the wrong number of values, a value that is not a number, or NaN/inf.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from chattune.config import RlArgs
from chattune.errors import ConfigError, TrainingError

BUILT_IN = ("answer_match", "format", "overlong")
NUMBER_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def tagged_answer(text: str, tag: str = "answer") -> str | None:
    """The text inside the last ``<tag>...</tag>`` of ``text``, stripped (None without one)."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def same_answer(given: str, expected: str) -> bool:
    """Whether two answers are the same: as numbers when both are numbers (``1,000`` is ``1000``,
    ``4.0`` is ``4``), else as text with surrounding whitespace and case ignored."""
    a, b = given.strip().replace(",", ""), expected.strip().replace(",", "")
    if NUMBER_RE.match(a) and NUMBER_RE.match(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return given.strip().casefold() == expected.strip().casefold()


def answer_match(tag: str = "answer") -> Callable:
    """The ``answer_match`` reward: 1.0 when the completion's tagged answer is the reference one."""

    def reward(completions, answer, **kwargs):
        out = []
        for text, expected in zip(completions, answer, strict=True):
            given = tagged_answer(text, tag)
            out.append(None if expected is None else float(given is not None and same_answer(given, expected)))
        return out

    reward.__name__ = "answer_match"
    return reward


def format_match(pattern: str | None, tag: str = "answer") -> Callable:
    """The ``format`` reward: 1.0 when ``pattern`` (default: a ``<tag>...</tag>`` pair) is found."""
    compiled = re.compile(pattern if pattern is not None else rf"<{re.escape(tag)}>.*?</{re.escape(tag)}>",
                          re.DOTALL)

    def reward(completions, **kwargs):
        return [float(compiled.search(text) is not None) for text in completions]

    reward.__name__ = "format"
    return reward


def overlong(max_length: int, buffer: int) -> Callable:
    """The ``overlong`` reward (DAPO's soft overlong punishment): 0 for a completion of at most
    ``max_length - buffer`` tokens, then -1/buffer per token more, -1 at ``max_length``."""
    start = max_length - buffer

    def reward(completion_ids, **kwargs):
        return [-min(1.0, max(0, len(ids) - start) / buffer) for ids in completion_ids]

    reward.__name__ = "overlong"
    return reward


def load_function(spec: str, where: str = "reward_funcs") -> Callable:
    """The function ``FILE.py:NAME`` names (the file run as a module of its own). Raises
    ConfigError naming the file or function when it cannot be had."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not path_text or not name:
        raise ConfigError(f"{where}: {spec!r} is neither a built-in reward ({', '.join(BUILT_IN)}) nor FILE.py:NAME")
    if not path.is_file():
        raise ConfigError(f"{where}: {spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"chattune_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"{where}: {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        found = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
        raise ConfigError(f"{where}: {spec}: {path} has no function {name!r}"
                          + (f" (it has {', '.join(sorted(found))})" if found else ""))
    return function


@dataclass
class Reward:
    """One reward: its name (as logged: ``rewards/NAME/mean``) and its function."""

    name: str
    function: Callable


def build_rewards(rl: RlArgs, scorer_loader: Callable[[str], object] | None = None) -> list[Reward]:
    """The rewards ``rl`` names, in order (``reward_model`` last). ``scorer_loader(path)`` loads a
    reward model run as an object with ``score(conversations) -> list[float]``."""
    rewards = []
    for spec in rl.reward_funcs:
        if spec == "answer_match":
            rewards.append(Reward(spec, answer_match(rl.answer_tag)))
        elif spec == "format":
            rewards.append(Reward(spec, format_match(rl.format_pattern, rl.answer_tag)))
        elif spec == "overlong":
            buffer = rl.overlong_buffer or max(1, rl.max_completion_length // 4)
            rewards.append(Reward(spec, overlong(rl.max_completion_length, buffer)))
        else:
            function = load_function(spec)
            rewards.append(Reward(getattr(function, "__name__", spec.rpartition(":")[2]), function))
    if rl.reward_model:
        if scorer_loader is None:
            raise ConfigError("reward_model: no way to load a reward model here")
        scorer = scorer_loader(rl.reward_model)

        def model_reward(prompts, completions, **kwargs):
            return scorer.score([list(p) + [{"role": "assistant", "content": c}]
                                 for p, c in zip(prompts, completions, strict=True)])

        rewards.append(Reward("reward_model", model_reward))
    names = [r.name for r in rewards]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"reward_funcs: {', '.join(twice)} named twice; each reward is logged by its name")
    return rewards


class RewardSet:
    """The rewards of a run with their weights: :meth:`score` gives the ``[completions, rewards]``
    matrix (NaN where a function said None), checked."""

    def __init__(self, rewards: list[Reward], weights: list[float] | None = None):
        self.rewards = rewards
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(rewards), dtype=torch.float32)

    @property
    def names(self) -> list[str]:
        """The rewards' names, in order."""
        return [r.name for r in self.rewards]

    def score(self, step: int, **inputs) -> torch.Tensor:
        """Every reward of every completion (``inputs``: the keyword arguments the functions get;
        ``completions`` sets the count). Raises TrainingError naming the function and ``step``
        when one raises, returns another count, a non-number, NaN or inf."""
        count = len(inputs["completions"])
        columns = []
        for reward in self.rewards:
            where = f"step {step}: reward function {reward.name}"
            try:
                values = reward.function(**inputs)
            except Exception as exc:
                raise TrainingError(f"{where} raised {type(exc).__name__}: {exc}") from exc
            try:
                values = list(values)
            except TypeError:
                raise TrainingError(f"{where} returned {type(values).__name__}, not a list of "
                                    f"{count} numbers") from None
            if len(values) != count:
                raise TrainingError(f"{where} returned {len(values)} values for {count} completions "
                                    "(one per completion expected)")
            column = []
            for i, value in enumerate(values):
                if value is None:
                    column.append(float("nan"))
                    continue
                if not isinstance(value, numbers.Real) and not (isinstance(value, torch.Tensor)
                                                                and value.numel() == 1):
                    raise TrainingError(f"{where} returned {value!r} for completion {i} (a number or None expected)")
                number = float(value)
                if not math.isfinite(number):
                    raise TrainingError(f"{where} returned {number} for completion {i} (rewards must be finite; "
                                        "return None where the function does not apply)")
                column.append(number)
            columns.append(column)
        return torch.tensor(columns, dtype=torch.float32).T.reshape(count, len(self.rewards))
