"""How long from pressing Start on the page to the first logged step, against ``chattune train``.

    python benchmarks/workbench_start.py --workdir wbstart [--model PATH] [--rounds 3]

The same config (a tiny Llama unless ``--model``; one Alpaca file; ``logging_steps=1``) is
started two ways, interleaved (CLI, page, CLI, page, ...; best of each):

- ``chattune train config.yaml`` as a user types it: from the process start to the first row
  with a loss in the run's ``metrics.jsonl``;
- the page: a ``chattune workbench`` server already running (as a user's is), ``POST
  /ui/api/workbench/jobs`` with the form, to the same first row. The page's own part is the
  request, the form's checks (``chattune train``'s code), the queue and the job's process start.

The table gives both times and the difference (the goal: the page adds under a second).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

FORM = {"train_files": "alpaca.json", "max_steps": "20", "logging_steps": "1", "save_steps": "100000",
        "max_seq_length": "128", "per_device_train_batch_size": "2"}


def first_step(run_dir: Path, started: float, timeout: float = 600.0) -> float:
    """Seconds from ``started`` until the run's metrics.jsonl holds a row with a loss."""
    metrics = run_dir / "metrics.jsonl"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            return time.perf_counter() - started
        time.sleep(0.005)
    raise RuntimeError(f"{run_dir}: no logged step within {timeout} s")


def cli_arm(folders: Path, name: str, model: str) -> float:
    """``chattune train`` from a config file: process start to the first logged step."""
    out = folders / "runs" / name
    lines = [f"model_name_or_path: {model}", f"output_dir: {out}",
             f"train_files: [{folders / 'data' / 'alpaca.json'}]"]
    lines += [f"{key}: {value}" for key, value in FORM.items() if key != "train_files"]
    config = folders / f"{name}.yaml"
    config.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "chattune", "train", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return first_step(out, started)
    finally:
        process.wait()


def page_arm(url: str, folders: Path, name: str, model_name: str) -> float:
    """``POST /ui/api/workbench/jobs`` to the first logged step."""
    body = json.dumps({"kind": "train", "values": {**FORM, "model_name_or_path": model_name,
                                                    "output_dir": name}}).encode()
    request = urllib.request.Request(url + "/ui/api/workbench/jobs", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request) as answer:
        job = json.loads(answer.read())
    elapsed = first_step(folders / "runs" / name, started)
    while True:  # the next arm starts on a quiet machine
        with urllib.request.urlopen(f"{url}/ui/api/workbench/jobs/{job['id']}") as answer:
            if json.loads(answer.read())["state"] not in ("queued", "running"):
                return elapsed
        time.sleep(0.1)


def main() -> int:
    """Run the arms and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--model", help="a model folder (default: a tiny random Llama built here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()
    root = Path(args.workdir).resolve()
    shutil.rmtree(root / "runs", ignore_errors=True)
    for folder in ("models", "data", "runs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    model = root / "models" / "model"
    if not model.exists():
        if args.model:
            shutil.copytree(args.model, model)
        else:
            subprocess.run([sys.executable, "-m", "chattune", "tiny-model", str(model), "--arch", "llama",
                            "--hidden-size", "64", "--num-layers", "2"], check=True, capture_output=True)
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{2 * i}"} for i in range(200)]
    (root / "data" / "alpaca.json").write_text(json.dumps(rows))
    server = subprocess.Popen([sys.executable, "-m", "chattune", "workbench", "--models-dir", str(root / "models"),
                               "--data-dir", str(root / "data"), "--runs-dir", str(root / "runs"),
                               "--port", str(args.port), "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health")
                break
            except OSError:
                time.sleep(0.1)
        times: dict[str, list[float]] = {"chattune train": [], "the page (Start)": []}
        for index in range(args.rounds):
            times["chattune train"].append(cli_arm(root, f"cli-{index}", str(model)))
            times["the page (Start)"].append(page_arm(url, root, f"page-{index}", "model"))
    finally:
        server.terminate()
        server.wait()
    best = {arm: min(values) for arm, values in times.items()}
    print(f"time to the first logged step, best of {args.rounds} interleaved rounds "
          f"({'tiny Llama' if not args.model else args.model})")
    print("| start | best (s) | all rounds (s) |\n|---|---:|---|")
    for arm, values in times.items():
        print(f"| {arm} | {best[arm]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print(f"| the page adds | {best['the page (Start)'] - best['chattune train']:+.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
