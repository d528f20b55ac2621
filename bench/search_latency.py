"""Local search latency: build the embedded Wikipedia corpus and its tantivy index, then time top-k queries.

Queries are drawn (seeded) from the corpus itself: half are article titles, half are 3-word phrases from the
article texts. Each timed call is a full `LocalSearch.search` (parse, BM25 top-k, stored-document fetch, snippet).

    python bench/search_latency.py [--queries 500] [--k 4] [--seed 0]

Prints a markdown table (paste into docs/benchmarks.md) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from arft_core.search.local import LocalSearch, build_index, build_wiki_corpus


def make_queries(corpus: Path, n: int, seed: int) -> list[str]:
    docs = [json.loads(line) for line in corpus.open(encoding="utf-8")]
    rng = random.Random(seed)
    queries = []
    for i in range(n):
        doc = rng.choice(docs)
        if i % 2 == 0:
            queries.append(doc["title"])
        else:
            words = doc["text"].split()
            start = rng.randrange(max(1, len(words) - 3))
            queries.append(" ".join(words[start:start + 3]))
    return queries


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=500, help="timed queries")
    ap.add_argument("--k", type=int, default=4, help="results per query (paper: 4)")
    ap.add_argument("--seed", type=int, default=0, help="query sampling seed")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="arft-bench-search-") as tmp:
        corpus, index_dir = Path(tmp) / "wiki.jsonl", Path(tmp) / "index"
        t0 = time.perf_counter()
        n_docs = build_wiki_corpus(corpus)
        t1 = time.perf_counter()
        build_index(corpus, index_dir)
        t2 = time.perf_counter()

        search = LocalSearch(index_dir)
        queries = make_queries(corpus, args.queries, args.seed)
        for q in queries[:20]:  # warm-up: page cache and first-use allocations
            search.search(q, args.k)
        latencies, hits = [], 0
        for q in queries:
            start = time.perf_counter()
            results = search.search(q, args.k)
            latencies.append((time.perf_counter() - start) * 1e3)
            hits += bool(results)

    row = {
        "engine": f"tantivy {version('tantivy')}",
        "docs": n_docs,
        "corpus_s": round(t1 - t0, 3),
        "index_build_s": round(t2 - t1, 3),
        "queries": len(queries),
        "k": args.k,
        "median_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
        "answered": hits,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    print("| engine | docs | corpus write | index build | queries | k | median | p99 |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {row['engine']} | {n_docs:,} | {row['corpus_s']:.2f} s | {row['index_build_s']:.2f} s | "
          f"{row['queries']} | {args.k} | {row['median_ms']:.3f} ms | {row['p99_ms']:.3f} ms |")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
