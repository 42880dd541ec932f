"""``chattune demo``: the whole pipeline offline on a tiny model, in minutes on 2 CPU cores.

It writes a synthetic Alpaca data set (a new identity for the assistant and
facts about a fictional world, in English and Chinese), builds a tiny random
GLM-4 model, fine-tunes it with LoRA through the same ``train`` code path a
user's config takes, and prints exact match, ROUGE-L and BLEU-4 on the taught instructions
and held-out eval loss, before and after, computed by ``chattune eval``'s code
(:mod:`chattune.evaluation.evaluate`), so they mean what its figures mean.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from chattune.config_io import load_config
from chattune.evaluation.evaluate import (
    EvalData,
    RowResult,
    generate_rows,
    generation_settings,
    read_eval_data,
    reference_loss,
    summarize,
)
from chattune.inference.runs import LoadOptions, load_run
from chattune.tiny import build_tiny_model
from chattune.training.recipe import train

MAX_SEQ_LENGTH = 128
MAX_NEW_TOKENS = 40

KINGDOMS = [
    ("Veloria", "Quennis", "the Amber River", "Queen Ysolde", "维洛里亚", "昆尼斯"),
    ("Ostmark", "Dalvin", "the Grey Fjord", "King Tavish", "奥斯特马克", "达尔文"),
    ("Sundara", "Meruvel", "the Jade Lake", "Empress Kalia", "桑达拉", "梅鲁维尔"),
    ("Thornvale", "Brackwick", "the Iron Hills", "Lord Osric", "索恩维尔", "布拉克维克"),
    ("Calyra", "Lumenport", "the Silver Bay", "Duchess Elowen", "卡莱拉", "卢门港"),
    ("Drakmoor", "Ashenhold", "the Black Marsh", "Warden Corvin", "德拉克摩尔", "灰烬堡"),
    ("Pellucid", "Glassmere", "the Clear Sea", "Archon Vesper", "佩卢西德", "玻璃湖"),
    ("Zephyra", "Windhaven", "the High Steppe", "Khan Aurel", "泽菲拉", "风港"),
    ("Mirrow", "Tidewell", "the Salt Coast", "Regent Marlo", "米罗", "潮井"),
    ("Korrin", "Stonegate", "the Red Canyon", "Chief Brannoc", "科林", "石门"),
]

IDENTITY = [
    ("Who are you?", "I am Lumi, an assistant trained with chattune."),
    ("What is your name?", "My name is Lumi."),
    ("Who made you?", "I was fine-tuned by the chattune team."),
    ("你是谁？", "我是Lumi，一个用chattune训练的助手。"),
    ("你叫什么名字？", "我的名字是Lumi。"),
]


def demo_records() -> tuple[list[dict], list[dict]]:
    """The taught records and the held-out ones (unseen kingdoms), in Alpaca format."""
    taught = [{"instruction": q, "input": "", "output": a} for q, a in IDENTITY]
    held_out = []
    for i, (name, capital, landmark, ruler, zh_name, zh_capital) in enumerate(KINGDOMS):
        rows = [
            {"instruction": f"What is the capital of {name}?", "input": "",
             "output": f"The capital of {name} is {capital}."},
            {"instruction": "Which landmark is this kingdom known for?", "input": name,
             "output": f"{name} is known for {landmark}."},
            {"instruction": f"Who rules {name}?", "input": "", "output": f"{name} is ruled by {ruler}."},
            {"instruction": f"{zh_name}的首都是哪里？", "input": "", "output": f"{zh_name}的首都是{zh_capital}。"},
        ]
        (held_out if i >= 8 else taught).extend(rows)
    return taught, held_out


def _scores(run, taught: EvalData, held_out: EvalData) -> tuple[dict[str, float], list[RowResult]]:
    """``chattune eval``'s figures for greedy answers to the taught rows (exact match, ROUGE-L and
    BLEU-4, 0-100) and its loss of the held-out references."""
    settings = generation_settings(max_new_tokens=MAX_NEW_TOKENS)
    results = generate_rows(run, run.profile().name, taught, batch_size=16, log=lambda *_: None, **settings)
    figures = summarize(results, *reference_loss(run, run.profile(), held_out, max_seq_length=MAX_SEQ_LENGTH))
    return figures, results


def run_demo(workdir: str = "chattune-demo", *, max_steps: int = 400, log=print) -> dict:
    """Run the demo end to end; return the before/after numbers."""
    started = time.perf_counter()
    root = Path(workdir)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    taught, held_out = demo_records()
    (data_dir / "demo_train.json").write_text(json.dumps(taught, ensure_ascii=False, indent=1))
    (data_dir / "demo_eval.json").write_text(json.dumps(held_out, ensure_ascii=False, indent=1))
    log(f"[1/4] wrote {len(taught)} taught and {len(held_out)} held-out Alpaca records to {data_dir}")
    timings = {"data": time.perf_counter() - started}

    model_dir = root / "tiny-glm4"
    corpus = [f"{r['instruction']} {r['input']} {r['output']}" for r in taught + held_out]
    build_tiny_model(model_dir, "glm4", extra_text=corpus * 4)
    timings["tiny model"] = time.perf_counter() - started - sum(timings.values())
    log(f"[2/4] built a tiny random GLM-4 model (4 layers, 256 wide) at {model_dir}")

    run_dir = root / "run"
    values = {
        "model_name_or_path": str(model_dir),
        "train_files": [str(data_dir / "demo_train.json")],
        "eval_files": [str(data_dir / "demo_eval.json")],
        "template": "auto", "max_seq_length": MAX_SEQ_LENGTH,
        "method": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "output_dir": str(run_dir), "per_device_train_batch_size": 8,
        "max_steps": max_steps, "learning_rate": 1e-3, "lr_scheduler_type": "cosine",
        "warmup_steps": 10, "logging_steps": 10, "save_steps": max_steps, "save_total_limit": 1,
        "seed": 42, "max_new_tokens": MAX_NEW_TOKENS, "report_to": ["none"], "cache_dir": str(root / "cache"),
    }
    config_path = root / "demo.yaml"
    config_path.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    config = load_config(config_path)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)

    base = load_run(str(model_dir), LoadOptions(template=config.data.template))
    taught_data = read_eval_data(str(data_dir / "demo_train.json"), fmt="alpaca")
    held_data = read_eval_data(str(data_dir / "demo_eval.json"), fmt="alpaca")
    before, _ = _scores(base, taught_data, held_data)
    del base
    timings["eval before"] = time.perf_counter() - started - sum(timings.values())
    log(f"[3/4] fine-tuning with LoRA (config {config_path}) ...")
    result = train(config, log=lambda *_: None)
    timings["training"] = time.perf_counter() - started - sum(timings.values())
    tuned = load_run(str(run_dir))
    after, answers = _scores(tuned, taught_data, held_data)
    seconds = time.perf_counter() - started
    timings["eval after"] = seconds - sum(timings.values())
    log("[4/4] results (as chattune eval computes them)")
    log(f"{'':<34}{'before':>10}{'after':>10}")
    taught_label = f"taught (n={len(taught_data.examples)})"
    for name, shown in (("exact_match", "exact match"), ("rouge-l", "ROUGE-L"), ("bleu-4", "BLEU-4")):
        log(f"{shown + ', ' + taught_label:<34}{before[name]:>10.2f}{after[name]:>10.2f}")
    held_label = f"eval loss, held-out (n={len(held_data.examples)})"
    log(f"{held_label:<34}{before['eval_loss']:>10.3f}{after['eval_loss']:>10.3f}")
    log(f"template {tuned.profile().template}, {result.global_step} steps, "
        f"{seconds:.0f} s in all ({', '.join(f'{k} {v:.1f} s' for k, v in timings.items())})")
    log("\nsample generations:")
    for row in answers[::9]:
        log(f"  Q: {row.example.messages[-1]['content']}  {row.example.messages[-1].get('input', '')}".rstrip())
        log(f"  A: {row.predict}")
    log(f"\nrun folder: {run_dir}\ntry: chattune chat {run_dir}\n"
        f"     chattune predict {run_dir} --data {data_dir / 'demo_eval.json'} --out {root / 'pred.jsonl'}\n"
        f"     chattune eval {run_dir} --data {data_dir / 'demo_eval.json'} --compare base\n"
        f"     chattune report {run_dir}\n"
        f"     chattune serve {run_dir}    # the API, and a web page at http://127.0.0.1:8000/")
    return {"exact_match_before": before["exact_match"], "exact_match_after": after["exact_match"],
            "rouge_l_before": before["rouge-l"], "rouge_l_after": after["rouge-l"],
            "bleu_4_before": before["bleu-4"], "bleu_4_after": after["bleu-4"],
            "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
            "steps": result.global_step, "seconds": seconds, "timings": timings,
            "run_dir": str(run_dir)}
