"""Peak memory of ``chattune export`` on a ~1B-parameter model.

    python benchmarks/export_memory.py                 # ~1.05B parameters, bfloat16, in a temp folder
    python benchmarks/export_memory.py --layers 2      # smaller, to try it quickly

Builds a random GLM-4-architecture model of about a billion parameters (tiny-model code
with a larger config: hidden 4096, 7 layers) saved in bfloat16, trains a LoRA run on it
for one step (each in a child process), then runs ``chattune export`` in a child and reads
that process's own peak resident memory (``VmHWM``; ``ru_maxrss`` would count the pages a
child inherits at fork). Prints the model's size in the export dtype, the peak, their
ratio (target: under 1.3x) and the export's own check line. A child that only imports
chattune's export, torch, transformers and peft gives the interpreter's baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEAK = ("import sys; from chattune.cli import main\n"
        "rc = main(sys.argv[1:]) if sys.argv[1:] != ['imports'] else __import__('chattune.export.model') and 0\n"
        "import peft, torch, transformers\n"
        "print('VmHWM', next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "sys.exit(rc)")


def child_peak(args: list[str]) -> tuple[int, float, str]:
    """Peak RSS in bytes (VmHWM: this process's own high-water mark, not inherited from the
    parent at fork as ru_maxrss would be) of ``chattune ARGS`` in a child, its seconds, output."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"chattune {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("VmHWM"))
    return peak * 1024, seconds, proc.stdout + proc.stderr


BUILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from chattune.tiny import build_tiny_model
root, hidden, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model_dir = build_tiny_model(root + "/base", "glm4", hidden_size=hidden, num_layers=layers)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
print("PARAMETERS", sum(p.numel() for p in model.parameters()))
model.save_pretrained(model_dir)  # the base in bfloat16, as real checkpoints are
"""


def main() -> None:
    """Build, train one step, export in a child process, report memory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from chattune.demo import demo_records

    root = Path(args.workdir or tempfile.mkdtemp(prefix="chattune-export-mem-"))
    built = subprocess.run([sys.executable, "-c", BUILD, str(root), str(args.hidden), str(args.layers)],
                           capture_output=True, text=True, check=True)
    parameters = next(int(line.split()[1]) for line in built.stdout.splitlines() if line.startswith("PARAMETERS"))
    data = root / "data.json"
    data.write_text(json.dumps(demo_records()[0][:8], ensure_ascii=False))
    run_dir = root / "run"
    child_peak(["train", f"model_name_or_path={root / 'base'}", f"train_files=[{data}]", "max_steps=1",
                "save_steps=1", "per_device_train_batch_size=1", "max_seq_length=32", "dtype=bfloat16",
                "lora_rank=8", f"output_dir={run_dir}", "report_to=[none]", "logging_steps=1",
                f"cache_dir={root / 'cache'}"])
    baseline, _, _ = child_peak(["imports"])
    peak, seconds, output = child_peak(["export", str(run_dir), "--out", str(root / "export")])
    size = parameters * 2
    check = next((line for line in output.splitlines() if line.startswith("check:")), "")
    print(f"model: {parameters / 1e9:.3f}B parameters, {size / 2**30:.2f} GiB in bfloat16 (the base's dtype)")
    print(f"{'':<34}{'GiB':>8}{'x model':>9}")
    print(f"{'interpreter (imports only)':<34}{baseline / 2**30:>8.2f}{baseline / size:>9.2f}")
    print(f"{'chattune export, peak RSS':<34}{peak / 2**30:>8.2f}{peak / size:>9.2f}")
    print(f"export took {seconds:.0f} s; {check}")


if __name__ == "__main__":
    main()
