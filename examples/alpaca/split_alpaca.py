"""Split the tutorial's Alpaca data (English and Chinese) into training rows and held-out rows.

Reads ``alpaca_en_demo.json`` and ``alpaca_zh_demo.json`` (``../shared/data``, LLaMA-Factory's
demo sets, 999 and 1,000 rows) and writes, per language, a seeded 10% as held-out rows that
no training run sees, and the rest for training:

    python examples/alpaca/split_alpaca.py           # -> chattune-alpaca/data/{train,heldout}_{en,zh}.json

Every input row is accounted for: it lands in exactly one of the two files (the counts are
printed and checked).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LANGUAGES = {"en": "alpaca_en_demo.json", "zh": "alpaca_zh_demo.json"}


def split_rows(rows: list[dict], held_out: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): a seeded ``held_out`` share of ``rows``, order kept."""
    picked = set(random.Random(seed).sample(range(len(rows)), round(len(rows) * held_out)))
    train = [row for i, row in enumerate(rows) if i not in picked]
    test = [row for i, row in enumerate(rows) if i in picked]
    return train, test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with the Alpaca demo files")
    parser.add_argument("--out", default="chattune-alpaca", help="output folder (default chattune-alpaca)")
    parser.add_argument("--held-out", type=float, default=0.1, help="share held out (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out) / "data"
    out.mkdir(parents=True, exist_ok=True)
    for language, name in LANGUAGES.items():
        source = Path(args.data) / name
        rows = json.loads(source.read_text(encoding="utf-8"))
        train, test = split_rows(rows, args.held_out, args.seed)
        assert len(train) + len(test) == len(rows)
        for split, part in (("train", train), ("heldout", test)):
            (out / f"{split}_{language}.json").write_text(json.dumps(part, ensure_ascii=False, indent=1) + "\n",
                                                          encoding="utf-8")
        print(f"{source}: {len(rows)} rows -> {out}/train_{language}.json {len(train)}, "
              f"{out}/heldout_{language}.json {len(test)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
