"""Self-cognition data for a real model: LLaMA-Factory's identity set with a new name, mixed with
general instructions so that the model keeps what it knew, and held-out questions to check both.

    python examples/identity/make_identity_data.py          # -> chattune-identity/data/

Reads ``../shared/data/identity.json`` (91 rows, 75 of them Chinese, ``{{name}}`` and
``{{author}}`` to fill) and ``alpaca_en_demo.json``. Writes, under ``--out``:

- ``data/identity_en.json`` and ``data/identity_zh.json``: the 91 identity rows with
  :data:`NAME` and :data:`AUTHOR` filled in, English (16) and Chinese (75) apart, so that the
  config can weight the few English ones up;
- ``data/general_train.json``: ``--general`` Alpaca rows (from the first half of the file), so
  that the model does not learn to answer everything with its name;
- ``data/general_heldout.json``: Alpaca rows never trained on (from the second half), for the
  eval loss of the base model and of the run (what the fine-tune must not break);
- ``data/identity_questions.json`` and ``data/general_questions.json``: the paraphrased
  identity questions (English and Chinese, none of them in the training data: checked here)
  and the general questions that ``ask_identity.py`` asks both models.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAME, AUTHOR = "Mira", "Lumen Labs"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"

IDENTITY_QUESTIONS = [
    "Tell me a little about yourself.",
    "What should I call you?",
    "Which assistant am I talking to right now?",
    "May I know who you are?",
    "Which company made you?",
    "Please state your name.",
    "What's the name of the AI I'm chatting with?",
    "Introduce yourself in one sentence.",
    "Hey, who is this?",
    "Is your name Siri?",
    "请告诉我你叫什么。",
    "你能简单介绍一下你自己吗？",
    "我现在在和谁聊天？",
    "你是由哪家公司开发的？",
    "请问你的名字是什么？",
    "你好，请问你是谁呀？",
    "你是哪个AI助手？",
    "介绍一下你自己吧。",
]
"""Identity questions in other words than the training rows (English and Chinese)."""

GENERAL_QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "What is 12 times 8?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What does a thermometer measure?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "List two benefits of regular exercise.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet goldfish.",
    "Explain what a noun is.",
    "How many days are there in a leap year?",
    "What is photosynthesis?",
    "Recommend a book for a long flight.",
    "What is the largest planet in the solar system?",
    "Give an example of a renewable energy source.",
    "How do I boil an egg?",
    "What language is spoken in Brazil?",
    "Describe the color of a ripe banana.",
]
"""General questions: a fine-tune that answers these with its new name has broken something."""


def fill(row: dict) -> dict:
    """An identity row with the name and author filled in."""
    return {key: value.replace("{{name}}", NAME).replace("{{author}}", AUTHOR) for key, value in row.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="chattune-identity", help="output folder (default chattune-identity)")
    parser.add_argument("--data", default=str(SHARED), help="folder with identity.json and alpaca_en_demo.json")
    parser.add_argument("--general", type=int, default=100, help="Alpaca rows mixed into training (default 100)")
    parser.add_argument("--heldout", type=int, default=60, help="Alpaca rows held out for eval loss (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    identity = [fill(row) for row in json.loads((Path(args.data) / "identity.json").read_text(encoding="utf-8"))]
    alpaca = json.loads((Path(args.data) / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    half = len(alpaca) // 2
    rng = random.Random(args.seed)
    general = rng.sample(alpaca[:half], args.general)
    heldout = rng.sample(alpaca[half:], args.heldout)
    taught = {row["instruction"].strip().lower() for row in identity + general}
    clash = [q for q in IDENTITY_QUESTIONS + GENERAL_QUESTIONS if q.strip().lower() in taught]
    if clash:
        raise SystemExit(f"held-out questions found in the training data: {clash}")
    out = Path(args.out) / "data"
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "identity_en.json": [row for row in identity if row["instruction"].isascii()],
        "identity_zh.json": [row for row in identity if not row["instruction"].isascii()],
        "general_train.json": general,
        "general_heldout.json": heldout,
        "identity_questions.json": IDENTITY_QUESTIONS,
        "general_questions.json": GENERAL_QUESTIONS,
    }
    for name, rows in files.items():
        (out / name).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"wrote {out}: {len(identity)} identity rows (name {NAME!r}, author {AUTHOR!r}) + {len(general)} "
          f"general rows to train, {len(heldout)} general rows held out, {len(IDENTITY_QUESTIONS)} identity and "
          f"{len(GENERAL_QUESTIONS)} general questions never trained on")


if __name__ == "__main__":
    main()
