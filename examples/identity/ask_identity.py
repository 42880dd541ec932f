"""Ask a self-cognition run and its base model the held-out questions; print the table.

    python examples/identity/ask_identity.py chattune-identity/run

The base model is the run's base with the adapter switched off and the same template, as
``chattune eval --compare base`` does. Three figures each:

- identity questions answered with the new name (paraphrases never trained on, English and
  Chinese; the goal is >= 90% after);
- general questions answered with the new name (it must not leak: at most 1 of 20);
- eval loss on general instructions never trained on (within 5% of the base model's), measured
  by ``chattune eval``'s reference loss.

``--answers FILE`` writes every answer (JSON) for reading.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from chattune.evaluation.evaluate import base_profile, read_eval_data, reference_loss
from chattune.inference.generate import answer
from chattune.inference.runs import load_run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_identity_data import NAME  # noqa: E402


def ask(run, profile: str, questions: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers of ``profile`` to single-turn questions."""
    answers = []
    for start in range(0, len(questions), batch_size):
        conversations = [[{"role": "user", "content": q}] for q in questions[start:start + batch_size]]
        seqs = answer(run, conversations, profile, max_new_tokens=max_new_tokens, do_sample=False)
        answers += [seq.text.text.strip() for seq in seqs]
    return answers


def named(answers: list[str]) -> int:
    """How many answers say the new name."""
    return sum(NAME.lower() in a.lower() for a in answers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the run folder (chattune train's output_dir)")
    parser.add_argument("--data", default="chattune-identity/data", help="make_identity_data.py's data folder")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--answers", help="write every answer to this JSON file")
    args = parser.parse_args(argv)

    data = Path(args.data)
    identity = json.loads((data / "identity_questions.json").read_text(encoding="utf-8"))
    general = json.loads((data / "general_questions.json").read_text(encoding="utf-8"))
    heldout = read_eval_data(str(data / "general_heldout.json"))
    started = time.perf_counter()
    run = base_profile(load_run(args.run))
    rows, answers = {}, {}
    for profile in ("base", run.default):
        served = run.profile(profile)
        said = ask(run, profile, identity, args.max_new_tokens, args.batch_size)
        other = ask(run, profile, general, args.max_new_tokens, args.batch_size)
        loss, _ = reference_loss(run, served, heldout, max_seq_length=512, batch_size=4)
        english = [a for q, a in zip(identity, said, strict=True) if q.isascii()]
        chinese = [a for q, a in zip(identity, said, strict=True) if not q.isascii()]
        rows[profile] = (named(said), named(english), len(english), named(chinese), len(chinese), named(other), loss)
        answers[profile] = {"identity": dict(zip(identity, said, strict=True)),
                            "general": dict(zip(general, other, strict=True))}
    print(f"\nself-cognition: new name {NAME!r}; {len(identity)} identity and {len(general)} general questions "
          f"never trained on; eval loss on {len(heldout.examples)} held-out Alpaca rows")
    print(f"{'model':<8}{'identity: name said':>22}{'English':>10}{'Chinese':>10}{'general: name said':>21}"
          f"{'eval loss':>11}")
    for profile, (hits, en, n_en, zh, n_zh, leaks, loss) in rows.items():
        label = "base" if profile == "base" else "run"
        print(f"{label:<8}{f'{hits}/{len(identity)} ({100 * hits / len(identity):.0f}%)':>22}{f'{en}/{n_en}':>10}"
              f"{f'{zh}/{n_zh}':>10}{f'{leaks}/{len(general)}':>21}{loss:>11.3f}")
    base_loss, run_loss = rows["base"][-1], rows[run.default][-1]
    print(f"eval loss change: {100 * (run_loss - base_loss) / base_loss:+.1f}% "
          f"({time.perf_counter() - started:.0f} s)")
    if args.answers:
        Path(args.answers).write_text(json.dumps(answers, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
