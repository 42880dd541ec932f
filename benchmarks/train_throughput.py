"""Training throughput: chattune as configured by default, chattune with plain padding, and a
baseline written the way the ChatGLM-6B + LoRA tutorial does it, on the same model and data.

    python benchmarks/train_throughput.py                  # about 7 minutes on 2 CPU cores
    python benchmarks/train_throughput.py --preset gpu-1b  # on a CUDA GPU: see below
    python benchmarks/train_throughput.py --preset smollm2 # a real model: about 10 minutes on 2 CPU cores

Every arm trains the same tiny random GLM-4 (4 layers x 256; a byte-level BPE tokenizer of
8192 tokens trained on the data, so rows are about as long as with a real tokenizer: mean
195 tokens, max 512) with LoRA r=8 on all linear layers, for one epoch over the same 479
rows of ``../shared/data/alpaca_en_demo.json`` (alpaca template, max_seq_length 512,
batch 6 rows, seed 42, learning rate 2e-3), each run in a fresh process. Every arm runs
twice, interleaved, and the table keeps each arm's faster run (the machine is shared and
noisy: +-5-10% run to run). The baseline is transformers' Trainer + peft with the
tutorial's collator (pad to the longest row, labels -100 on prompt and padding, nothing
else). Eval loss is computed the same way for every arm: the mean over all supervised
tokens of 48 held-out rows. Wall time is the Trainer's train_runtime (the steps and the
final checkpoint, for every arm).

Model FLOP utilisation: useful FLOPs / wall time / the machine's matmul peak, measured in
this process with torch.matmul on square matrices of the arm's dtype. Useful FLOPs per
token with a frozen base: 4 x (linear-layer parameters) + 6 x (LoRA parameters) + the
causal attention term 6 x layers x heads*head_dim x (own row length); the output layer
counts 4 x hidden x vocabulary for supervised tokens only (the rest need no logits).
Padding and masked-out attention count as nothing. The MFU line runs chattune's default
on a wider model (``--mfu-hidden``), where matmuls dominate.

``--preset gpu-1b`` is the GPU configuration: a GLM-4 of 2048 x 24 (0.94B parameters),
every arm in bfloat16 (the baseline loads the base in bfloat16 and trains with bf16=True,
as the tutorial does with fp16), max_seq_length and pack_length 2048, all 951 training
rows, batch 16 (about 3200 tokens a step: 1-2 full bins), one run per arm.
``--peak-tflops`` adds the MFU against the card's datasheet dense peak (989 for an
H100/H200 SXM in bf16) to the measured one. Options given with the preset override it.

``--preset smollm2`` is the real-model arm: SmolLM2-135M-Instruct (``chattune fetch smollm2``,
its GGUF converted once into chattune's native float32 folder, which every arm loads: chattune
by path, the baseline with plain ``AutoModelForCausalLM.from_pretrained``), the GGUF's own
ChatML template, max_seq_length 512, the first 64 rows, batch 4, learning rate 2e-4, 32
held-out rows; chattune's default (packed) and the tutorial baseline, interleaved, fastest of
2 runs each. ``--model`` takes any model folder, ``.gguf`` file or ``chattune fetch`` name
in place of the tiny random GLM-4.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def matmul_peak(dtype: torch.dtype, seconds: float = 1.5) -> float:
    """The best FLOP/s of torch.matmul on square matrices (1024-4096) of ``dtype`` here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    best = 0.0
    for n in (1024, 2048, 4096):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best



def float32_gflops() -> float:
    """This machine's float32 matmul peak now, in GFLOP/s (:func:`matmul_peak`)."""
    return matmul_peak(torch.float32) / 1e9

def build_model(root: Path, data: Path, hidden: int, layers: int, vocab: int = 8192,
                dtype: torch.dtype | None = None) -> Path:
    """A random GLM-4 of the given size with a tokenizer trained on the data set, saved in
    ``dtype`` (default float32)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from chattune.tiny import tiny_config, train_tokenizer

    out = root / f"glm4-{hidden}x{layers}"
    if (out / "config.json").is_file():
        return out
    records = json.loads(data.read_text())
    texts = [f"{r['instruction']} {r.get('input', '')} {r['output']}" for r in records]
    tokenizer = train_tokenizer(out, "glm4", extra_text=texts, vocab_size=vocab)
    config = tiny_config("glm4", len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                         hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64),
                         num_kv_heads=max(2, hidden // 128))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    (model.to(dtype) if dtype is not None else model).save_pretrained(out)
    return out


def split_data(data: Path, root: Path, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    """The first ``train_rows`` records to train on and the last ``eval_rows`` held out."""
    records = json.loads(data.read_text())
    train_path, eval_path = root / "train.json", root / "eval.json"
    train_path.write_text(json.dumps(records[:train_rows], ensure_ascii=False))
    eval_path.write_text(json.dumps(records[-eval_rows:], ensure_ascii=False))
    return train_path, eval_path


def chattune_config(spec: dict, model: Path, out: Path, **overrides):
    """The run config of a chattune arm: defaults, plus the benchmark's common settings."""
    from chattune.config_io import build_config

    values = {
        "model_name_or_path": str(model), "train_files": [spec["train"]], "eval_files": [spec["eval"]],
        "template": spec.get("template", "alpaca"), "max_seq_length": spec["max_seq_length"], "lora_rank": 8,
        "per_device_train_batch_size": spec["batch"], "num_train_epochs": 1,
        "learning_rate": spec["lr"], "logging_steps": 10, "save_steps": 10 ** 6, "seed": spec["seed"],
        "report_to": ["none"], "output_dir": str(out), "cache_dir": spec["cache"], **overrides,
    }
    return build_config(values)


def prepared_data(spec: dict, model: Path):
    """The encoded train and eval rows every arm trains and evaluates on (chattune's encoder)."""
    from chattune.data.prepare import prepare_data
    from chattune.model import load_tokenizer
    from chattune.templates.registry import resolve_template_name

    config = chattune_config(spec, model, Path(spec["root"]) / "unused")
    tokenizer = load_tokenizer(str(model))
    template = resolve_template_name(spec.get("template", "alpaca"), tokenizer)
    return prepare_data(config.data, tokenizer, template, spec["seed"]), tokenizer


def tutorial_collator(pad_token_id: int):
    """The tutorial's data_collator: right-pad to the longest row, labels -100 on padding,
    no attention mask (the prompt's labels are already -100 in the encoded rows)."""
    def collate(features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        ids, labels = [], []
        for f in features:
            pad = longest - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [pad_token_id] * pad)
            labels.append(list(f["labels"]) + [-100] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    return collate


def run_baseline(spec: dict, model_path: Path):
    """HF Trainer + peft the tutorial's way; returns (model, train_runtime)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    set_seed(spec["seed"])
    prepared, tokenizer = prepared_data(spec, model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, spec["dtype"]))
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules="all-linear"))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="baseline-", dir=spec["root"]), per_device_train_batch_size=spec["batch"],
        num_train_epochs=1, learning_rate=spec["lr"], lr_scheduler_type="linear", logging_steps=10,
        save_steps=10 ** 6, report_to="none", seed=spec["seed"], data_seed=spec["seed"],
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False,
        bf16=spec["dtype"] == "bfloat16",
    )
    trainer = Trainer(model=model, args=args, train_dataset=prepared.train,
                      data_collator=tutorial_collator(tokenizer.pad_token_id))
    metrics = trainer.train().metrics
    return model, metrics["train_runtime"]


def run_chattune(spec: dict, model_path: Path, arm: str, overrides: dict):
    """chattune's train() with the arm's overrides; returns (model, train_runtime, batching, run folder).

    Trained without eval data (eval loss is computed afterwards the same way for every arm),
    so that train_runtime holds what the baseline's does: the steps and the final checkpoint."""
    from chattune.training.recipe import train

    out = Path(tempfile.mkdtemp(prefix=f"{arm}-", dir=spec["root"]))
    config = chattune_config(spec, model_path, out, **overrides)
    config.data.eval_files = []
    result = train(config, log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in rows if "train_loss" in r)  # the end-of-training summary
    batching = json.loads((out / "data_audit.json").read_text())["batching"]
    return result.model, runtime, batching, out


@torch.no_grad()
def eval_loss(model, rows) -> float:
    """Mean cross-entropy over every supervised token of ``rows``, one row at a time."""
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for row in rows:
        ids = torch.tensor([row["input_ids"]], device=device)
        labels = torch.tensor(row["labels"][1:], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += (labels != -100).sum().item()
    return total / count


def useful_flops(model, rows, config) -> float:
    """Useful training FLOPs of one pass over ``rows`` (see the module docstring)."""
    head = model.get_output_embeddings()
    linear = lora = 0
    for name, module in model.named_modules():
        if module is head or not isinstance(module, torch.nn.Linear):
            continue
        if "lora_" in name:
            lora += module.weight.numel()
        else:
            linear += module.weight.numel()
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    flops = 0.0
    for row in rows:
        n = len(row["input_ids"])
        supervised = sum(1 for label in row["labels"][1:] if label != -100)
        flops += n * (4 * linear + 6 * lora) + 6 * config.num_hidden_layers * width * n * n
        flops += supervised * 4 * head.weight.numel()
    return flops


PRESETS = {
    "gpu-1b": {"hidden": 2048, "layers": 24, "max_seq_length": 2048, "train_rows": 951, "batch": 16,
               "lr": 2e-4, "dtype": "bfloat16", "arms": "default,pad,baseline", "repeat": 1},
    "smollm2": {"model": "smollm2", "template": "auto", "max_seq_length": 512, "train_rows": 64, "eval_rows": 32,
                "batch": 4, "lr": 2e-4, "arms": "default,baseline", "repeat": 2},
}


def resolve_model(name: str) -> Path:
    """The native folder of ``name``: a ``chattune fetch`` name, a ``.gguf`` file or a model folder."""
    from chattune.gguf_import import native_model_path
    from chattune.pretrained import MODELS, fetch

    path = fetch(name) if name in MODELS else Path(name).expanduser()
    return Path(native_model_path(str(path)))


def worker(arm: str, spec: dict) -> dict:
    """Run one arm in this (fresh) process; return its measurements."""
    torch.set_num_threads(spec["threads"])
    model_path = Path(spec["mfu_model"] if arm == "mfu" else spec["model"])
    half = {"bf16": True} if spec["dtype"] == "bfloat16" else {}
    overrides = {"default": half, "pad": {"packing": "pad", "loss": "plain", **half}, "bf16": {"bf16": True},
                 "mfu": half, "qlora": {"method": "qlora", **half}}
    if arm == "mfu":
        spec = {**spec, "train": spec["mfu_train"]}
    batching = {"mode": "pad (tutorial collator)", "loss": "model's own"}
    run_dir = None
    if arm == "untrained":
        from transformers import AutoModelForCausalLM

        prepared, _ = prepared_data(spec, model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, spec["dtype"]))
        if torch.cuda.is_available():
            model.cuda()
        return {"arm": arm, "eval_loss": eval_loss(model, list(prepared.eval))}
    if arm == "baseline":
        model, runtime = run_baseline(spec, model_path)
    else:
        model, runtime, batching, run_dir = run_chattune(spec, model_path, arm, overrides[arm])
    prepared, _ = prepared_data(spec, model_path)
    train_rows = list(prepared.train)
    tokens = sum(len(r["input_ids"]) for r in train_rows)
    supervised = sum(1 for r in train_rows for label in r["labels"][1:] if label != -100)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "arm": arm, "wall_s": runtime, "rows": len(train_rows), "tokens": tokens, "supervised": supervised,
        "peak_bytes": peak, "eval_loss": eval_loss(model, list(prepared.eval)), "batching": batching,
        "flops": useful_flops(model, train_rows, model.config),
        "dtype": "bfloat16" if arm == "bf16" else spec["dtype"],
        "parameters": sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name),
        "run_dir": str(run_dir) if run_dir else None,
    }


def run_worker(arm: str, spec_path: Path) -> dict:
    """Run an arm in a fresh Python process (its own peak memory, no shared caches)."""
    command = [sys.executable, __file__, "--worker", arm, "--spec", str(spec_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"arm {arm} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


LABELS = {"default": "(a) chattune default", "pad": "(b) chattune, padding", "baseline": "(c) tutorial baseline",
          "qlora": "chattune default, qlora",
          "bf16": "(d) chattune default + bf16", "mfu": "chattune default, wide"}


def table(results: list[dict], peaks: dict, baseline: dict | None) -> str:
    """The results as the printed table."""
    head = (f"{'arm':<28}{'wall s':>8}{'tok/s':>9}{'sup tok/s':>10}{'samples/s':>10}{'peak MiB':>9}"
            f"{'eval loss':>10}{'MFU':>7}{'x base':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        mfu = r["flops"] / r["wall_s"] / peaks[r["dtype"]]
        ratio = ""
        if baseline is not None and r["arm"] != "mfu":
            ratio = f"{(r['tokens'] / r['wall_s']) / (baseline['tokens'] / baseline['wall_s']):.2f}x"
        lines.append(f"{LABELS[r['arm']]:<28}{r['wall_s']:>8.1f}{r['tokens'] / r['wall_s']:>9.0f}"
                     f"{r['supervised'] / r['wall_s']:>10.0f}{r['rows'] / r['wall_s']:>10.2f}"
                     f"{r['peak_bytes'] / 2 ** 20:>9.0f}{r['eval_loss']:>10.4f}{mfu:>7.1%}{ratio:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run every arm, print the table and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="a named configuration (gpu-1b: 0.94B GLM-4, bf16, packed to 2048; "
                             "smollm2: SmolLM2-135M-Instruct from its GGUF, 64 rows at 512)")
    parser.add_argument("--model", default=None,
                        help="a model folder, .gguf file or `chattune fetch` name (smollm2, gemma3-270m) to "
                             "train instead of the tiny random GLM-4 (its native folder, for every arm)")
    parser.add_argument("--template", default="alpaca",
                        help="the prompt template of every arm (auto: the model's own chat template)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--train-rows", type=int, default=480)
    parser.add_argument("--eval-rows", type=int, default=48)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mfu-hidden", type=int, default=1024)
    parser.add_argument("--mfu-rows", type=int, default=60)
    parser.add_argument("--arms", default="default,pad,baseline,bf16,mfu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=2,
                        help="run the arms this many times, interleaved, and keep each arm's fastest run")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the dtype of every arm (bfloat16: chattune with bf16, the baseline loads in bf16)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's datasheet dense peak for --dtype, to report MFU against it too")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec.read_text()))))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="chattune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_path, eval_path = split_data(args.data, root, args.train_rows, args.eval_rows)
    mfu_train = root / "train-mfu.json"
    mfu_train.write_text(json.dumps(json.loads(train_path.read_text())[:args.mfu_rows], ensure_ascii=False))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    spec = {
        "root": str(root), "train": str(train_path), "eval": str(eval_path), "mfu_train": str(mfu_train),
        "max_seq_length": args.max_seq_length, "batch": args.batch, "lr": args.lr, "seed": 42,
        "threads": args.threads, "cache": str(root / "cache"), "dtype": args.dtype, "template": args.template,
        "model": str(resolve_model(args.model) if args.model else build_model(root, args.data, args.hidden,
                                                                               args.layers)),
        "mfu_model": str(build_model(root, args.data, args.mfu_hidden, args.layers)) if "mfu" in arms else "",
    }
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec))
    dtypes = {args.dtype: getattr(torch, args.dtype)} | ({"bfloat16": torch.bfloat16} if "bf16" in arms else {})
    peaks = {name: matmul_peak(dtype) for name, dtype in dtypes.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {args.threads} threads ({os.cpu_count()} cores)"
    print(f"device: {device}; torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    untrained = run_worker("untrained", spec_path)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for _ in range(args.repeat):
        for arm in arms:
            result = run_worker(arm, spec_path)
            runs[arm].append(result)
            print(f"  {LABELS[arm]}: {result['wall_s']:.1f} s, batching {result['batching'].get('mode')}, "
                  f"loss {result['batching'].get('loss')}, eval loss {result['eval_loss']:.4f}", flush=True)
    results = [min(runs[arm], key=lambda r: r["wall_s"]) for arm in arms]
    baseline = next((r for r in results if r["arm"] == "baseline"), None)
    small = next((r for r in results if r["arm"] != "mfu"), None)
    print()
    if small is not None:
        name = f"{args.model} ({Path(spec['model']).name})" if args.model else f"glm4 {args.hidden}x{args.layers}"
        print(f"model {name} ({small['parameters'] / 1e6:.0f}M parameters, {args.dtype}), "
              f"{small['rows']} rows ({small['tokens']} tokens, "
              f"{small['supervised']} supervised) x 1 epoch, "
              + (f"max_seq_length {args.max_seq_length}, template {args.template}, " if args.model else "")
              + f"batch {args.batch}, LoRA r=8 all linear, lr {args.lr}; "
              f"eval loss before training {untrained['eval_loss']:.4f}"
              + (f"; fastest of {args.repeat} runs" if args.repeat > 1 else ""))
    print(table(results, peaks, baseline))
    wide = next((r for r in results if r["arm"] == "mfu"), None)
    if wide is not None:
        print(f"(wide: glm4 {args.mfu_hidden}x{args.layers}, {wide['rows']} rows, {wide['tokens']} tokens)")
    default = next((r for r in results if r["arm"] == "default"), None)
    if default and baseline:
        speedup = (default["tokens"] / default["wall_s"]) / (baseline["tokens"] / baseline["wall_s"])
        loss_gap = abs(default["eval_loss"] - baseline["eval_loss"]) / baseline["eval_loss"]
        print(f"target (a) >= 2.5x baseline tok/s: {speedup:.3f}x {'MET' if speedup >= 2.5 else 'MISSED'}; "
              f"eval loss within 3%: {loss_gap:.2%} {'MET' if loss_gap <= 0.03 else 'MISSED'}")
    if default and args.peak_tflops:
        measured = default["flops"] / default["wall_s"] / peaks[default["dtype"]]
        datasheet = default["flops"] / default["wall_s"] / (args.peak_tflops * 1e12)
        print(f"(a) MFU: {measured:.1%} of the measured {default['dtype']} matmul peak, {datasheet:.1%} of the "
              f"datasheet {args.peak_tflops:g} TFLOP/s; target >= 40%: {'MET' if datasheet >= 0.4 else 'MISSED'}")
    if default and baseline and torch.cuda.is_available():
        lower = default["peak_bytes"] < baseline["peak_bytes"]
        print(f"target (a) peak memory below the baseline's: {default['peak_bytes'] / 2 ** 30:.2f} vs "
              f"{baseline['peak_bytes'] / 2 ** 30:.2f} GiB {'MET' if lower else 'MISSED'}")
    if wide is not None:
        mfu = wide["flops"] / wide["wall_s"] / peaks[wide["dtype"]]
        print(f"target MFU >= 35% of the {wide['dtype']} matmul peak (wide model): {mfu:.1%} "
              f"{'MET' if mfu >= 0.35 else 'MISSED'}")
    print(f"total {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f}; workdir {root}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
