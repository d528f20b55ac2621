"""SQLite cache of search results, and `CachedSearch`, which puts it in front of any backend.

Entries are keyed by backend name + normalised query (lowercase, whitespace collapsed, stripped) + k. Results are
stored as JSON and read back exactly as stored (same order, same text). Modes (`SearchConfig.mode`):

- live: always query the backend, store the answer;
- record: answer from the cache, query the backend on a miss and store;
- replay: cache only; a miss is a `SearchError` naming the query and backend (reproducible runs, no network).

Only answers are stored: a backend call that raises (HTTP error, redirect, malformed answer or malformed result
entries, timeout) stores nothing, and `put` refuses anything but a list of `SearchResult` with text fields, so a
non-answer can never be replayed later.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from arft_core.search.base import SearchBackend, SearchError, SearchResult

Mode = Literal["live", "record", "replay"]
SCHEMA_VERSION = 1


def normalise_query(query: str) -> str:
    return " ".join(query.lower().split())


class SearchCache:
    """One SQLite table of results. One connection guarded by a lock: safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise SearchError(f"{self.path}: search cache schema {version}, this code reads {SCHEMA_VERSION}")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS results (backend TEXT NOT NULL, query TEXT NOT NULL, k INTEGER NOT NULL,"
                " raw_query TEXT NOT NULL, results BLOB NOT NULL, created_at REAL NOT NULL,"
                " PRIMARY KEY (backend, query, k))")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def __repr__(self) -> str:
        return f"SearchCache({str(self.path)!r})"

    def get(self, backend: str, query: str, k: int) -> list[SearchResult] | None:
        with self._lock:
            row = self._db.execute("SELECT results FROM results WHERE backend = ? AND query = ? AND k = ?",
                                   (backend, normalise_query(query), k)).fetchone()
        if row is None:
            return None
        return [SearchResult(**r) for r in json.loads(bytes(row[0]).decode("utf-8", "surrogatepass"))]

    def put(self, backend: str, query: str, k: int, results: list[SearchResult]) -> None:
        if not isinstance(results, list) or not all(
                isinstance(r, SearchResult) and all(isinstance(v, str) for v in (r.title, r.snippet, r.source))
                for r in results):
            raise SearchError(f"backend {backend!r} answered query {query!r} with something other than a list of "
                              "SearchResult; not cached")
        # A BLOB with surrogatepass: every Python string round-trips exactly, even lone surrogates, which neither
        # SQLite TEXT (UTF-8) nor JSON's \u escapes (they would merge a surrogate pair into one character) preserve.
        payload = json.dumps([asdict(r) for r in results], ensure_ascii=False).encode("utf-8", "surrogatepass")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                             (backend, normalise_query(query), k, query, payload, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    backend_calls: int = 0


class CachedSearch:
    """A `SearchBackend` answering from `cache` according to `mode`; `stats` counts hits, misses, backend calls.

    Two threads missing on the same query in record mode may both query the backend (the last answer is kept);
    this is rare and harmless, so no per-query lock.
    """

    def __init__(self, backend: SearchBackend, cache: SearchCache, mode: Mode = "record") -> None:
        if mode not in ("live", "record", "replay"):
            raise ValueError(f"unknown cache mode {mode!r}")
        self.backend, self.cache, self.mode = backend, cache, mode
        self.name = backend.name
        self.stats = CacheStats()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CachedSearch({self.backend!r}, {self.cache!r}, mode={self.mode!r})"

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    def search(self, query: str, k: int) -> list[SearchResult]:
        if self.mode != "live":
            cached = self.cache.get(self.name, query, k)
            if cached is not None:
                self._count("hits")
                return cached
            self._count("misses")
            if self.mode == "replay":
                # The file's name, not its path: the text reaches trajectories and a served model's clients.
                raise SearchError(f"replay mode: no cached result for query {query!r} (k={k}) from backend "
                                  f"{self.name!r} in the cache {self.cache.path.name}")
        results = self.backend.search(query, k)
        self._count("backend_calls")
        self.cache.put(self.name, query, k, results)
        return results
