"""Retrieval quality of a knowledge base on a generated fictional world: hit@1 and hit@3.

    python benchmarks/kb_retrieval.py                          # BM25 only, a few seconds
    python benchmarks/kb_retrieval.py --embedding PATH         # also a local sentence-transformers model

The corpus is :func:`fiction.world` (examples/kb/fiction.py): English and Chinese documents (town
gazetteers and biographies, 320 facts with the default seed), each fact asked by a
question worded differently from the sentence that states it. The documents are written
to a temporary folder and built into a KB through :func:`chattune.kb.store.build`
(chunks of 250 characters overlapping by 50, Langchain-Chatchat 0.2's defaults). A
question is a hit at k when one of its k most relevant chunks holds the fact's answer
(every answer occurs once in the corpus, so only the right passage holds it).

The threshold columns: the share of the questions whose right chunk is among the top 3
*and* at or above the threshold (answered), and the share of unrelated questions
(``fiction.UNANSWERABLE``: real-world questions the KB says nothing about) with no chunk
at or above it (so they get the "cannot answer" reply).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from chattune.kb import store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "kb"))

import fiction  # noqa: E402  (the generated world, examples/kb/fiction.py)


def evaluate(kb: store.KnowledgeBase, facts: list[fiction.Fact], thresholds: list[float]) -> dict:
    """hit@1, hit@3 (threshold 0), and per threshold the answered and rejected shares."""
    hit1 = hit3 = 0
    best = []  # per question: the relevance of its best right chunk in the top 3 (0: none)
    for fact in facts:
        hits = store.search(kb, fact.question, top_k=3, threshold=0.0)
        found = [fact.answer in hit.text for hit in hits]
        hit1 += bool(found[:1] and found[0])
        hit3 += any(found)
        best.append(max((hit.score for ok, hit in zip(found, hits, strict=True) if ok), default=0.0))
    top = [max((h.score for h in store.search(kb, q, top_k=1, threshold=0.0)), default=0.0)
           for q in fiction.UNANSWERABLE]
    n = len(facts)
    return {"hit1": hit1 / n, "hit3": hit3 / n, "n": n,
            "answered": {t: sum(s >= t and s > 0 for s in best) / n for t in thresholds},
            "rejected": {t: sum(s < t or s == 0 for s in top) / len(top) for t in thresholds}}


def main() -> None:
    """Build the KBs, run every question, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedding", help="local path of a sentence-transformers model (dense arm)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated world")
    parser.add_argument("--threshold", type=float, default=store.THRESHOLD,
                        help=f"relevance threshold of the answered/rejected columns (default {store.THRESHOLD})")
    args = parser.parse_args()

    thresholds = sorted({args.threshold, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        facts = fiction.write_world(docs, args.seed)
        arms = [("bm25", None)] + ([("dense", args.embedding)] if args.embedding else [])
        for name, model in arms:
            start = time.perf_counter()
            report = store.build([docs], Path(tmp) / name, embedding=model)
            kb = store.open_kb(Path(tmp) / name)
            kb.relevance("warm up")  # BM25 indexes (and a dense model loads) on the first question
            built = time.perf_counter() - start
            for language in ("en", "zh", "all"):
                subset = [f for f in facts if language in ("all", f.language)]
                rows.append((name, language, evaluate(kb, subset, thresholds)))
            print(f"{name}: {report.files} files, {report.chunks} chunks, {len(facts)} facts, "
                  f"built and indexed in {built:.1f} s")

    t = args.threshold
    print(f"\n{'backend':8} {'questions':>10} {'hit@1':>6} {'hit@3':>6} {f'answered@{t:g}':>14} "
          f"{f'rejected@{t:g}':>14}")
    for name, language, r in rows:
        label = f"{language} ({r['n']})"
        print(f"{name:8} {label:>10} {r['hit1']:6.3f} {r['hit3']:6.3f} "
              f"{r['answered'][t]:14.3f} {r['rejected'][t]:14.3f}")
    print(f"\nthreshold sweep, all questions ({len(fiction.UNANSWERABLE)} unrelated ones for 'rejected'):")
    print(f"{'backend':8} {'threshold':>9} {'answered':>9} {'rejected':>9}")
    for name, language, r in rows:
        if language == "all":
            for th in thresholds:
                print(f"{name:8} {th:9.2f} {r['answered'][th]:9.3f} {r['rejected'][th]:9.3f}")

if __name__ == "__main__":
    main()
