"""The Chinese-LLaMA recipe on a real model, measured: SmolLM2-135M-Instruct (English only)
learns Chinese tokens, continues pre-training on Chinese text, then instruction-tunes.

    python benchmarks/chinese_llama.py --workdir zh [--pretrain-set key=value ...] [--sft-steps N]
    python benchmarks/chinese_llama.py --workdir zh --throughput      # packed blocks of 2048
    python benchmarks/chinese_llama.py --workdir zh --stream-gb 1     # a 1 GB corpus, streamed

Steps (each the command a user types, its log in --workdir): ``chattune tokenizer extend`` on
alpaca_zh_demo with 10% of the documents held out by content hash; ``chattune train
examples/chinese_llama/pretrain.yaml`` (eval_fraction 0.1: the same held-out documents); ``chattune
train examples/chinese_llama/sft.yaml``. Then the table: tokens per character of held-out Chinese
and of English text (wiki_demo, c4_demo) under both tokenizers, and the loss per character (the
summed negative log-likelihood of a text's tokens over its characters, so that tokenizers
compare) of held-out Chinese and of English (c4_demo, never trained on) for the base model with
its own tokenizer, the extended model before training (new rows the mean of their pieces), and
after continued pre-training. Runs already in --workdir are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EXAMPLE = ROOT / "examples" / "chinese_llama"


def chattune(*args: str, log: Path) -> None:
    """Run a chattune command, its output appended to ``log``; stop on failure."""
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"$ chattune {' '.join(args)}\n")
        handle.flush()
        done = subprocess.run([sys.executable, "-m", "chattune.cli", *args], stdout=handle, stderr=subprocess.STDOUT,
                              cwd=ROOT)
    if done.returncode:
        sys.exit(f"chattune {args[0]} failed (exit {done.returncode}); see {log}")


def fetch_smollm2() -> str:
    """The GGUF path ``chattune fetch smollm2`` prints."""
    out = subprocess.run([sys.executable, "-m", "chattune.cli", "fetch", "smollm2"], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


def held_out_texts(fraction: float) -> tuple[list[str], list[str]]:
    """Held-out Chinese documents (alpaca_zh_demo, by content hash as the recipe holds them out)
    and English documents (the first 40 of c4_demo, never trained on), each cut to 600 characters."""
    from chattune.data.corpus import held_out, iter_documents

    chinese = [d.text[:600] for d in iter_documents(DATA / "alpaca_zh_demo.json",
                                                     text_field=["instruction", "input", "output"])
               if held_out(d.text, fraction)]
    english = [d.text[:600] for _, d in zip(range(40), iter_documents(DATA / "c4_demo.jsonl"), strict=False)]
    return chinese, english


@torch.no_grad()
def loss_per_char(model, tokenizer, texts: list[str]) -> float:
    """Summed negative log-likelihood (nats) of every token of each text, after the EOS token as
    context, over the texts' characters."""
    model.eval()
    total, chars = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        inputs = torch.tensor([[tokenizer.eos_token_id, *ids]])
        logits = model(input_ids=inputs).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, inputs[0, 1:], reduction="sum"))
        chars += len(text)
    return total / chars


def measure_losses(gguf: str, tokenizer_dir: Path, run: Path, chinese: list[str], english: list[str]) -> dict:
    """Loss per character of both text sets: base, extended before training, after pre-training."""
    from chattune.config import ModelArgs
    from chattune.inference.runs import load_run
    from chattune.model import load_model, load_tokenizer
    from chattune.vocab.resize import fit_to_tokenizer

    base_tokenizer = load_tokenizer(gguf)
    extended = load_tokenizer(str(tokenizer_dir))
    model = load_model(ModelArgs(model_name_or_path=gguf))
    rows = {"base model, base tokenizer": (model, base_tokenizer)}
    results = {}
    for name, (m, t) in rows.items():
        results[name] = (loss_per_char(m, t, chinese), loss_per_char(m, t, english))
    fit_to_tokenizer(model, extended, base_tokenizer, tokenizer_dir)
    results["extended, new rows = mean of pieces"] = (loss_per_char(model, extended, chinese),
                                                      loss_per_char(model, extended, english))
    del model
    trained = load_run(str(run)).model
    results["after continued pre-training"] = (loss_per_char(trained, extended, chinese),
                                               loss_per_char(trained, extended, english))
    return results


def throughput(gguf: str, tokenizer_dir: Path, workdir: Path, log: Path) -> dict:
    """Tokens/s of pre-training steps on packed blocks of 2048 tokens (8 steps, one block each)."""
    out = workdir / "throughput"
    if not (out / "chattune.json").is_file():
        chattune("train", str(EXAMPLE / "pretrain.yaml"), f"model_name_or_path={gguf}",
                 f"tokenizer_name_or_path={tokenizer_dir}", f"output_dir={out}", "max_seq_length=2048",
                 "per_device_train_batch_size=1", "max_steps=8", "logging_steps=1", "eval_fraction=0",
                 "report_to=none", log=log)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["train_tokens_per_second"] for r in rows if "train_tokens_per_second" in r]
    return {"tokens_per_s_last": speeds[-1] if speeds else None, "steps": len(speeds)}


def write_corpus(path: Path, gigabytes: float) -> None:
    """A text file of ``gigabytes`` GB: the Chinese and English demo documents, numbered, repeated."""
    from chattune.data.corpus import iter_documents

    docs = [d.text.replace("\n", " ") for d in iter_documents(DATA / "alpaca_zh_demo.json",
                                                               text_field=["instruction", "output"])]
    docs += [d.text.replace("\n", " ") for d in iter_documents(DATA / "c4_demo.jsonl")]
    target = int(gigabytes * 1e9)
    written = n = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target:
            line = f"{n} {docs[n % len(docs)]}\n"
            handle.write(line)
            written += len(line.encode())
            n += 1


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stream(tokenizer_dir: Path, corpus: Path, block: int) -> None:
    """Read ``corpus`` through the streaming pipeline (documents -> rows -> blocks of ``block``
    tokens) end to end, printing RSS every tenth of the file and the peak."""
    from chattune.config import DataArgs, DataSource
    from chattune.data.pretrain import pack_stream, stream_rows
    from chattune.model import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    data = DataArgs(train_files=[DataSource(path=str(corpus))], max_seq_length=block)
    size = corpus.stat().st_size
    print(f"{'read':>6} {'blocks':>9} {'tokens':>13} {'seconds':>8} {'RSS MiB':>8}")
    started, tokens, blocks, mark = time.perf_counter(), 0, 0, 0.1
    handle = None
    for found in pack_stream(stream_rows(data, tokenizer), block):
        blocks += 1
        tokens += sum(map(len, found))
        if blocks % 2000 == 0:
            handle = handle or _open_fd(corpus)
            done = _position(handle) / size
            if done >= mark:
                print(f"{done:>6.0%} {blocks:>9,} {tokens:>13,} {time.perf_counter() - started:>8.0f} {rss_mib():>8.0f}",
                      flush=True)
                mark += 0.1
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'100%':>6} {blocks:>9,} {tokens:>13,} {seconds:>8.0f} {rss_mib():>8.0f}")
    print(f"streamed {size / 1e9:.2f} GB: {tokens:,} tokens in {blocks:,} blocks of {block}, "
          f"{tokens / seconds:,.0f} tokens/s, peak RSS {peak:,.0f} MiB")


def _open_fd(corpus: Path) -> str:
    """The /proc fdinfo of this process's open descriptor on ``corpus`` (how far it has read)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(corpus.resolve()):
                return f"/proc/self/fdinfo/{fd}"
        except OSError:
            continue
    return ""


def _position(fdinfo: str) -> int:
    if not fdinfo:
        return 0
    with open(fdinfo) as handle:
        return int(handle.readline().split()[1])


def main() -> None:
    """Run the recipe (or one of its measurements) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="chinese-llama-bench")
    parser.add_argument("--add", type=int, default=20000)
    parser.add_argument("--pretrain-set", nargs="*", default=[], help="key=value for the pre-training run")
    parser.add_argument("--sft-steps", type=int, default=0, help="also run step 3 for this many steps")
    parser.add_argument("--throughput", action="store_true", help="tokens/s on blocks of 2048 instead")
    parser.add_argument("--stream-gb", type=float, help="stream a corpus of this many GB instead")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "log.txt"
    gguf = fetch_smollm2()
    tokenizer_dir = workdir / "tokenizer"
    if not (tokenizer_dir / "extension_report.json").is_file():
        chattune("tokenizer", "extend", gguf, "--corpus", str(DATA / "alpaca_zh_demo.json"),
                 "--text-field", "instruction", "--text-field", "input", "--text-field", "output",
                 "--add", str(args.add), "--holdout", "0.1", "--out", str(tokenizer_dir),
                 "--compare", str(DATA / "wiki_demo.txt"), str(DATA / "c4_demo.jsonl"), log=log)
    report = json.loads((tokenizer_dir / "extension_report.json").read_text())
    from chattune.vocab.command import format_report

    print(format_report(report))
    if args.stream_gb:
        corpus = workdir / f"corpus-{args.stream_gb:g}gb.txt"
        if not corpus.is_file():
            write_corpus(corpus, args.stream_gb)
        stream(tokenizer_dir, corpus, 2048)
        return
    if args.throughput:
        print(json.dumps(throughput(gguf, tokenizer_dir, workdir, log)))
        return
    run = workdir / "pretrain"
    if not (run / "chattune.json").is_file():
        started = time.perf_counter()
        chattune("train", str(EXAMPLE / "pretrain.yaml"), f"model_name_or_path={gguf}",
                 f"tokenizer_name_or_path={tokenizer_dir}", f"output_dir={run}", "report_to=none",
                 *args.pretrain_set, log=log)
        print(f"continued pre-training: {time.perf_counter() - started:.0f} s")
    chinese, english = held_out_texts(0.1)
    results = measure_losses(gguf, tokenizer_dir, run, chinese, english)
    print(f"\nloss per character (nats), {len(chinese)} held-out Chinese documents, {len(english)} English")
    print(f"{'model':<40} {'Chinese':>8} {'English':>8}")
    for name, (zh, en) in results.items():
        print(f"{name:<40} {zh:>8.3f} {en:>8.3f}")
    if args.sft_steps:
        chattune("train", str(EXAMPLE / "sft.yaml"), f"model_name_or_path={run}", f"output_dir={workdir / 'sft'}",
                 f"max_steps={args.sft_steps}", "report_to=none", log=log)
        manifest = json.loads((workdir / "sft" / "chattune.json").read_text())
        print(f"sft: {manifest['global_step']} steps, train loss {manifest['train_loss']:.3f}, "
              f"eval loss {manifest.get('eval_loss')}")


if __name__ == "__main__":
    main()
