"""``chattune kb``: build, add to, remove from and search knowledge bases."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from chattune.kb.defaults import THRESHOLD, TOP_K

if TYPE_CHECKING:
    from chattune.kb.store import Hit


def cmd_kb_build(args) -> int:
    """Build a KB from documents (files or folders) and print what was read and skipped."""
    from chattune.kb import store

    report = store.build(args.docs, args.out, embedding=args.embedding,
                         chunk_size=args.chunk_size, chunk_overlap=args.chunk_overlap)
    print(report.format())
    return 0


def cmd_kb_add(args) -> int:
    """Add files (or folders) to a KB; changed files are replaced, unchanged ones left alone."""
    from chattune.kb import store

    print(store.add(args.kb, args.files, embedding=args.embedding).format())
    return 0


def cmd_kb_rm(args) -> int:
    """Remove files from a KB, by their name in it or their path."""
    from chattune.kb import store

    print(store.remove(args.kb, args.files).format())
    return 0


def format_hits(hits: list[Hit]) -> str:
    """The hits as the terminal shows them: rank, relevance, file and chunk, then the text indented."""
    if not hits:
        return "no chunk above the threshold"
    lines = []
    for rank, hit in enumerate(hits, start=1):
        lines.append(f"[{rank}] {hit.score:.3f}  {hit.file} (chunk {hit.chunk})")
        lines += [f"    {line}" for line in hit.text.splitlines() if line.strip()]
    return "\n".join(lines)


def cmd_kb_search(args) -> int:
    """Print the top k chunks of a KB for a query, with relevance scores and sources."""
    from chattune.kb import store

    hits = store.search(args.kb, args.query, top_k=args.top_k, threshold=args.threshold,
                        embedding=args.embedding)
    print(format_hits(hits))
    return 0


def add_kb_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``kb`` and its subcommands (build, add, rm, search) on a subparsers object."""
    kb = subparsers.add_parser("kb", help="knowledge bases: build, add, rm, search",
                               description="Local knowledge bases for answering from documents.")
    sub = kb.add_subparsers(dest="kb_command", required=True)

    build = sub.add_parser("build", help="read, split and index documents into a KB folder")
    build.add_argument("docs", nargs="+", metavar="DOCS",
                       help="files or folders (walked recursively): .txt .md .pdf .docx .html .jsonl")
    build.add_argument("--out", required=True, metavar="KB", help="the KB folder to write")
    build.add_argument("--embedding", metavar="MODEL_PATH",
                       help="local sentence-transformers model for dense retrieval (default: BM25)")
    build.add_argument("--chunk-size", type=int, default=250, help="longest chunk, characters (default 250)")
    build.add_argument("--chunk-overlap", type=int, default=50,
                       help="characters shared by neighbouring chunks (default 50)")
    build.set_defaults(func=cmd_kb_build)

    add = sub.add_parser("add", help="add or update files in a KB without rebuilding the rest")
    add.add_argument("kb", metavar="KB")
    add.add_argument("files", nargs="+", metavar="FILES", help="files or folders")
    add.add_argument("--embedding", metavar="MODEL_PATH", help="the KB's model, if it moved")
    add.set_defaults(func=cmd_kb_add)

    rm = sub.add_parser("rm", help="remove files from a KB")
    rm.add_argument("kb", metavar="KB")
    rm.add_argument("files", nargs="+", metavar="FILES", help="names as in the KB, or paths")
    rm.set_defaults(func=cmd_kb_rm)

    search = sub.add_parser("search", help="print the most relevant chunks for a query")
    search.add_argument("kb", metavar="KB")
    search.add_argument("query")
    search.add_argument("--top-k", type=int, default=TOP_K, help=f"chunks to show (default {TOP_K})")
    search.add_argument("--threshold", type=float, default=THRESHOLD,
                        help="least relevance shown, in [0, 1], higher = more similar "
                             f"(default {THRESHOLD})")
    search.add_argument("--embedding", metavar="MODEL_PATH", help="the KB's model, if it moved")
    search.set_defaults(func=cmd_kb_search)
    return kb
