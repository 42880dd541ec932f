"""Peak memory of ``chattune export`` on a ~1B-parameter model.

    python benchmarks/export_memory.py                 # ~1.05B parameters, bfloat16, in a temp folder
    python benchmarks/export_memory.py --layers 2      # smaller, to try it quickly

Builds a random GLM-4-architecture model of about a billion parameters (tiny-model code
with a larger config: hidden 4096, 7 layers) saved in bfloat16, trains a LoRA run on it
for one step, then runs ``chattune export`` in a child process and reads that process's
peak resident memory (``ru_maxrss``). Prints the model's size in the export dtype, the
peak, their ratio (target: under 1.3x) and the export's own check line. A child
``python -c 'import chattune.export'`` gives the interpreter's baseline (torch,
transformers) for reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child_peak(command: list[str]) -> tuple[int, float, str]:
    """Peak RSS in bytes of a child command (it must be the only child run so far, or larger than
    the earlier ones: ru_maxrss of children is their maximum), its seconds and output."""
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, seconds, proc.stdout + proc.stderr


def main() -> None:
    """Build, train one step, export in a child process, report memory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from chattune.config_io import load_config
    from chattune.demo import demo_records
    from chattune.tiny import build_tiny_model
    from chattune.train import train

    root = Path(args.workdir or tempfile.mkdtemp(prefix="chattune-export-mem-"))
    model_dir = root / "base"
    build_tiny_model(model_dir, "glm4", hidden_size=args.hidden, num_layers=args.layers)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)  # the base in bfloat16, as real checkpoints are
    del model
    data = root / "data.json"
    data.write_text(json.dumps(demo_records()[0][:8], ensure_ascii=False))
    run_dir = root / "run"
    overrides = [f"model_name_or_path={model_dir}", f"train_files=[{data}]", "max_steps=1", "save_steps=1",
                 "per_device_train_batch_size=1", "max_seq_length=32", "dtype=bfloat16", "lora_rank=8",
                 f"output_dir={run_dir}", "report_to=[none]", "logging_steps=1", f"cache_dir={root / 'cache'}"]
    train(load_config(None, overrides), log=lambda *_: None)

    baseline, _, _ = child_peak([sys.executable, "-c", "import chattune.export, transformers, peft"])
    peak, seconds, output = child_peak([sys.executable, "-m", "chattune.cli", "export", str(run_dir),
                                        "--out", str(root / "export")])
    size = parameters * 2
    check = next((line for line in output.splitlines() if line.startswith("check:")), "")
    print(f"model: {parameters / 1e9:.3f}B parameters, {size / 2**30:.2f} GiB in bfloat16 (the base's dtype)")
    print(f"{'':<34}{'GiB':>8}{'x model':>9}")
    print(f"{'interpreter baseline (imports)':<34}{baseline / 2**30:>8.2f}{baseline / size:>9.2f}")
    print(f"{'chattune export, peak RSS':<34}{peak / 2**30:>8.2f}{peak / size:>9.2f}")
    print(f"export took {seconds:.0f} s; {check}")


if __name__ == "__main__":
    main()
