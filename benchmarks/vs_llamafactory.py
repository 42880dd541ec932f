"""chattune against LLaMA-Factory on the same epoch: the same model, rows, template and LoRA
settings, each tool started as its users start it (``chattune train CONFIG`` and
``llamafactory-cli train CONFIG``), interleaved (A, B, A, B; the faster run of each kept), and
a profile of where chattune's epoch goes.

    python benchmarks/vs_llamafactory.py                       # tiny Llama and SmolLM2, about 35 min on 2 CPU cores
    python benchmarks/vs_llamafactory.py --models tiny         # the tiny Llama only, about 10 min
    python benchmarks/vs_llamafactory.py --rows 64 --rounds 1  # a quick look

LLaMA-Factory is installed on first use into its own virtual environment (``--lf-venv``,
default ``../lf-venv`` beside the clone): ``torch==2.13.0`` (this machine's CPU build), then
``llamafactory==0.9.5`` without its dependencies, then those it needs to train (``LF_NEEDS``).
Left out: torchvision and av (its image and video plugins, imported only where used), gradio
(its web UI), modelscope and hf-transfer (hub downloads), and torchaudio: LLaMA-Factory 0.9.5
imports it when its multimodal plugin module loads, though a text SFT run never calls it, and
PyPI's torchaudio builds (up to 2.11.1) do not load beside torch 2.13.0 ("Could not load this
library: _torchaudio.so"). So the venv gets an empty ``torchaudio`` package in its place, and
both tools train on the same torch.

The common settings: ``../shared/data/alpaca_en_demo.json``, its first 951 rows to train on
(``--rows``) and its last 48 held out, cutoff 512, LoRA rank 8 / alpha 16 / dropout 0.05 on all
linear layers, batch 8, one epoch, learning rate 1e-4 with linear decay and no warmup, seed 42,
float32, no eval, no checkpoint but the final one. chattune trains every row (``dedup: false``,
as LLaMA-Factory does); its other defaults stay (packing, the chunked loss). LLaMA-Factory's
other defaults stay too. Each run encodes its data afresh (chattune's ``cache_dir`` is the
run's own; LLaMA-Factory's ``overwrite_cache: true``). SmolLM2 trains on the first 128 rows
(``--smollm2-rows``): an epoch of all 999 takes over half an hour a run here.

Models: ``tiny`` is a random Llama of 256 x 4 layers (7.4M parameters) with a byte-level BPE
tokenizer of 8192 tokens trained on the data, trained with each tool's ``alpaca`` template (they
differ: chattune's is Stanford's, an ``### Input:`` block and the answer right after
``### Response:``; LLaMA-Factory's joins the input to the instruction and starts the answer on a
new line); ``smollm2`` is SmolLM2-135M-Instruct (30 layers, a 49k vocabulary),
``chattune fetch smollm2``'s GGUF converted once into a native float32 folder that both tools
load, trained with its own ChatML chat template (chattune ``template: tokenizer``, LLaMA-Factory
``template: smollm2``: the same tokens but one, a period LLaMA-Factory adds to the default
system message).

Columns: wall is the whole command, start to exit (imports, model load, data encoding,
training, saving); train is the Trainer's ``train_runtime`` (both tools train with transformers'
Trainer); tokens/s is the epoch's tokens (every row's prompt and answer as chattune encodes them,
the same count for both tools) over the train time; peak RSS is the command's own process
(``wait4``); train loss is each Trainer's ``train_loss`` (the mean training loss of the epoch,
which depends on the order the rows came in); held-out is the loss of each tool's trained adapter
on every answer token of the 48 held-out rows, computed afterwards by the same code for both (rows
encoded by chattune with its template; on SmolLM2 the two templates give the same answer tokens).

``--bf16-arm`` adds a third arm, chattune with ``bf16: true`` (bfloat16 autocast; the LoRA
weights and the optimizer stay float32): the candidate lever, measured beside the default.

The profile (on by default for the tiny Llama; ``--no-profile`` skips it) runs chattune's epoch once more in
a process of its own, timing the start-up phases and, inside the steps, the forward pass of each
kind of module (attention, MLP, the LoRA adapters inside both, norms, the output layer and the
loss), the backward pass and the optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
LF_VERSION = "0.9.5"
LF_NEEDS = ["accelerate>=1.3.0,<=1.11.0", "datasets>=2.16.0,<=4.0.0", "einops", "fire", "matplotlib", "numpy",
            "omegaconf", "packaging", "pandas", "peft>=0.18.0,<=0.18.1", "protobuf", "pydantic", "pyyaml",
            "safetensors", "scipy", "sentencepiece", "sse-starlette", "tiktoken", "torchdata>=0.10.0,<=0.11.0",
            "transformers>=4.55.0,<=5.6.0,!=4.57.0", "trl>=0.18.0,<=0.24.0", "tyro<0.9.0", "uvicorn", "fastapi"]
COMMON = {"cutoff": 512, "rank": 8, "alpha": 16, "dropout": 0.05, "batch": 8, "lr": 1e-4,
          "seed": 42}
HELD_OUT = 48  # the data file's last rows: never trained on
TRAIN_ROWS = 999 - HELD_OUT
# each tool's name for the same template: the tiny Llama has none of its own, so Alpaca; SmolLM2 has its
# ChatML chat template (chattune reads it from the tokenizer, LLaMA-Factory ships it as smollm2)
TEMPLATES = {"tiny": {"chattune": "alpaca", "llamafactory": "alpaca"},
             "smollm2": {"chattune": "tokenizer", "llamafactory": "smollm2"}}


def ensure_llamafactory(venv: Path) -> Path:
    """The ``llamafactory-cli`` of ``venv``, installed there first if missing (module docstring)."""
    cli = venv / "bin" / "llamafactory-cli"
    if cli.is_file():
        return cli
    print(f"installing LLaMA-Factory {LF_VERSION} into {venv} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "--no-deps", f"llamafactory=={LF_VERSION}"], check=True)
    subprocess.run([*pip, *LF_NEEDS], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stand_in = Path(site) / "torchaudio" / "__init__.py"
    stand_in.parent.mkdir(exist_ok=True)
    stand_in.write_text('"""An empty stand-in: LLaMA-Factory imports torchaudio; text SFT never uses it."""\n')
    return cli


def build_tiny_llama(root: Path, rows: list[dict]) -> Path:
    """A random Llama of 256 x 4 with a BPE tokenizer of 8192 tokens trained on ``rows``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from chattune.tiny import tiny_config, train_tokenizer

    out = root / "llama-256x4"
    if (out / "config.json").is_file():
        return out
    texts = [f"{r['instruction']} {r.get('input', '')} {r['output']}" for r in rows]
    tokenizer = train_tokenizer(out, "llama", extra_text=texts, vocab_size=8192)
    config = tiny_config("llama", len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                         hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    return out


def resolve_model(name: str, root: Path, rows: list[dict]) -> Path:
    """The folder both tools load for the model ``name``."""
    if name == "tiny":
        return build_tiny_llama(root, rows)
    from chattune.gguf_import import native_model_path
    from chattune.pretrained import fetch

    return Path(native_model_path(str(fetch(name))))


def chattune_values(model: Path, data: Path, out: Path, template: str) -> dict:
    """chattune's run config (``chattune train CONFIG``)."""
    return {"model_name_or_path": str(model), "train_files": [str(data)], "template": template,
            "max_seq_length": COMMON["cutoff"], "dedup": False, "method": "lora", "lora_rank": COMMON["rank"],
            "lora_alpha": COMMON["alpha"], "lora_dropout": COMMON["dropout"], "lora_target": "all-linear",
            "per_device_train_batch_size": COMMON["batch"], "num_train_epochs": 1,
            "learning_rate": COMMON["lr"], "lr_scheduler_type": "linear", "warmup_steps": 0,
            "seed": COMMON["seed"], "logging_steps": 10, "save_steps": 10 ** 6, "report_to": ["none"],
            "output_dir": str(out), "cache_dir": str(out.parent / f"{out.name}-cache")}


def llamafactory_values(model: Path, dataset_dir: Path, out: Path, template: str) -> dict:
    """LLaMA-Factory's config (``llamafactory-cli train CONFIG``), its dataset ``bench``."""
    return {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_target": "all", "lora_rank": COMMON["rank"], "lora_alpha": COMMON["alpha"],
            "lora_dropout": COMMON["dropout"], "dataset": "bench", "dataset_dir": str(dataset_dir),
            "template": template, "cutoff_len": COMMON["cutoff"], "overwrite_cache": True,
            "output_dir": str(out), "overwrite_output_dir": True, "logging_steps": 10, "save_strategy": "no",
            "per_device_train_batch_size": COMMON["batch"], "gradient_accumulation_steps": 1,
            "learning_rate": COMMON["lr"], "num_train_epochs": 1.0, "lr_scheduler_type": "linear",
            "warmup_ratio": 0.0, "seed": COMMON["seed"], "report_to": "none", "plot_loss": False}


def run_command(command: list[str], log: Path, env: dict) -> tuple[float, int, int]:
    """Run ``command`` to its end: (wall seconds, exit code, peak RSS bytes of its process)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, process.returncode, usage.ru_maxrss * 1024


def run_arm(tool: str, model: Path, spec: dict, index: int, lf_cli: Path) -> dict:
    """One run of ``tool`` on ``model``: its wall, train time, final loss and peak RSS."""
    import yaml

    root = Path(spec["root"])
    out = root / f"{tool}-{model.name}-{index}"
    config = root / f"{tool}-{model.name}-{index}.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DISABLE_VERSION_CHECK": "1", "WANDB_DISABLED": "true"}
    if tool.startswith("chattune"):
        values = chattune_values(model, Path(spec["data"]), out, spec["templates"]["chattune"])
        if tool == "chattune-bf16":
            values["bf16"] = True
        config.write_text(yaml.safe_dump(values))
        command = [sys.executable, "-m", "chattune", "train", str(config)]
    else:
        config.write_text(yaml.safe_dump(llamafactory_values(model, Path(spec["dataset_dir"]), out,
                                                             spec["templates"]["llamafactory"])))
        command = [str(lf_cli), "train", str(config)]
        env["PATH"] = f"{lf_cli.parent}{os.pathsep}{env.get('PATH', '')}"
    wall, code, peak = run_command(command, root / f"{out.name}.log", env)
    if code != 0:
        tail = (root / f"{out.name}.log").read_text()[-3000:]
        raise SystemExit(f"{tool} on {model.name} failed (exit {code}):\n{tail}")
    if tool.startswith("chattune"):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = next(r for r in rows if "train_loss" in r)
    else:
        summary = json.loads((out / "train_results.json").read_text())
    return {"tool": tool, "wall": wall, "train": summary["train_runtime"], "loss": summary["train_loss"],
            "peak": peak, "run_dir": str(out)}


def epoch_tokens(model: Path, data: Path, template: str) -> int:
    """The epoch's tokens, prompt and answer of every row, as chattune encodes them."""
    from chattune.config_io import build_config
    from chattune.data.prepare import prepare_data
    from chattune.model import load_tokenizer

    config = build_config(chattune_values(model, data, Path(tempfile.mkdtemp()), template))
    prepared = prepare_data(config.data, load_tokenizer(str(model)), template, COMMON["seed"])
    return sum(len(row["input_ids"]) for row in prepared.train)


def held_out_loss(model: Path, run_dir: Path, rows: list[dict], template: str) -> float:
    """Mean cross-entropy over every answer token of ``rows`` (encoded by chattune with
    ``template``) of the base ``model`` with the run's LoRA adapter, one row at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chattune.data.encode import EncodeOptions, PieceEncoder, encode_conversation
    from chattune.model import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    encoder = PieceEncoder(tokenizer)
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), str(run_dir))
    net.eval()
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            user = {"role": "user", "content": row["instruction"], **({"input": row["input"]} if row.get("input") else {})}
            messages = [user, {"role": "assistant", "content": row["output"]}]
            encoded = encode_conversation(messages, template, encoder, EncodeOptions(max_seq_length=COMMON["cutoff"]))
            ids = torch.tensor([encoded.input_ids])
            labels = torch.tensor(encoded.labels[1:])
            logits = net(input_ids=ids, use_cache=False).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += (labels != -100).sum().item()
    return total / count


def comparison_table(name: str, runs: list[dict], tokens: int) -> str:
    """The side-by-side table of one model (each tool's fastest run by wall time)."""
    tools = list(dict.fromkeys(r["tool"] for r in runs))
    best = {tool: min((r for r in runs if r["tool"] == tool), key=lambda r: r["wall"]) for tool in tools}
    head = (f"{name:<22}{'wall s':>9}{'train s':>9}{'tokens/s':>10}{'peak RSS':>11}{'train loss':>12}"
            f"{'held-out':>10}")
    lines = [head, "-" * len(head)]
    for tool in tools:
        r = best[tool]
        lines.append(f"{tool:<22}{r['wall']:>9.1f}{r['train']:>9.1f}{tokens / r['train']:>10.0f}"
                     f"{r['peak'] / 2 ** 30:>9.2f} G{r['loss']:>12.4f}{r.get('held_out', float('nan')):>10.4f}")
    lf = best["llamafactory"]
    for tool in tools[1:]:
        ct = best[tool]
        held = ((ct["held_out"] - lf["held_out"]) / lf["held_out"]) if "held_out" in ct else float("nan")
        lines.append(f"{tool + ' is':<22}{lf['wall'] / ct['wall']:>8.2f}x{lf['train'] / ct['train']:>8.2f}x"
                     f"{'':>10}{ct['peak'] / lf['peak']:>10.2f}x{(ct['loss'] - lf['loss']) / lf['loss']:>+11.2%}"
                     f"{held:>+10.2%}")
    other = [f"{r['tool']} {r['wall']:.1f}/{r['train']:.1f}" for r in runs if r not in best.values()]
    if other:
        lines.append("other rounds (wall/train s): " + ", ".join(other))
    return "\n".join(lines)


PHASES = {"load_tokenizers": "tokenizer load", "prepare_sft": "data encoding", "load_for_training": "model load + LoRA",
          "setup_batching_and_loss": "batching + loss setup"}


def profile_child(spec_path: Path) -> None:
    """Run chattune's epoch in this process with timers; print the profile as JSON (last line)."""
    started = time.perf_counter()
    import torch  # noqa: F401
    import transformers
    from accelerate import Accelerator

    import chattune.training.recipe as recipe
    from chattune.config_io import build_config

    spec = json.loads(spec_path.read_text())
    times: dict[str, float] = {"imports": time.perf_counter() - started}
    forward: dict[str, float] = {}

    def timed(name, fn, into):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into[name] = into.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    for function, label in PHASES.items():
        setattr(recipe, function, timed(label, getattr(recipe, function), times))
    transformers.Trainer.train = timed("training", transformers.Trainer.train, times)
    transformers.Trainer.compute_loss = timed("forward + loss", transformers.Trainer.compute_loss, times)
    Accelerator.backward = timed("backward", Accelerator.backward, times)
    torch.optim.AdamW.step = timed("optimizer step", torch.optim.AdamW.step, times)
    original_load = recipe.load_for_training

    def load_and_hook(*args, **kwargs):
        loaded = original_load(*args, **kwargs)
        hook_modules(loaded[0], forward)
        return loaded

    recipe.load_for_training = load_and_hook
    out = Path(spec["root"]) / "profile"
    config = build_config(chattune_values(Path(spec["model"]), Path(spec["data"]), out, spec["templates"]["chattune"]))
    recipe.train(config, log=lambda *_: None)
    times["whole"] = time.perf_counter() - started
    print(json.dumps({"times": times, "forward": forward}))


def hook_modules(model, into: dict) -> None:
    """Time the forward pass of attention, MLP, LoRA, norm, embedding and output modules."""
    import torch

    head = model.get_output_embeddings()

    def kind(name: str, module) -> str | None:
        parts = name.split(".")
        leaf = parts[-1]
        if module is head:
            return "output layer"
        if len(parts) > 1 and parts[-2] in ("lora_A", "lora_B", "lora_dropout"):  # peft's ModuleDict entries
            return "LoRA adapters"
        if leaf in ("self_attn", "attention", "self_attention"):
            return "attention"
        if leaf in ("mlp", "feed_forward"):
            return "MLP"
        if "norm" in leaf:
            return "norms"
        if isinstance(module, torch.nn.Embedding):
            return "embedding"
        return None

    for name, module in model.named_modules():
        label = kind(name, module)
        if label is None:
            continue

        def before(_module, _args, label=label):
            _module._bench_start = time.perf_counter()

        def after(_module, _args, _output, label=label):
            into[label] = into.get(label, 0.0) + time.perf_counter() - _module._bench_start

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


def profile_table(profile: dict, wall: float) -> str:
    """Where one chattune epoch goes, as the profile child measured it."""
    t, f = profile["times"], profile["forward"]
    training = t["training"]
    start_up = t["whole"] - training
    lines = [f"{'where chattune epoch goes (tiny Llama)':<44}{'s':>8}{'share':>8}", "-" * 60]

    def line(label: str, seconds: float, indent: int = 0):
        lines.append(f"{' ' * indent}{label:<{44 - indent}}{seconds:>8.2f}{seconds / t['whole']:>8.1%}")

    line("start-up and saving (all but the steps)", start_up)
    line("imports (torch, transformers, peft, chattune)", t["imports"], 2)
    for label in PHASES.values():
        line(label, t.get(label, 0.0), 2)
    line("other (config, manifest, final save)", start_up - t["imports"] - sum(t.get(x, 0.0) for x in PHASES.values()), 2)
    line("training (Trainer.train)", training)
    line("forward + loss", t.get("forward + loss", 0.0), 2)
    for label in ("attention", "MLP", "LoRA adapters", "norms", "embedding", "output layer"):
        if label in f:
            suffix = " (inside attention and MLP)" if label == "LoRA adapters" else ""
            line(label + suffix, f[label], 4)
    modules = sum(v for k, v in f.items() if k != "LoRA adapters")
    line("loss and the rest of the forward", t.get("forward + loss", 0.0) - modules, 4)
    if "LoRA adapters" not in f:
        lines.append("    (LoRA's updates run inside their layers, lora_add: timed with attention and MLP)")
    line("backward", t.get("backward", 0.0), 2)
    line("optimizer step", t.get("optimizer step", 0.0), 2)
    rest = training - sum(t.get(x, 0.0) for x in ("forward + loss", "backward", "optimizer step"))
    line("data loading, logging, scheduler, zero_grad", rest, 2)
    lines.append(f"(this profiled run: {t['whole']:.1f} s in process; the timed runs' wall: {wall:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the tables."""
    from train_throughput import float32_gflops  # (torch: imported only when run)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tool, interleaved (default 2)")
    parser.add_argument("--rows", type=int, default=TRAIN_ROWS, help=f"train on the first N rows (default {TRAIN_ROWS})")
    parser.add_argument("--smollm2-rows", type=int, default=128, help="rows for SmolLM2 (default 128)")
    parser.add_argument("--lf-venv", type=Path, default=ROOT.parent / "lf-venv")
    parser.add_argument("--bf16-arm", action="store_true",
                        help="also chattune with bf16: true (bfloat16 autocast), the lever measured, not the default")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of chattune's epoch")
    parser.add_argument("--root", type=Path, default=None, help="where runs are written (default a temp folder)")
    parser.add_argument("--profile-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile_child:
        profile_child(args.profile_child)
        return 0
    lf_cli = ensure_llamafactory(args.lf_venv.resolve())
    root = (args.root or Path(tempfile.mkdtemp(prefix="vs-lf-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    every = json.loads(DATA.read_text())
    print(f"matmul peak now: {float32_gflops():.0f} GFLOP/s float32; runs in {root}", flush=True)
    tables = []
    for name in args.models.split(","):
        rows = every[: args.smollm2_rows if name == "smollm2" else args.rows]
        held = every[-HELD_OUT:]
        data = root / f"data-{name}" / "bench.json"
        data.parent.mkdir(exist_ok=True)
        data.write_text(json.dumps(rows, ensure_ascii=False))
        (data.parent / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))
        model = resolve_model(name, root, every)
        spec = {"root": str(root), "data": str(data), "dataset_dir": str(data.parent), "model": str(model),
                "templates": TEMPLATES[name]}
        runs = []
        for index in range(args.rounds):
            for tool in ("llamafactory", "chattune", *(["chattune-bf16"] if args.bf16_arm else [])):
                runs.append(run_arm(tool, model, spec, index, lf_cli))
                r = runs[-1]
                print(f"{name} round {index + 1}: {tool}: wall {r['wall']:.1f} s, train {r['train']:.1f} s, "
                      f"loss {r['loss']:.4f}", flush=True)
        for tool in dict.fromkeys(r["tool"] for r in runs):
            best = min((r for r in runs if r["tool"] == tool), key=lambda r: r["wall"])
            best["held_out"] = held_out_loss(model, Path(best["run_dir"]), held, TEMPLATES[name]["chattune"])
        tokens = epoch_tokens(model, data, TEMPLATES[name]["chattune"])
        tables.append(comparison_table(f"{name} ({len(rows)} rows)", runs, tokens))
        print(tables[-1], flush=True)
        if name == "tiny" and not args.no_profile:
            spec_path = root / "profile-spec.json"
            spec_path.write_text(json.dumps(spec))
            done = subprocess.run([sys.executable, __file__, "--profile-child", str(spec_path)], capture_output=True,
                                  text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
            if done.returncode != 0:
                raise SystemExit(f"the profile run failed:\n{done.stderr[-3000:]}")
            wall = min(r["wall"] for r in runs if r["tool"] == "chattune")
            tables.append(profile_table(json.loads(done.stdout.strip().splitlines()[-1]), wall))
            print(tables[-1], flush=True)
    print(f"\nmatmul peak after: {float32_gflops():.0f} GFLOP/s float32\n")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
