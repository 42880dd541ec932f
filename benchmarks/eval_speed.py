"""Eval generation speed: chattune's batched decoder against one-by-one ``model.generate``.

    python benchmarks/eval_speed.py                   # builds the demo run first (about 20 s)
    python benchmarks/eval_speed.py --run RUN_DIR     # an existing run folder

The same prompts (the demo's taught and held-out questions, repeated to ``--rows``),
greedy, at most ``--max-new-tokens`` new tokens, answered (A) as ``chattune eval`` does:
:func:`chattune.evaluation.evaluate.generate_rows`, ``--batch-size`` rows per batch, left padding,
KV cache, finished rows leaving the batch; (B) one prompt at a time with transformers'
``model.generate``. Arms are interleaved (A, B, A, B, ...) and the best of each is kept:
the machine's speed swings. Prints rows/s, new tokens/s and the ratio, and checks that
both arms produce the same tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def demo_prompts(count: int) -> tuple[list[list[dict]], str]:
    """``count`` conversations from the demo's records, and a data file holding them."""
    import json

    from chattune.demo import demo_records

    taught, held_out = demo_records()
    rows = [(taught + held_out)[i % len(taught + held_out)] for i in range(count)]
    path = Path(tempfile.mkdtemp()) / "eval_rows.json"
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return rows, str(path)


def batched(run, data, batch_size: int, max_new_tokens: int) -> tuple[float, int, list[str]]:
    """Seconds, new tokens and the answers of chattune's batched eval generation."""
    from chattune.evaluation.evaluate import generate_rows, generation_settings

    started = time.perf_counter()
    results = generate_rows(run, None, data, batch_size=batch_size, log=lambda _: None,
                            **generation_settings(max_new_tokens))
    seconds = time.perf_counter() - started
    return seconds, sum(r.tokens for r in results), [r.predict for r in results]


@torch.no_grad()
def one_by_one(run, data, max_new_tokens: int) -> tuple[float, int, list[str]]:
    """Seconds, new tokens and the answers of ``model.generate`` on one prompt at a time."""
    profile = run.profile()
    stops = sorted(profile.stop_token_ids)
    started = time.perf_counter()
    tokens, answers = 0, []
    for example in data.examples:
        ids = torch.tensor([run.prompt_ids(example.messages, profile)], device=run.device)
        out = run.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=run.tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        while new and new[-1] in stops:
            new = new[:-1]
        tokens += len(new)
        answers.append(run.decode(new).strip())
    return time.perf_counter() - started, tokens, answers


def main() -> None:
    """Run both arms ``--repeats`` times, interleaved, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run folder (default: build the demo run)")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from chattune.evaluation.evaluate import read_eval_data
    from chattune.inference.runs import load_run

    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_dir = args.run
    if run_dir is None:
        from chattune.demo import run_demo

        run_dir = run_demo(tempfile.mkdtemp(prefix="chattune-demo-"), log=lambda *_: None)["run_dir"]
    run = load_run(run_dir)
    _, path = demo_prompts(args.rows)
    data = read_eval_data(path)
    best = {"batched": None, "one by one": None}
    answers = {}
    for _ in range(args.repeats):
        for name in best:
            if name == "batched":
                seconds, tokens, texts = batched(run, data, args.batch_size, args.max_new_tokens)
            else:
                seconds, tokens, texts = one_by_one(run, data, args.max_new_tokens)
            answers[name] = texts
            if best[name] is None or seconds < best[name][0]:
                best[name] = (seconds, tokens)
    same = sum(a == b for a, b in zip(answers["batched"], answers["one by one"], strict=True))
    print(f"{args.rows} rows, <= {args.max_new_tokens} new tokens, greedy, run {run_dir}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'arm':<28}{'seconds':>9}{'rows/s':>9}{'tokens/s':>10}")
    for name, (seconds, tokens) in best.items():
        label = f"batched (batch {args.batch_size})" if name == "batched" else "model.generate, one by one"
        print(f"{label:<28}{seconds:>9.2f}{args.rows / seconds:>9.1f}{tokens / seconds:>10.0f}")
    ratio = best["one by one"][0] / best["batched"][0]
    print(f"batched / one by one: {ratio:.1f}x the rows per second; same answer on {same}/{args.rows} rows")


if __name__ == "__main__":
    main()
