"""The search tool's protocol: what a backend answers (`SearchResult`), how it fails (`SearchError`), its interface
(`SearchBackend`) and the one model-facing format (`format_information`). Backends and the cache import only
this module; the package's `make_backend` factory picks and wraps them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SearchResult:
    """One hit: `source` is the URL (web backends) or the corpus document id (local backend)."""

    title: str
    snippet: str
    source: str


class SearchError(RuntimeError):
    """A search that could not be answered (backend failure, missing key, replay miss). Never contains a key."""


@runtime_checkable
class SearchBackend(Protocol):
    name: str

    def search(self, query: str, k: int) -> list[SearchResult]: ...


_WS = re.compile(r"\s+")


def format_information(results: Sequence[SearchResult], k: int) -> str:
    """The tool feedback shown to the model for one search: the first `k` snippets, numbered.

    Follows the paper's harness (spec §2.2): `<information> 1. Content:{snippet1}2. Content:{snippet2}...
    </information>`, snippet only (title and URL dropped). One deliberate difference: the paper joins entries with
    no separator at all, so one snippet runs into the next entry's number (listed as a defect in spec §8.8); here
    entries are separated by a newline. Whitespace inside a snippet is collapsed so that the newline stays the only
    entry separator.
    """
    entries = [f"{i}. Content:{_WS.sub(' ', r.snippet).strip()}" for i, r in enumerate(results[:k], start=1)]
    if not entries:
        return "<information> No results found. </information>"
    return "<information> " + "\n".join(entries) + " </information>"
