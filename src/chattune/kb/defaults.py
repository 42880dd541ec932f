"""Retrieval defaults, apart from :mod:`chattune.kb.store` so that the command line can show
them without importing numpy and the index backends."""

TOP_K = 3
# The default least relevance, chosen on benchmarks/kb_retrieval.py with BM25: 93.8% of its
# questions keep their right chunk, 95% of unrelated questions find nothing. For a dense
# model, run the benchmark with --embedding: its sweep shows where that model's cut lies.
THRESHOLD = 0.15
MAX_QUERY_CHARS = 1000
