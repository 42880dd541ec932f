"""Training throughput on one process vs several (torchrun, data parallel), same model and data.

    python benchmarks/ddp_throughput.py                 # about 4 minutes on 2 CPU cores
    python benchmarks/ddp_throughput.py --nproc 4 --steps 60 --hidden 1024 --layers 8   # a GPU box

Every arm trains the same random GLM-4 (``--hidden`` x ``--layers``, a byte-level BPE tokenizer
of 8192 tokens trained on the data, as in ``train_throughput.py``) with LoRA r=8 on the rows
of ``../shared/data/alpaca_en_demo.json`` (alpaca template, max_seq_length 512, packed, batch
``--batch`` rows a step and device, seed 42) for ``--steps`` optimizer steps, each run a fresh
``chattune train`` (``--nproc N`` for the N-process arm: torchrun, gloo on CPU, NCCL on CUDA).
Tokens/s is the Trainer's: tokens seen by all processes over its train_runtime; per device is
that over N. Arms run interleaved (1, N, 1, N) and the table keeps each arm's faster run: the
machine is shared and its speed swings.

Caveat on a CPU box: N processes share the same cores (each gets cores / N threads), so data
parallel cannot beat one process using every core; what the N-process arm measures there is
the cost of the gradient all-reduce and the split. On N GPUs each process has its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import build_model  # noqa: E402  (the same model builder)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_demo.json"


def run(model: Path, data: Path, out: Path, nproc: int, args, cache: Path) -> dict:
    """One training run; its tokens/s from metrics.jsonl's final Trainer summary."""
    command = [sys.executable, "-m", "chattune.cli", "train", f"model_name_or_path={model}",
               f"train_files=[{data}]", "template=alpaca", "max_seq_length=512", "lora_rank=8",
               f"per_device_train_batch_size={args.batch}", f"max_steps={args.steps}", "save_steps=100000",
               "logging_steps=5", "learning_rate=2e-3", "seed=42", "report_to=none", f"output_dir={out}"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = dict(os.environ, CHATTUNE_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next(row for row in reversed(rows) if "train_runtime" in row and "train_loss" in row)
    tokens = summary["num_input_tokens_seen"]
    total = tokens / summary["train_runtime"]
    return {"nproc": nproc, "tokens": tokens, "seconds": summary["train_runtime"], "total": total,
            "per_device": total / nproc, "loss": summary["train_loss"]}


def main() -> None:
    """Run the arms interleaved and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not SHARED.is_file():
        sys.exit(f"data not found: {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(root / "model", SHARED, args.hidden, args.layers)
        best: dict[int, dict] = {}
        for repeat in range(args.repeats):
            for nproc in (1, args.nproc):
                result = run(model, SHARED, root / f"run-{nproc}-{repeat}", nproc, args, root / "cache")
                print(f"  run {repeat + 1}: {nproc} process{'es' if nproc > 1 else ''}: "
                      f"{result['total']:,.0f} tokens/s", flush=True)
                if nproc not in best or result["total"] > best[nproc]["total"]:
                    best[nproc] = result
    cores = os.cpu_count()
    print(f"\nGLM-4 {args.hidden} x {args.layers}, LoRA r=8, packed, {args.batch} rows a step and device, "
          f"{args.steps} steps, {cores} CPU cores{' + CUDA' if _cuda() else ''}; best of {args.repeats}")
    print(f"{'processes':>9} {'tokens':>8} {'seconds':>8} {'tokens/s total':>15} {'per device':>11} {'vs 1':>6}")
    for nproc in sorted(best):
        r = best[nproc]
        print(f"{nproc:>9} {r['tokens']:>8} {r['seconds']:>8.1f} {r['total']:>15,.0f} {r['per_device']:>11,.0f} "
              f"{r['total'] / best[1]['total']:>5.2f}x")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
