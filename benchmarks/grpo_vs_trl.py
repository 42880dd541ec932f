"""GRPO speed against TRL's GRPOTrainer with peft: the same model, prompts, group size, completion
length, LoRA and steps, arms interleaved (chattune, TRL, chattune, TRL, ...; best of each).

    python benchmarks/grpo_vs_trl.py --workdir grpo-vs-trl [--steps 4] [--rounds 2] [--model PATH]

The model is SmolLM2-135M-Instruct (``chattune fetch smollm2``'s GGUF, in the native folder chattune
converts it to, which both arms load) unless ``--model`` names another folder. Each step samples
``--prompts`` prompts x ``--group`` completions of at most ``--max-completion`` tokens
(temperature 0.8), scores them with the same reward (the built-in ``format`` reward's rule: a
number inside <answer></answer>), and takes one optimizer step: LoRA rank 16 on every linear
layer, learning rate 2e-4, KL weight 0.04 to the adapter switched off, TRL's ``bnpo`` loss, float32,
no gradient checkpointing (TRL's defaults, bf16 and gradient checkpointing, are set off to match
chattune's). Each arm runs in a process of its own and reports its training time (the Trainer's
``train_runtime``: model loading excluded), completions per second, optimizer steps per minute and
peak resident memory. The table goes to stdout and ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "What is {a} + {b}? Put the final answer inside <answer></answer> tags, for example <answer>7</answer>."
PATTERN = r"<answer>\s*-?\d+\s*</answer>"


def prompts_file(workdir: Path, count: int) -> Path:
    """Alpaca rows of A + B questions (seeded), the sum as the reference."""
    rng = random.Random(0)
    pairs = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(count)]
    path = workdir / "prompts.json"
    path.write_text(json.dumps([{"instruction": QUESTION.format(a=a, b=b), "input": "", "output": str(a + b)}
                                for a, b in pairs]))
    return path


def run_chattune(args, out: Path) -> dict:
    """One chattune arm, in this process: ``chattune train stage=grpo``."""
    from chattune.config_io import load_config
    from chattune.training.recipe import train

    config = load_config(None, [
        f"model_name_or_path={args.model}", f"train_files=[{args.data}]", f"output_dir={out}", "stage=grpo",
        "method=lora", "lora_rank=16", "lora_alpha=32", "lora_dropout=0", "lora_target=all-linear",
        f"per_device_train_batch_size={args.prompts}", f"num_generations={args.group}",
        f"max_completion_length={args.max_completion}", "max_seq_length=256", "grpo_temperature=0.8",
        "grpo_beta=0.04", "grpo_loss=bnpo", "learning_rate=2e-4", "reward_funcs=[format]",
        f"format_pattern={PATTERN}", f"max_steps={args.steps}", "logging_steps=1", f"save_steps={args.steps}",
        "report_to=none", "seed=0", "dedup=false"])
    train(config, log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in rows if "train_runtime" in r)
    lengths = [r["completion_length"] for r in rows if "completion_length" in r]
    return {"train_seconds": runtime, "mean_completion_length": sum(lengths) / len(lengths)}


def run_trl(args, out: Path) -> dict:
    """One TRL arm, in this process: GRPOTrainer with a peft LoraConfig."""
    import re

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rows = json.loads(Path(args.data).read_text())
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["instruction"]}] for r in rows]})
    pattern = re.compile(PATTERN, re.DOTALL)

    def fmt(completions, **kwargs):
        return [float(pattern.search(c[0]["content"] if isinstance(c, list) else c) is not None)
                for c in completions]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
    config = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, gradient_checkpointing=False,
                        per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
                        max_completion_length=args.max_completion, temperature=0.8, beta=0.04, loss_type="bnpo",
                        learning_rate=2e-4, max_steps=args.steps, logging_steps=1, save_strategy="no",
                        report_to="none", seed=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=fmt, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"train_seconds": result.metrics["train_runtime"],
            "mean_completion_length": sum(lengths) / len(lengths) if lengths else float("nan")}


def arm(args) -> None:
    """Run one arm and print its JSON line (training time, peak RSS)."""
    out = Path(args.workdir) / f"{args.arm}-{args.round}"
    started = time.perf_counter()
    figures = run_chattune(args, out) if args.arm == "chattune" else run_trl(args, out)
    figures["wall_seconds"] = time.perf_counter() - started
    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print("RESULT " + json.dumps(figures), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="grpo-vs-trl")
    parser.add_argument("--model", default=None, help="a model folder (default: SmolLM2-135M-Instruct, converted)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-completion", type=int, default=24)
    parser.add_argument("--arm", choices=("chattune", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        return arm(args)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from chattune.model import native_model_path
        from chattune.pretrained import fetch

        args.model = native_model_path(str(fetch("smollm2")))
    data = prompts_file(workdir, args.prompts * args.steps * 2)
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for name in ("chattune", "trl"):
            command = [sys.executable, __file__, "--arm", name, "--round", str(round_), "--workdir", str(workdir),
                       "--model", args.model, "--data", str(data), "--steps", str(args.steps), "--prompts",
                       str(args.prompts), "--group", str(args.group), "--max-completion", str(args.max_completion)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} round {round_} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            figures = json.loads(line[len("RESULT "):])
            print(f"round {round_} {name}: {json.dumps(figures)}", flush=True)
            if name not in best or figures["train_seconds"] < best[name]["train_seconds"]:
                best[name] = figures
    completions = args.steps * args.prompts * args.group
    print(f"\nGRPO, {Path(args.model).name}: {args.steps} steps x {args.prompts} prompts x {args.group} completions "
          f"(<= {args.max_completion} tokens), LoRA r16 all linear, float32; best of {args.rounds} interleaved rounds")
    print("| arm | training s | completions/s | optimizer steps/min | mean completion tokens | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("chattune", "trl"):
        f = best[name]
        print(f"| {name} | {f['train_seconds']:.1f} | {completions / f['train_seconds']:.2f} | "
              f"{60 * args.steps / f['train_seconds']:.2f} | {f['mean_completion_length']:.1f} | {f['peak_rss_gib']:.2f} |")
    ratio = best["trl"]["train_seconds"] / best["chattune"]["train_seconds"]
    print(f"chattune / TRL speed: {ratio:.2f}x")
    (workdir / "result.json").write_text(json.dumps({"best": best, "speedup": ratio, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
