"""Synthetic "answer from the given context" data for chattune's knowledge-base example, EN and ZH.

Each row is what ``chattune serve RUN --kb NAME=KB`` sends the model for a question: the
user message is :func:`chattune.kb.prompt.kb_prompt`'s (Langchain-Chatchat's instruction,
the retrieved chunks as the known information, the question), the chunks retrieved from a
KB with the server's defaults; the answer is copied from the context: the sentence that
states the fact (``Briford was founded by Lucan Stormholt, a ferryman, in the year 758.`` /
``潮雾港由药师罗澄于公元845年创建。``; the answer alone where a chunk boundary cuts that
sentence), or, when the retrieved chunks do not hold the answer, the "cannot answer from
the known information" sentence. Some rows pair a question with
another question's chunks, so the model also learns to say it cannot answer.

The facts come from :func:`fiction.world` (fiction.py, next to this script) with *other* seeds than the one the
example asks about (seed 0): other towns, people, founders, rivers, years. A training fact
whose subject (a town or person) also occurs in seed 0's documents is dropped, and no
paragraph of the training documents states a fact of seed 0 (its subject and answer
together), so every question asked afterwards is about a fact the model never saw in
training. (The generator draws festivals, offices and pet names from closed lists of 20, so
for those relations the answers are values training has seen, about other subjects.)

    python examples/kb/make_kb_data.py                  # -> chattune-kb/
    chattune train examples/kb/kb_lora.yaml             # a few minutes on 2 CPU cores
    chattune kb build chattune-kb/world --out chattune-kb/world-kb
    python examples/kb/ask_world.py                     # the share right, with and without the KB

Writes, under ``--out`` (default ``chattune-kb``):

- ``data/kb_train.jsonl``: the training rows (OpenAI messages);
- ``world/``: the documents of the world asked about (seed 0), to build the KB from;
- ``tiny-model/``: a tiny random Llama-architecture model (4 layers, 256 wide) whose byte-level
  tokenizer was trained on the training rows, with no chat template (``template: auto`` is
  ``default``); ``--no-model`` skips it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from chattune.kb import store
from chattune.kb.prompt import cannot_answer, kb_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fiction  # noqa: E402  (the generated world, examples/kb/fiction.py)

ASKED_SEED = 0
"""The world ask_world.py asks about; never trained on."""


def answer_text(fact: fiction.Fact, context: str) -> str:
    """The taught answer, copied from ``context``: the sentence that states the fact where the
    context holds it whole (the model learns to find the sentence and copy it on), else the
    answer alone, ended as a sentence."""
    if fact.sentence in context:
        return fact.sentence
    return f"{fact.answer}{'。' if fact.language == 'zh' else '.'}"


def training_facts(seed: int, asked_corpus: str) -> tuple[dict[str, str], list[fiction.Fact], int]:
    """World ``seed``'s documents, its facts about subjects the asked world does not mention, and
    how many facts were dropped for that."""
    documents, facts = fiction.world(seed)
    kept = [fact for fact in facts if fact.subject not in asked_corpus]
    return documents, kept, len(facts) - len(kept)


def rows_for_world(documents: dict[str, str], facts: list[fiction.Fact], rng: random.Random,
                   negatives: float) -> list[dict]:
    """The training rows of one world: each fact asked with its retrieved chunks, and for a share
    ``negatives`` of the facts also with another fact's chunks (answer: cannot answer)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, text in documents.items():
            (root / "docs").mkdir(exist_ok=True)
            (root / "docs" / name).write_text(text, encoding="utf-8")
        store.build([root / "docs"], root / "kb")
        kb = store.open_kb(root / "kb")
        retrieved = {fact.question: store.search(kb, fact.question) for fact in facts}
    rows = []
    for fact in facts:
        hits = retrieved[fact.question]
        if not hits:  # the server would answer this itself, without the model
            continue
        prompt = kb_prompt(fact.question, hits)
        context = "\n".join(hit.text for hit in hits)
        found = fact.answer in context
        target = answer_text(fact, context) if found else cannot_answer(fact.question)
        rows.append(_row(prompt.content, target, fact.language, "answer" if found else "missing"))
        if rng.random() < negatives:
            others = [f for f in facts if f.language == fact.language and f.subject != fact.subject]
            other_hits = retrieved[rng.choice(others).question]
            if other_hits and fact.answer not in "\n".join(h.text for h in other_hits):
                rows.append(_row(kb_prompt(fact.question, other_hits).content, cannot_answer(fact.question),
                                 fact.language, "unrelated"))
    return rows


def _row(question: str, answer: str, language: str, kind: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "language": language, "kind": kind}


def leaks(documents: dict[str, str], facts: list[fiction.Fact]) -> list[str]:
    """The ``facts`` that a paragraph of ``documents`` states: their subject and answer both in it."""
    paragraphs = [p for text in documents.values() for p in text.split("\n\n")]
    return [f"{fact.subject}: {fact.answer}" for fact in facts
            if any(fact.subject in p and fact.answer in p for p in paragraphs)]


def make_rows(worlds: int, negatives: float = 0.15, seed: int = 0) -> tuple[list[dict], dict]:
    """The training rows from ``worlds`` generated worlds (seeds 1, 2, ...; a world with a paragraph
    that states a fact of the asked world is skipped) and counts about them."""
    asked_documents, asked_facts = fiction.world(ASKED_SEED)
    asked_corpus = "\n".join(asked_documents.values())
    rng = random.Random(seed)
    rows, dropped, facts_used, used, skipped = [], 0, 0, 0, []
    world_seed = 0
    while used < worlds:
        world_seed += 1
        documents, facts, gone = training_facts(world_seed, asked_corpus)
        if leaks(documents, asked_facts):  # a paragraph states a fact asked later: not this world
            skipped.append(world_seed)
            continue
        used += 1
        dropped += gone
        facts_used += len(facts)
        rows += rows_for_world(documents, facts, rng, negatives)
    rng.shuffle(rows)
    counts = {"worlds": worlds, "skipped": skipped, "facts": facts_used, "dropped": dropped,
              **{kind: sum(r["kind"] == kind for r in rows) for kind in ("answer", "missing", "unrelated")},
              "zh": sum(r["language"] == "zh" for r in rows)}
    return rows, counts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines (messages only: what training reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"messages": row["messages"]}, ensure_ascii=False) + "\n")


def corpus(rows: list[dict]) -> list[str]:
    """Text to train the tiny model's tokenizer on: the rows as the ``default`` template shows them."""
    return [f"Human: {r['messages'][0]['content']}\nAssistant: {r['messages'][1]['content']}" for r in rows]


def build_model(path: Path, rows: list[dict], hidden_size: int = 256, num_layers: int = 4) -> Path:
    """A tiny random Llama at ``path`` whose byte-level tokenizer was trained on ``rows``, without a
    chat template (``template: auto`` then means ``default``)."""
    from chattune.tiny import build_tiny_model

    build_tiny_model(path, "llama", extra_text=corpus(rows), hidden_size=hidden_size, num_layers=num_layers,
                     chat_template=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="chattune-kb", help="output folder (default chattune-kb)")
    parser.add_argument("--worlds", type=int, default=4, help="generated worlds to train on (default 4)")
    parser.add_argument("--negatives", type=float, default=0.15,
                        help="share of facts also asked with unrelated chunks (default 0.15)")
    parser.add_argument("--no-model", action="store_true", help="do not build the tiny model")
    parser.add_argument("--hidden-size", type=int, default=256, help="the tiny model's width (default 256)")
    parser.add_argument("--num-layers", type=int, default=4, help="the tiny model's layers (default 4)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows, counts = make_rows(args.worlds, args.negatives)
    write_jsonl(out / "data" / "kb_train.jsonl", rows)
    fiction.write_world(out / "world", ASKED_SEED)
    print(f"wrote {len(rows)} training rows ({counts['answer']} answered from the context, {counts['missing']} "
          f"whose retrieved chunks miss the answer and {counts['unrelated']} with unrelated chunks, both taught "
          f"'cannot answer'; {counts['zh']} in Chinese) from {counts['facts']} facts of {counts['worlds']} "
          f"generated worlds ({counts['dropped']} facts dropped: their subject is in the asked world"
          + (f"; worlds {counts['skipped']} skipped: they state a fact of it" if counts["skipped"] else "")
          + f") to "
          f"{out / 'data' / 'kb_train.jsonl'}\nwrote the asked world's documents (seed {ASKED_SEED}) to {out / 'world'}")
    if not args.no_model:
        model = build_model(out / "tiny-model", rows, args.hidden_size, args.num_layers)
        print(f"built a tiny random llama model ({args.num_layers} layers, {args.hidden_size} wide; its tokenizer "
              f"trained on this data, without a chat template) at {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
