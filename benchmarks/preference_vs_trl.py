"""DPO speed and memory: chattune's preference stage against TRL's DPOTrainer with peft, on the
same model, pairs, batch, steps and LoRA settings, interleaved (chattune, TRL, chattune, TRL;
each arm in its own process, the fastest of each kept).

    python benchmarks/preference_vs_trl.py [--pairs 16] [--steps 4] [--batch 2] [--max-length 256]

Model: SmolLM2-135M-Instruct (``chattune fetch smollm2``); data: the first ``--pairs`` pairs of
LLaMA-Factory's dpo_en_demo.json, given to TRL in its conversational form so that both render
them with SmolLM2's own chat template. LoRA r16, alpha 32, dropout 0.05 on every linear layer;
the reference is the model with the adapter switched off, computed at every step in both (TRL's
default with peft); sigmoid loss, beta 0.1. Printed per arm: the Trainer's train_runtime, pairs/s,
tokens/s (each arm's own count of the tokens its policy forward passes carried) and the process's
peak resident memory. Needs ``pip install trl``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"


def _messages(turns: list[dict]) -> list[dict]:
    return [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]


def write_data(folder: Path, pairs: int) -> Path:
    """The first ``pairs`` pairs, in LLaMA-Factory's form (chattune) and TRL's conversational form."""
    rows = json.loads(DATA.read_text(encoding="utf-8"))
    rows = [r for r in rows if len(r["conversations"]) == 1][:pairs]
    (folder / "pairs.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    trl = [{"prompt": _messages(r["conversations"]), "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}]} for r in rows]
    (folder / "trl.json").write_text(json.dumps(trl, ensure_ascii=False), encoding="utf-8")
    return folder


def run_chattune(model: str, folder: Path, args) -> dict:
    """One chattune DPO run; its Trainer runtime and tokens."""
    from chattune.config_io import load_config
    from chattune.training.recipe import train

    out = folder / "chattune-run"
    config = load_config(None, [
        f"model_name_or_path={model}", f"train_files=[{folder / 'pairs.json'}]", "stage=dpo", "pref_beta=0.1",
        "lora_rank=16", "lora_dropout=0.05", "lora_target=all-linear", f"max_seq_length={args.max_length}",
        f"per_device_train_batch_size={args.batch}", f"max_steps={args.steps}", "learning_rate=5e-5",
        "logging_steps=1", "save_steps=100000", f"output_dir={out}", "report_to=[none]", "seed=0", *args.chattune_set])
    train(config, log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "train_runtime" in r][-1]
    return {"runtime": final["train_runtime"], "tokens": final.get("num_input_tokens_seen")}


def run_trl(model: str, folder: Path, args) -> dict:
    """One TRL DPOTrainer run with peft; its Trainer runtime and tokens."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype="float32")
    data = load_dataset("json", data_files=str(folder / "trl.json"), split="train")
    config = DPOConfig(output_dir=str(folder / "trl-run"), per_device_train_batch_size=args.batch,
                       max_steps=args.steps, learning_rate=5e-5, logging_steps=1, save_strategy="no",
                       report_to="none", max_length=args.max_length, beta=0.1, loss_type=["sigmoid"], seed=0,
                       use_cpu=True, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=policy, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    output = trainer.train()
    tokens = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    return {"runtime": output.metrics["train_runtime"], "tokens": tokens[-1] if tokens else None}


def child(arm: str, model: str, folder: Path, args) -> None:
    result = (run_chattune if arm == "chattune" else run_trl)(model, folder, args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chattune-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more config keys for the chattune arm (e.g. loss_chunk_size=256)")
    parser.add_argument("--child", choices=["chattune", "trl"])
    parser.add_argument("--model")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, Path(args.folder), args)
        return
    from chattune.model import native_model_path
    from chattune.pretrained import fetch

    model = native_model_path(str(fetch("smollm2")))
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for arm in ("chattune", "trl"):
                folder = Path(tmp) / f"{arm}-{round_}"
                folder.mkdir()
                write_data(folder, args.pairs)
                done = subprocess.run([sys.executable, __file__, "--child", arm, "--model", model, "--folder", str(folder),
                                       "--pairs", str(args.pairs), "--steps", str(args.steps), "--batch", str(args.batch),
                                       "--max-length", str(args.max_length), "--chattune-set", *args.chattune_set],
                                      capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    sys.exit(f"{arm} failed:\n{done.stderr[-3000:]}")
                result = json.loads(lines[-1][7:])
                print(f"round {round_ + 1} {arm:<9} {result['runtime']:7.1f} s  peak {result['peak_rss_mib']:7.0f} MiB",
                      flush=True)
                kept = best.setdefault(arm, result)
                if result["runtime"] < kept["runtime"]:
                    kept.update(runtime=result["runtime"], tokens=result["tokens"])
                kept["peak_rss_mib"] = min(kept["peak_rss_mib"], result["peak_rss_mib"])
    pairs = args.steps * args.batch
    print(f"\nDPO, SmolLM2-135M-Instruct, LoRA r16 all-linear, {args.steps} steps x {args.batch} pairs, "
          f"max length {args.max_length}, fastest of {args.rounds}")
    print(f"{'arm':<10} {'runtime s':>9} {'pairs/s':>8} {'tokens':>8} {'tokens/s':>9} {'peak MiB':>9}")
    for arm, r in best.items():
        tokens = r["tokens"] or 0
        print(f"{arm:<10} {r['runtime']:>9.1f} {pairs / r['runtime']:>8.3f} {tokens:>8} {tokens / r['runtime']:>9.1f} "
              f"{r['peak_rss_mib']:>9.0f}")
    if {"chattune", "trl"} <= best.keys():
        print(f"chattune / TRL: {best['trl']['runtime'] / best['chattune']['runtime']:.2f}x pairs/s, "
              f"peak memory {best['chattune']['peak_rss_mib'] / best['trl']['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
