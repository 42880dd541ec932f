"""GPU readiness: on a lent CUDA GPU, in one call of under 10 minutes, QLoRA and bf16 LoRA
training of a 1B model at 2048 tokens and the serving benchmark on the trained run; one table.

    bash benchmarks/gpu_wheels.sh                 # here, once: the wheels the GPU image lacks, into .whl/
    bash benchmarks/gpu_readiness.sh              # on the GPU machine (device run, carry [".whl"])
    python benchmarks/gpu_readiness.py --smoke    # here: the same steps on a small model on the CPU

The device call: ``run(command="bash benchmarks/gpu_readiness.sh", carry=[".whl"], timeout_s=600)``.
``gpu_readiness.sh`` installs the carried wheels into /tmp/site, puts ``src`` on the path and runs
this script with a 540-second budget; the table and the log come back under ``$OUT``.

The model is ``train_throughput.py``'s ``--preset gpu-1b`` GLM-4 (2048 x 24, 0.94B parameters,
random weights, a BPE tokenizer trained on the data) saved once in bfloat16. Both training arms
run chattune's defaults (packing, the chunked loss) in bfloat16 with max_seq_length and
pack_length 2048, batch 16, LoRA r=8 on all linear layers, over the first ``--rows`` rows of
``../shared/data/alpaca_en_demo.json`` (``gpu_wheels.sh`` puts a copy into ``.whl/``: ``../shared``
does not travel to the device): ``lora`` (the MFU arm: useful FLOPs / train time / the bf16 matmul peak measured in the
same run; the FLOP count is ``train_throughput.useful_flops``) and ``qlora`` (the base in 4-bit
NF4 with bitsandbytes: tokens/s and peak memory; its MFU is not computed, the packed 4-bit
weights do not count as the layers' FLOPs). Then ``serve_load.py`` serves the lora run
(``chattune serve`` on the GPU) at 1 and 16 concurrent clients and the 16-request burst.

Each step runs in a process of its own with its own time limit, so that one failure is a row
of the table (its last error line) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DATA_CANDIDATES = (ROOT.parent / "shared" / "data" / "alpaca_en_demo.json", ROOT / ".whl" / "alpaca_en_demo.json")
STEP_NAMES = {"default": "train lora bf16", "qlora": "train qlora"}
SIZES = {"gpu": {"hidden": 2048, "layers": 24, "max_seq_length": 2048, "batch": 16, "rows": 951, "eval_rows": 48},
         "smoke": {"hidden": 128, "layers": 2, "max_seq_length": 256, "batch": 4, "rows": 32, "eval_rows": 8}}


def data_file() -> Path:
    """The Alpaca rows: ``../shared/data`` where it is beside the clone, else the carried copy."""
    for path in DATA_CANDIDATES:
        if path.is_file():
            return path
    raise SystemExit(f"no data: expected one of {', '.join(map(str, DATA_CANDIDATES))}")


def environment() -> dict:
    """The device, library versions and the measured bf16 matmul peak."""
    import torch

    sys.path.insert(0, str(BENCH))
    from train_throughput import matmul_peak

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": "CPU"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    for name in ("transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # a missing or broken wheel is a finding, not a crash
            info[name] = f"unavailable ({type(exc).__name__}: {str(exc)[:80]})"
    info["bf16_peak_tflops"] = matmul_peak(torch.bfloat16) / 1e12
    return info


def build(root: Path, size: dict) -> dict:
    """The benchmark's model and data split, and the spec ``train_throughput.py --worker`` reads."""
    import torch

    sys.path.insert(0, str(BENCH))
    from train_throughput import build_model, split_data

    data = data_file()
    train_path, eval_path = split_data(data, root, size["rows"], size["eval_rows"])
    model = build_model(root, data, size["hidden"], size["layers"], dtype=torch.bfloat16)
    spec = {"root": str(root), "train": str(train_path), "eval": str(eval_path), "mfu_train": str(train_path),
            "max_seq_length": size["max_seq_length"], "batch": size["batch"], "lr": 2e-4, "seed": 42,
            "threads": torch.get_num_threads(), "cache": str(root / "cache"), "dtype": "bfloat16",
            "template": "alpaca", "model": str(model), "mfu_model": ""}
    (root / "spec.json").write_text(json.dumps(spec))
    return spec


def run_step(command: list[str], limit: float, log: Path) -> tuple[int | None, str, float]:
    """Run one step to its end or its time limit: (exit code or None, its standard output,
    seconds); both streams go to ``log``."""
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(limit, 1), env=env)
        code, output, errors = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        output, errors = (part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                          for part in (exc.stdout, exc.stderr))
    log.write_text(output + errors)
    return code, output if code == 0 else output + errors, time.perf_counter() - start


def last_error(output: str) -> str:
    """The line that says why a step failed."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|error:|Exception|failed)", line)]
    return (errors or lines or ["no output"])[-1][:160]


def training_row(arm: str, spec_path: Path, limit: float, root: Path, peak_tflops: float) -> dict:
    """One training arm through ``train_throughput.py --worker``: tokens/s, MFU, peak memory."""
    command = [sys.executable, str(BENCH / "train_throughput.py"), "--worker", arm, "--spec", str(spec_path)]
    code, output, seconds = run_step(command, limit, root / f"{arm}.log")
    row = {"step": STEP_NAMES[arm], "seconds": seconds}
    if code != 0:
        return {**row, "status": "timed out" if code is None else f"failed: {last_error(output)}"}
    result = json.loads(output.strip().splitlines()[-1])
    row.update(status="ok", run_dir=result["run_dir"], tokens_per_s=result["tokens"] / result["wall_s"],
               peak_gib=result["peak_bytes"] / 2 ** 30, eval_loss=result["eval_loss"], train_s=result["wall_s"])
    if arm == "default":
        row["mfu"] = result["flops"] / result["wall_s"] / (peak_tflops * 1e12)
    return row


def serving_row(run_dir: str | None, limit: float, root: Path, smoke: bool) -> dict:
    """``serve_load.py`` on the trained run: tokens/s at 1 and 16 clients, TTFT p95, the burst."""
    row = {"step": "serve (lora run)"}
    if not run_dir:
        return {**row, "seconds": 0.0, "status": "skipped: no trained run"}
    command = [sys.executable, str(BENCH / "serve_load.py"), "--run", run_dir, "--levels", "1,16",
               "--duration", "3" if smoke else "10", "--max-tokens", "16" if smoke else "64", "--burst", "16"]
    code, output, seconds = run_step(command, limit, root / "serve.log")
    row["seconds"] = seconds
    if code != 0:
        return {**row, "status": "timed out" if code is None else f"failed: {last_error(output)}"}
    row["status"] = "ok"
    row["summary"] = [line for line in output.splitlines()
                      if re.search(r"clients|concurrent|one by one|at once", line)]
    return row


def table(info: dict, rows: list[dict], started: float) -> str:
    """The one table this script prints."""
    lines = [f"device: {info['device']}; torch {info['torch']} (CUDA {info['cuda']}); "
             + ", ".join(f"{k} {info[k]}" for k in ("transformers", "peft", "accelerate", "datasets", "bitsandbytes")),
             f"bf16 matmul peak measured now: {info['bf16_peak_tflops']:.1f} TFLOP/s"]
    head = f"{'step':<20}{'status':<12}{'s':>7}{'tokens/s':>11}{'MFU':>8}{'peak GiB':>10}{'eval loss':>11}"
    lines += [head, "-" * len(head)]
    for row in rows:
        status = row["status"] if row["status"] == "ok" else row["status"].split(":")[0]
        lines.append(f"{row['step']:<20}{status:<12}{row['seconds']:>7.0f}"
                     + (f"{row['tokens_per_s']:>11.0f}" if "tokens_per_s" in row else f"{'':>11}")
                     + (f"{row['mfu']:>8.1%}" if "mfu" in row else f"{'':>8}")
                     + (f"{row['peak_gib']:>10.2f}" if "peak_gib" in row else f"{'':>10}")
                     + (f"{row['eval_loss']:>11.4f}" if "eval_loss" in row else ""))
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['step']}: {row['status']}")
        for line in row.get("summary", []):
            lines.append(f"  serve: {line.strip()}")
    lines.append(f"total {time.perf_counter() - started:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the model, run the steps within the budget, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a small model on whatever device is here")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default 540)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.mkdtemp(prefix="gpu-ready-"))))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="gpu-ready-work-"))
    info = environment()
    print(json.dumps(info), flush=True)
    spec = build(root, SIZES["smoke" if args.smoke else "gpu"])
    print(f"model built in {time.perf_counter() - started:.0f} s: {spec['model']}", flush=True)
    rows = []

    def left(share: float) -> float:
        return share * (args.budget - (time.perf_counter() - started))

    rows.append(training_row("default", root / "spec.json", left(0.4), args.out, info["bf16_peak_tflops"]))
    print(rows[-1], flush=True)
    rows.append(serving_row(rows[0].get("run_dir"), left(0.5), args.out, args.smoke))
    print(rows[-1], flush=True)
    if info["device"] == "CPU":  # bitsandbytes' 4-bit base needs CUDA (chattune refuses qlora without it)
        rows.append({"step": "train qlora", "seconds": 0.0, "status": "skipped: no CUDA device"})
    else:
        rows.append(training_row("qlora", root / "spec.json", left(0.95), args.out, info["bf16_peak_tflops"]))
    print(rows[-1], flush=True)
    text = table(info, rows, started)
    (args.out / "gpu_readiness.txt").write_text(text + "\n")
    (args.out / "gpu_readiness.json").write_text(json.dumps({"environment": info, "steps": rows}, indent=2))
    print(text)
    return 0 if all(row["status"] == "ok" or row["status"].startswith("skipped") for row in rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
