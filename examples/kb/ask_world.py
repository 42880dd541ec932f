"""Ask the fictional world's questions with and without its knowledge base; print the share right.

The questions are :func:`fiction.world`'s (fiction.py, next to this script) (seed 0: 320 facts, English and
Chinese, worded differently from the documents), none of them trained on (see
make_kb_data.py). An answer is right when its text holds the fact's answer. With the KB,
each question goes through :func:`chattune.kb.ask.ask` as ``chattune serve``'s ``RUN+KB``
model does it (the cannot-answer reply, without the model, when no chunk is relevant
enough); without it, the question is sent as it is.

    python examples/kb/ask_world.py                                   # the Python API, batched
    chattune serve chattune-kb/run --kb world=chattune-kb/world-kb &
    python examples/kb/ask_world.py --url http://127.0.0.1:8000/v1    # the same through the server

The "retrieved" column is the ceiling the KB sets: the share of questions whose retrieved
chunks hold the answer at all (``--kb`` is read for it with ``--url`` too).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from chattune.kb.ask import ask, open_for_answers

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fiction  # noqa: E402  (the generated world, examples/kb/fiction.py)


def retrieved(kb_dir: str, facts: list[fiction.Fact]) -> list[bool]:
    """Per fact, whether the chunks retrieved for its question hold its answer."""
    kb = open_for_answers(kb_dir)
    found = []
    for fact in facts:
        prompt = ask(kb, [{"role": "user", "content": fact.question}]).prompt
        found.append(prompt is not None and fact.answer in prompt.content)
    return found


def answers_local(run_dir: str, kb_dir: str, facts: list[fiction.Fact], batch_size: int,
                  max_new_tokens: int) -> tuple[list[str], list[str]]:
    """(with the KB, without it) per fact, decoded greedily in batches through the Python API."""
    from chattune.inference.generate import generate
    from chattune.inference.runs import load_run

    run = load_run(run_dir)
    kb = open_for_answers(kb_dir)
    asked = [ask(kb, [{"role": "user", "content": fact.question}]) for fact in facts]
    to_model = [i for i, a in enumerate(asked) if a.messages is not None]
    with_kb = [a.reply or "" for a in asked]
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False}
    for start in range(0, len(to_model), batch_size):
        part = to_model[start:start + batch_size]
        for i, text in zip(part, generate(run, [asked[i].messages for i in part], **settings), strict=True):
            with_kb[i] = asked[i].cite(text)
    without = []
    for start in range(0, len(facts), batch_size):
        part = facts[start:start + batch_size]
        without += generate(run, [[{"role": "user", "content": f.question}] for f in part], **settings)
    return with_kb, without


def answers_server(url: str, model: str, kb_name: str, facts: list[fiction.Fact],
                   max_new_tokens: int) -> tuple[list[str], list[str]]:
    """The same through ``chattune serve`` with the official client: ``MODEL+KB`` and ``MODEL``."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)

    def one(name: str, question: str):
        return client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                              temperature=0, max_tokens=max_new_tokens)

    with_kb, without = [], []
    for fact in facts:
        with_kb.append(one(f"{model}+{kb_name}", fact.question).choices[0].message.content)
        without.append(one(model, fact.question).choices[0].message.content)
    return with_kb, without


def score(facts: list[fiction.Fact], with_kb: list[str], without: list[str], found: list[bool]) -> dict:
    """Shares right by language and overall: with the KB, without it, and the retrieval ceiling."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, fact in enumerate(facts):
        groups[fact.language].append(i)
        groups["all"].append(i)
    out = {}
    for name, items in groups.items():
        n = len(items)
        out[name] = {"questions": n,
                     "with_kb": sum(facts[i].answer in with_kb[i] for i in items) / n,
                     "without_kb": sum(facts[i].answer in without[i] for i in items) / n,
                     "retrieved": sum(found[i] for i in items) / n}
    by_relation: dict[str, list[int]] = defaultdict(list)
    for i, fact in enumerate(facts):
        by_relation[fact.relation].append(i)
    out["relations"] = {r: sum(facts[i].answer in with_kb[i] for i in items) / len(items)
                        for r, items in sorted(by_relation.items())}
    return out


def table(result: dict) -> str:
    """The result as the README shows it."""
    lines = ["questions        with the KB  without  retrieved (ceiling)"]
    for name in ("en", "zh", "all"):
        row = result[name]
        lines.append(f"{name + ' (' + str(row['questions']) + ')':<16} {row['with_kb']:>11.3f}  "
                     f"{row['without_kb']:>7.3f}  {row['retrieved']:>9.3f}")
    lines.append("with the KB, by relation: " + ", ".join(f"{r} {v:.2f}" for r, v in result["relations"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="chattune-kb/run", help="the trained run (default chattune-kb/run)")
    parser.add_argument("--kb", default="chattune-kb/world-kb", help="the world's KB (default chattune-kb/world-kb)")
    parser.add_argument("--url", help="ask a running `chattune serve` at this /v1 URL instead")
    parser.add_argument("--model", default="run", help="with --url: the run's model name (default run)")
    parser.add_argument("--kb-name", default="world", help="with --url: the KB's name in --kb (default world)")
    parser.add_argument("--limit", type=int, help="only the first N facts (every 320 // N-th, both languages)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--show-wrong", type=int, default=0, help="print N wrong answers with the KB")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    _, facts = fiction.world(0)
    if args.limit:
        facts = facts[::max(1, len(facts) // args.limit)][:args.limit]
    if args.url:
        with_kb, without = answers_server(args.url, args.model, args.kb_name, facts, args.max_new_tokens)
    else:
        with_kb, without = answers_local(args.run, args.kb, facts, args.batch_size, args.max_new_tokens)
    result = score(facts, with_kb, without, retrieved(args.kb, facts))
    print(table(result))
    wrong = [(f, a) for f, a in zip(facts, with_kb, strict=True) if f.answer not in a]
    for fact, answer in wrong[:args.show_wrong]:
        print(f"  {fact.question} -> {answer!r} (expected {fact.answer!r})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from chattune.errors import ChattuneError

    try:
        raise SystemExit(main())
    except ChattuneError as exc:
        raise SystemExit(f"ask_world.py: error: {exc}") from None
