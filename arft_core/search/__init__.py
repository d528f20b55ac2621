"""The search tool: one interface over a local BM25 index (tantivy) and web APIs (Serper, Brave), behind a SQLite
cache that records and replays results.

    backend = make_backend(cfg.search, root)       # local / serper / brave, wrapped in the cache
    results = backend.search("eiffel tower height", cfg.search.top_k)
    text = format_information(results, cfg.search.top_k)   # what the model sees

`format_information` (in `base.py`, with the protocol the backends implement) is the only place the model-facing
format lives.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from arft_core.search.base import SearchBackend, SearchError, SearchResult, format_information

if TYPE_CHECKING:
    from arft_core.config import SearchConfig

__all__ = ["SearchBackend", "SearchError", "SearchResult", "format_information", "make_backend"]


class _ReplayOnly:
    """Stands in for the real backend in replay mode: nothing is built, no key is needed, and any call is a bug."""

    def __init__(self, name: str) -> None:
        self.name = name

    def search(self, query: str, k: int) -> list[SearchResult]:
        raise SearchError(f"backend {self.name!r} is not available in replay mode (query {query!r})")


def make_backend(cfg: SearchConfig, root: Path) -> SearchBackend:
    """The configured backend wrapped in the cache (`cfg.cache_path`, `cfg.mode`); paths are relative to `root`.

    The local backend builds its index on first use (and rebuilds it when the corpus changes). In replay mode no
    backend is constructed at all: answers come only from the cache.
    """
    from arft_core.search.cache import CachedSearch, SearchCache

    root = Path(root)
    inner: SearchBackend
    if cfg.mode == "replay":
        inner = _ReplayOnly(cfg.backend)
    elif cfg.backend == "local":
        from arft_core.search.local import LocalSearch, ensure_index

        corpus = root / cfg.corpus_path if cfg.corpus_path else None
        inner = LocalSearch(ensure_index(corpus, root / cfg.index_dir))
    elif cfg.backend == "serper":
        from arft_core.search.web import SerperSearch

        inner = SerperSearch(cfg)
    elif cfg.backend == "brave":
        from arft_core.search.web import BraveSearch

        inner = BraveSearch(cfg)
    else:  # pragma: no cover - the config's Literal rejects anything else
        raise SearchError(f"unknown search backend {cfg.backend!r}")
    return CachedSearch(inner, SearchCache(root / cfg.cache_path), cfg.mode)
